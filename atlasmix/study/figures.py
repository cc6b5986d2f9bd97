"""Figures of the study report: heatmaps of means and of paired deltas, scores beside their baselines.

Every figure function writes one PNG and returns what it marked (or None when there is nothing to
draw); :mod:`atlasmix.study.curves` draws the line plots. Shared here: the panel grid and saving.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from atlasmix.evaluation.plotting import pyplot, save_figure, wrap_label
from atlasmix.study.report_format import NOT_BEATING, ci, is_false, is_true, order
from atlasmix.study.tables import HEADLINE_KIND, HEADLINE_METRIC

#: at most this many panels per row of a small-multiples figure
MAX_COLS = 5


def _text_color(rgba) -> str:
    r, g, b = rgba[:3]
    return "k" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "w"


def save(fig, path: str | Path) -> None:
    """Write a report figure (PNG, 100 dpi) and close it."""
    save_figure(fig, Path(path), dpi=100)


def _heatmap_size(rows: list, cols: list, label_lines: int) -> tuple[float, float]:
    """Figure size (in) of a rows x cols annotated heatmap: 1.25 in per column, 0.62 in per row, room
    for the row labels (0.07 in per character at 9 pt), wrapped column labels, a two-line title and
    the colour bar."""
    ylab = max((len(str(r)) for r in rows), default=0)
    w = 1.0 + 0.07 * ylab + 1.25 * len(cols) + 1.5
    h = 1.5 + 0.17 * label_lines + 0.62 * len(rows)
    return max(w, 6.0), max(h, 3.2)


def panel_grid(n: int) -> tuple[int, int]:
    """(rows, columns) of ``n`` panels in rows of at most :data:`MAX_COLS`."""
    ncols = min(MAX_COLS, max(1, n))
    return math.ceil(n / ncols), ncols


def label_panels(axes, n: int, ylabel: str, xlabel: str, ylabel_size: float = 7.5) -> None:
    """Hide the unused panels of a grid of ``n``; y label on the first column, x label under the lowest
    visible panel of each column."""
    nrows, ncols = axes.shape
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel, fontsize=ylabel_size)
    for j in range(ncols):
        vis = [i for i in range(nrows) if i * ncols + j < n]
        if vis:
            axes[vis[-1], j].set_xlabel(xlabel, fontsize=7.5)


def style_panel(ax, title: str) -> None:
    """A small-multiples panel's title (wrapped), small tick labels and a light grid."""
    ax.set_title(wrap_label(title, 30), fontsize=8)
    ax.tick_params(labelsize=6.5)
    ax.grid(alpha=0.3)


def _rows_to_draw(table: pd.DataFrame, value: str, metric: str, model_kind: str, budget: str | None) -> pd.DataFrame:
    """The rows of ``table`` of one metric and model kind (and budget, unless None) with a finite ``value``."""
    d = table[(table["metric"] == metric) & (table["model_kind"] == model_kind)]
    if budget is not None:
        d = d[d["budget"].astype(str) == str(budget)]
    return d[np.isfinite(d[value].astype(float))]


def _heatmap(M: np.ndarray, rows: list, cols: list, **imshow):
    """(figure, axes, image) of the matrix ``M`` with ``rows`` as y labels and the wrapped ``cols`` on top."""
    xl = [wrap_label(c, 16) for c in cols]
    nl = max(s.count("\n") + 1 for s in xl)
    fig, ax = pyplot().subplots(figsize=_heatmap_size(rows, cols, nl), layout="constrained")
    im = ax.imshow(M, aspect="auto", **imshow)
    ax.set_xticks(range(len(cols)), xl, fontsize=9)
    ax.tick_params(axis="x", top=True, labeltop=True, bottom=False, labelbottom=False)
    ax.set_yticks(range(len(rows)), rows, fontsize=9)
    return fig, ax, im


def _annotate(ax, im, i: int, j: int, value: float, text: str, lo, hi, **font) -> None:
    """Cell (i, j): ``text`` above its interval ``[lo, hi]``, in black or white as the colour beneath asks."""
    c = _text_color(im.cmap(im.norm(value)))
    ax.text(j, i - 0.12, text, ha="center", va="center", color=c, **font)
    ax.text(j, i + 0.22, ci(lo, hi), ha="center", va="center", color=c, fontsize=7)


def _finish_heatmap(fig, ax, im, colorbar: str, title: str, path: str | Path) -> None:
    fig.colorbar(im, ax=ax, label=colorbar, shrink=0.9, pad=0.02)
    ax.set_ylabel("training mixture")
    ax.set_title(title, fontsize=10, loc="left")
    save(fig, path)


# The figures' docstrings (here, delta_heatmap, curves.curves_plot) open alike: numpydoc entries for the
# same kinds of parameter (a study table, the PNG to write, the rows shown), not repeated logic.
def mean_heatmap(summary: pd.DataFrame, path: str | Path, *, metric: str = HEADLINE_METRIC,
                 model_kind: str = HEADLINE_KIND, budget: str | None = None,
                 reference: str | None = None) -> dict | None:
    """Heatmap of means over seeds, mixtures (rows) x eval sets (columns), intervals annotated.

    Each cell shows the mean (3 decimals) and ``[lo, hi]`` beneath in smaller text. A dagger marks
    undertrained rows (``undertrained`` True); a double dagger marks means that do not beat their
    baseline (``beats_baseline`` False), with a legend line under the axes for each mark in use.

    Parameters
    ----------
    summary : DataFrame
        ``summary.parquet`` (columns :data:`atlasmix.study.tables.SUMMARY`).
    path : path
        PNG to write.
    metric, model_kind : str
        The rows shown.
    budget : str, optional
        Only this budget (default: every row; several budgets would average, so pass one).
    reference : str, optional
        Mixture drawn first.

    Returns
    -------
    dict or None
        None when there is nothing to plot; else ``rows`` (mixtures, top to bottom), ``cols`` (eval
        sets), ``undertrained`` and ``not_beating`` (lists of (mixture, eval set) cells marked).
    """
    d = _rows_to_draw(summary, "mean", metric, model_kind, budget)
    if d.empty:
        return None
    rows, cols = order(d["mixture"], reference), order(d["eval_set"])
    idx = d.groupby(["mixture", "eval_set"]).agg(mean=("mean", "mean"), lo=("lo", "mean"), hi=("hi", "mean"),
                                                 under=("undertrained", lambda s: any(is_true(v) for v in s)),
                                                 notbeat=("beats_baseline", lambda s: any(is_false(v) for v in s)))
    M = np.full((len(rows), len(cols)), np.nan)
    for (m, e), r in idx.iterrows():
        M[rows.index(m), cols.index(e)] = r["mean"]
    fig, ax, im = _heatmap(M, rows, cols, cmap="viridis")
    under, notbeat = [], []
    for (m, e), r in idx.iterrows():
        i, j = rows.index(m), cols.index(e)
        if not np.isfinite(r["mean"]):
            continue
        mark = ""
        if r["under"]:
            mark += "\u2020"
            under.append((m, e))
        if r["notbeat"]:
            mark += "\u2021"
            notbeat.append((m, e))
        _annotate(ax, im, i, j, r["mean"], f"{r['mean']:.3f}{mark}", r["lo"], r["hi"], fontsize=9.5,
                  fontweight="bold")
    notes = []
    if under:
        notes.append("\u2020 undertrained: the validation loss had not plateaued at the end of the budget")
    if notbeat:
        notes.append(f"\u2021 {NOT_BEATING}")
    ttl = f"{model_kind} {metric}" + (f", budget {budget}" if budget is not None else "")
    _finish_heatmap(fig, ax, im, f"{metric}\n(mean over seeds)", ttl + ("\n" + "\n".join(notes) if notes else ""),
                    path)
    return {"rows": rows, "cols": cols, "undertrained": under, "not_beating": notbeat}


def delta_heatmap(deltas: pd.DataFrame, path: str | Path, *, metric: str = HEADLINE_METRIC,
                  model_kind: str = HEADLINE_KIND, budget: str | None = None,
                  reference: str | None = None) -> dict | None:
    """Heatmap of paired deltas mixture - reference (diverging colours centred at 0).

    Cells whose interval excludes 0 (``excludes_zero`` True) are written in bold with an asterisk
    and boxed; every cell shows the delta and ``[lo, hi]``.

    Parameters
    ----------
    deltas : DataFrame
        ``deltas.parquet`` (columns :data:`atlasmix.study.tables.DELTAS`).
    path : path
        PNG to write.
    metric, model_kind, budget : str
        The rows shown (``budget`` None: every row).
    reference : str, optional
        Only deltas against this reference (default: the first reference in the table).

    Returns
    -------
    dict or None
        None when there is nothing to plot; else ``rows``, ``cols``, ``reference`` and ``marked``
        (list of (mixture, eval set) cells whose interval excludes 0).
    """
    d = _rows_to_draw(deltas, "delta", metric, model_kind, budget)
    if d.empty:
        return None
    if reference is None:
        reference = str(d["reference"].iloc[0])
    d = d[d["reference"] == reference]
    if d.empty:
        return None
    pyplot()
    from matplotlib.patches import Rectangle

    rows, cols = order(d["mixture"]), order(d["eval_set"])
    M = np.full((len(rows), len(cols)), np.nan)
    for r in d.itertuples():
        M[rows.index(r.mixture), cols.index(r.eval_set)] = r.delta
    lim = float(np.nanmax(np.abs(np.r_[M.ravel(), d["lo"].astype(float), d["hi"].astype(float)])))
    lim = lim if np.isfinite(lim) and lim > 0 else 1.0
    fig, ax, im = _heatmap(M, rows, cols, cmap="RdBu_r", vmin=-lim, vmax=lim)
    marked = []
    for r in d.itertuples():
        i, j = rows.index(r.mixture), cols.index(r.eval_set)
        ex = is_true(r.excludes_zero)
        if ex:
            marked.append((r.mixture, r.eval_set))
            ax.add_patch(Rectangle((j - 0.46, i - 0.44), 0.92, 0.88, fill=False, lw=2.0, ec="k"))
        _annotate(ax, im, i, j, r.delta, f"{r.delta:+.3f}{'*' if ex else ''}", r.lo, r.hi,
                  fontsize=9.5 if ex else 9, fontweight="bold" if ex else "normal")
    ttl = f"Paired delta vs reference '{reference}' ({model_kind})" + (f", budget {budget}" if budget else "")
    _finish_heatmap(fig, ax, im, f"\u0394 {metric}\n(mixture \u2212 reference)",
                    ttl + "\n* boxed, bold: 95 % interval excludes 0", path)
    return {"rows": rows, "cols": cols, "reference": reference, "marked": marked}


def baseline_plot(summary: pd.DataFrame, path: str | Path) -> dict | None:
    """Scores of metrics that have a baseline, beside the baseline (dot plot, one row per score).

    One panel per (model kind, metric); a row is (mixture, eval set[, budget]): the mean with its
    interval (error bar) and the baseline (red cross). A row that does not beat its baseline is
    drawn grey and labelled :data:`~atlasmix.study.report_format.NOT_BEATING` at the right of the panel.

    Parameters
    ----------
    summary : DataFrame
        ``summary.parquet``.
    path : path
        PNG to write.

    Returns
    -------
    dict or None
        None when no row has a baseline; else ``panels`` and ``not_beating`` (list of (model kind,
        mixture, eval set, budget) labelled).
    """
    d = summary[np.isfinite(pd.to_numeric(summary["baseline"], errors="coerce").astype(float))]
    if d.empty:
        return None
    plt = pyplot()
    panels = list(d.groupby(["model_kind", "metric"], sort=False))
    multi_b = d["budget"].nunique() > 1
    heights = [len(g) for _, g in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 1.0 + 0.22 * sum(heights) + 0.9 * len(panels)),
                             squeeze=False, layout="constrained", gridspec_kw={"height_ratios": heights})
    notbeat, names = [], []
    for ax, ((kind, metric), g) in zip(axes[:, 0], panels):
        names.append(f"{kind} {metric}")
        labels = [f"{r.mixture} \u00b7 {r.eval_set}" + (f" \u00b7 {r.budget}" if multi_b else "")
                  for r in g.itertuples()]
        y = np.arange(len(g))[::-1]
        for yi, r in zip(y, g.itertuples()):
            bad = is_false(r.beats_baseline)
            col = "0.55" if bad else "C0"
            lo, hi = float(r.lo), float(r.hi)
            err = None if not (np.isfinite(lo) and np.isfinite(hi)) else [[r.mean - lo], [hi - r.mean]]
            ax.errorbar([r.mean], [yi], xerr=err, fmt="o", color=col, ms=5, capsize=2.5)
            ax.plot([r.baseline], [yi], "x", color="#c00000", ms=7, mew=2)
            if bad:
                notbeat.append((kind, r.mixture, r.eval_set, r.budget))
                ax.annotate(NOT_BEATING, xy=(1.01, yi), xycoords=("axes fraction", "data"), va="center",
                            fontsize=8, color="#b00000", fontweight="bold")
        ax.set_yticks(y, labels, fontsize=8)
        ax.set_ylim(-0.7, len(g) - 0.3)
        ax.set_xlabel(f"{metric} (mean over seeds, 95 % interval)", fontsize=8)
        ax.set_title(f"{kind}: {metric}", fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(axis="x", labelsize=7)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color="C0", marker="o", lw=1, label="score, 95 % interval"),
               Line2D([], [], color="#c00000", marker="x", mew=2, lw=0, label="baseline")]
    if notbeat:
        handles.append(Line2D([], [], color="0.55", marker="o", lw=1, label=f"grey: {NOT_BEATING}"))
    fig.legend(handles=handles, loc="outside upper center", ncols=len(handles), fontsize=8, frameon=False)
    save(fig, path)
    return {"panels": names, "not_beating": notbeat}
