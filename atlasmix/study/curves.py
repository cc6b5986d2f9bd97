"""Line plots of the study report: the training curve of every run and the subset-size scaling curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from atlasmix.evaluation.plotting import pyplot, wrap_label
from atlasmix.study.figures import label_panels, panel_grid, save, style_panel
from atlasmix.study.report_format import NOT_BEATING, order


def _count_formatter():
    """Tick labels 0, 500, 50k, 1.2M (cells seen)."""
    from matplotlib.ticker import FuncFormatter

    def f(v, _pos):
        a = abs(v)
        if a >= 1e6:
            return f"{v / 1e6:g}M"
        if a >= 1e3:
            return f"{v / 1e3:g}k"
        return f"{v:g}"

    return FuncFormatter(f)


def _run_label(g: pd.DataFrame, multi_kind: bool) -> str:
    r = g.iloc[0]
    s = str(r["mixture"])
    if multi_kind:
        s = f"{r['model_kind']}: {s}"
    st, f = r.get("strategy"), r.get("fraction")
    if st is None or (isinstance(st, float) and np.isnan(st)) or not str(st):
        return s  # a full-size run: its fraction (1 or NaN) says nothing
    s += f" | {st}"
    try:
        if f is not None and np.isfinite(float(f)):
            s += f" @ {float(f):g}"
    except (TypeError, ValueError):
        pass
    return s


def curves_plot(curves: pd.DataFrame, path: str | Path, *, reference: str | None = None,
                undertrained: set | None = None, not_beating: set | None = None) -> dict | None:
    """Training curves of every run: one panel per mixture, one line per seed.

    x is cells seen, y the validation loss; a run without any finite validation loss is drawn from
    its training loss, dashed (the fallback is per run, so one line never mixes the two losses).
    Panels wrap into rows of at most :data:`~atlasmix.study.figures.MAX_COLS`; a panel is one (model kind, mixture,
    strategy, fraction); several budgets of one panel are told apart by line width.

    Parameters
    ----------
    curves : DataFrame
        ``curves.parquet`` (columns :data:`atlasmix.study.tables.CURVES`).
    path : path
        PNG to write.
    reference : str, optional
        Mixture drawn first.
    undertrained : set of (model kind, mixture), optional
        Panels whose title gets a dagger ("undertrained").
    not_beating : set of (model kind, mixture), optional
        Panels whose title gets a double dagger (the model does not beat its baseline on at least
        one eval set; :data:`~atlasmix.study.report_format.NOT_BEATING`).

    Returns
    -------
    dict or None
        None without curves; else ``panels`` (titles) and ``train_fallback`` (run keys drawn from
        the training loss).
    """
    if curves.empty:
        return None
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    c = curves.copy()
    c["_strategy"] = c["strategy"].astype(object).where(c["strategy"].notna(), "")
    c["_fraction"] = pd.to_numeric(c["fraction"], errors="coerce").fillna(-1.0)
    keys = ["model_kind", "mixture", "_strategy", "_fraction"]
    multi_kind = c["model_kind"].nunique() > 1
    groups = list(c.groupby(keys, sort=False))
    kinds = order(c["model_kind"])
    mix_order = order(c["mixture"], reference)
    groups.sort(key=lambda kv: (kinds.index(kv[0][0]), mix_order.index(kv[0][1]), kv[0][2], kv[0][3]))
    seeds = sorted(c["seed"].dropna().unique().tolist())
    colors = plt.get_cmap("tab10")
    budgets = order(c["budget"].astype(str))
    nrows, ncols = panel_grid(len(groups))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.35 * ncols, 2.05 * nrows + 0.45), squeeze=False,
                             layout="constrained")
    titles, fallback = [], []
    under, notbeat = undertrained or set(), not_beating or set()
    for ax, (k, g) in zip(axes.ravel(), groups):
        title = _run_label(g, multi_kind)
        if (k[0], k[1]) in under:
            title += " \u2020"
        if (k[0], k[1]) in notbeat:
            title += " \u2021"
        titles.append(title)
        for key, run in g.groupby("run_key", sort=False):
            run = run.sort_values("cells_seen")
            v = run["validation_loss"].astype(float)
            s = run["seed"].iloc[0]
            color = colors(seeds.index(s) % 10) if s in seeds else "grey"
            lw = 1.4 + 0.8 * budgets.index(str(run["budget"].iloc[0]))
            if np.isfinite(v).any():
                ok = np.isfinite(v)
                ax.plot(run["cells_seen"][ok], v[ok], color=color, lw=lw, marker=".", ms=3)
            else:
                fallback.append(key)
                ax.plot(run["cells_seen"], run["train_loss"].astype(float), color=color, lw=lw, ls="--")
        style_panel(ax, title)
        ax.xaxis.set_major_formatter(_count_formatter())
        ax.xaxis.set_major_locator(MaxNLocator(4))
        lines = [ln.get_ydata() for ln in ax.get_lines()]
        if lines and all(np.nanmin(np.asarray(y, dtype=float)) > 0 for y in lines if len(y)):
            ax.set_yscale("log")  # the first points are 10x the plateau: a log axis shows the plateau
    label_panels(axes, len(groups), "validation loss", "cells seen")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors(i % 10), lw=1.6, label=f"seed {s:g}" if isinstance(s, float)
                      else f"seed {s}") for i, s in enumerate(seeds)]
    if fallback:
        handles.append(Line2D([], [], color="grey", ls="--", label="dashed: training loss (run has no validation)"))
    if any("\u2020" in t for t in titles):
        handles.append(Line2D([], [], color="none", label="\u2020 undertrained"))
    if any("\u2021" in t for t in titles):
        handles.append(Line2D([], [], color="none", label=f"\u2021 {NOT_BEATING} (on at least one eval set)"))
    if len(budgets) > 1:
        handles += [Line2D([], [], color="k", lw=1.4 + 0.8 * i, label=f"budget {b}") for i, b in enumerate(budgets)]
    fig.legend(handles=handles, loc="outside upper center", ncols=min(len(handles), 6 if ncols >= 4 else 2),
               fontsize=8, frameon=False)
    save(fig, path)
    return {"panels": titles, "train_fallback": fallback}


def scaling_plot(scaling: pd.DataFrame, path: str | Path, smallest: pd.DataFrame | None = None) -> dict | None:
    """Subset-size curves: one panel per eval set, one line (mean, band = interval) per strategy.

    All rows of ``scaling`` are drawn in one figure, so pass one (model kind, base, budget, metric)
    at a time. The smallest fraction within 95 % of the best (``smallest``) is drawn as a dotted
    vertical line in the strategy's colour.

    Parameters
    ----------
    scaling : DataFrame
        Rows of ``scaling.parquet`` (columns :data:`atlasmix.study.tables.SCALING`).
    path : path
        PNG to write.
    smallest : DataFrame, optional
        Matching rows of ``scaling_smallest.parquet``.

    Returns
    -------
    dict or None
        None without rows; else ``panels`` (eval sets) and ``strategies``.
    """
    if scaling.empty:
        return None
    plt = pyplot()
    sets, strategies = order(scaling["eval_set"]), order(scaling["strategy"])
    nrows, ncols = panel_grid(len(sets))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.35 * ncols, 2.3 * nrows + 0.5), squeeze=False,
                             layout="constrained", sharey=True)
    colors = plt.get_cmap("tab10")
    fr = pd.to_numeric(scaling["fraction"], errors="coerce")
    log = bool((fr > 0).all() and fr.max() / max(fr.min(), 1e-12) >= 20)
    for ax, e in zip(axes.ravel(), sets):
        for k, st in enumerate(strategies):
            g = scaling[(scaling["eval_set"] == e) & (scaling["strategy"] == st)].sort_values("fraction")
            if g.empty:
                continue
            x = g["fraction"].astype(float)
            ax.fill_between(x, g["lo"].astype(float), g["hi"].astype(float), color=colors(k % 10), alpha=0.18, lw=0)
            ax.plot(x, g["mean"].astype(float), color=colors(k % 10), marker="o", ms=3.5, lw=1.5)
            if smallest is not None and not smallest.empty:
                s = smallest[(smallest["eval_set"] == e) & (smallest["strategy"] == st)]
                if not s.empty and np.isfinite(float(s["smallest_fraction"].iloc[0])):
                    ax.axvline(float(s["smallest_fraction"].iloc[0]), color=colors(k % 10), ls=":", lw=1.2)
        if log:
            ax.set_xscale("log")
        style_panel(ax, e)
    label_panels(axes, len(sets), wrap_label(str(scaling["metric"].iloc[0]), 22), "fraction of the base corpus",
                 ylabel_size=8)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors(k % 10), marker="o", ms=4, lw=1.5, label=st)
               for k, st in enumerate(strategies)]
    if smallest is not None and not smallest.empty:
        handles.append(Line2D([], [], color="grey", ls=":", label="smallest fraction within 95 % of the best"))
    fig.legend(handles=handles, loc="outside upper center", ncols=min(len(handles), 4), fontsize=8, frameon=False)
    save(fig, path)
    return {"panels": sets, "strategies": strategies}
