"""HTML report of a study (``atlasmix study run``): matplotlib PNGs beside one jinja2 page.

The page reads the tables of :mod:`atlasmix.study.tables` from the study folder and shows, in order:

1. a header (study name, runs, seeds, budgets, the headline metric explained);
2. the sanity checks of ``checks.json`` (passed / FAILED / not applicable);
3. ``<stem>_heatmap_means[_<i>].png``: mean over seeds of the headline metric, mixtures (rows) x
   eval sets (columns), the 95 % interval under each mean, undertrained runs marked with a dagger;
4. ``<stem>_heatmap_deltas[_<i>].png``: paired deltas mixture - reference of the same metric
   (diverging colours centred at 0), deltas whose interval excludes 0 in bold with an asterisk and
   a box;
5. ``<stem>_curves.png``: the training curve of every run (one panel per mixture, one line per seed);
6. ``<stem>_scaling[_<i>].png`` with the smallest-fraction table (only with a non-empty
   ``scaling.parquet``);
7. ``<stem>_baselines.png`` with a table: metrics that have a baseline (Geneformer rank prediction
   vs the mean-rank baseline); a score that does not beat its baseline is labelled
   :data:`NOT_BEATING` wherever it appears;
8. the summary and delta tables (pivoted per metric, then every row).

One figure per budget (and per reference) when a study has several. A PNG name carries the page's
stem (``report.html`` -> ``report_curves.png``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from atlasmix.errors import AtlasmixError
from atlasmix.evaluation.report import wrap_label
from atlasmix.study import tables as T

#: the headline metric (scFM-datamix reconstruction accuracy) and the model kind it belongs to
HEADLINE_METRIC = "recon_pearson_median"
HEADLINE_KIND = "ldvae"
#: label of a score that does not beat its metric's baseline (tables and figures alike)
NOT_BEATING = "does not beat its baseline"
#: at most this many panels per row of a small-multiples figure
MAX_COLS = 5

_FILES = {"summary.parquet": T.SUMMARY, "deltas.parquet": T.DELTAS, "curves.parquet": T.CURVES,
          "scaling.parquet": T.SCALING, "scaling_smallest.parquet": T.SCALING_SMALLEST,
          "results.parquet": T.RESULTS}

_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ title }}</title>
<style>
html { -webkit-text-size-adjust: 100%; }
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222;
       line-height: 1.4; overflow-wrap: break-word; }
h1 { margin-bottom: 0.2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.wrap { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.88em; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; vertical-align: top; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
td small { color: #555; white-space: nowrap; }
img { max-width: 100%; height: auto; border: 1px solid #eee; margin: 0.5em 0; display: block; }
code { overflow-wrap: anywhere; }
.note { color: #555; font-size: 0.9em; max-width: 60em; }
.failed td { background: #fde2e2; } .failed td.status { color: #b00000; font-weight: bold; }
.na td { color: #777; } .passed td.status { color: #1a6b1a; } td.status, td.mix { white-space: nowrap; }
.banner { padding: 0.5em 0.8em; border-radius: 4px; margin: 0.8em 0; }
.banner.bad { background: #fde2e2; border: 1px solid #e99; color: #800; }
.banner.good { background: #e5f4e5; border: 1px solid #9c9; }
.notbeat { color: #b00000; font-weight: bold; }
td.excl { font-weight: bold; background: #fff6d6; }
.dl { display: grid; grid-template-columns: max-content 1fr; gap: 0.1em 1em; margin: 0.5em 0; }
.dl dt { font-weight: bold; } .dl dd { margin: 0; }
nav ol { columns: 2; max-width: 50em; }
details summary { cursor: pointer; margin: 0.5em 0; }
</style></head><body>
<h1>{{ title }}</h1>
<dl class="dl">
<dt>study</dt><dd>{{ study_name | wbr }}</dd>
<dt>runs</dt><dd>{{ n_runs }}{% if run_detail %} ({{ run_detail }}){% endif %}</dd>
<dt>seeds</dt><dd>{{ seeds }}</dd>
<dt>budget{% if budgets|length > 1 %}s{% endif %}</dt><dd>{{ budgets | join(", ") }}</dd>
<dt>mixtures</dt><dd>{{ n_mixtures }}{% if reference %} (reference: <code>{{ reference }}</code>){% endif %}</dd>
<dt>eval sets</dt><dd>{{ n_eval_sets }}</dd>
<dt>folder</dt><dd><code>{{ study_dir }}</code></dd>
</dl>
<p class="note"><b>Headline metric</b> (<code>{{ metric }}</code>, {{ model_kind }}): scFM-datamix reconstruction
accuracy. For every cell of an eval set, the Pearson r between log1p(CP10k) of the observed counts and the
LDVAE's normalised expression, on that eval set's top 1,000 highly variable genes. The per-run statistic is the
median over cells; the table value is the mean of that median over seeds. Intervals are 95 % two-level bootstrap
intervals (seeds resampled, then cells within each seed's run). Deltas are paired (same seeds, same eval
cells) differences mixture &minus; reference.</p>
<nav><ol>{% for s in sections %}<li><a href="#{{ s.id }}">{{ s.title }}</a></li>{% endfor %}</ol></nav>

<h2 id="checks">Sanity checks</h2>
{% if checks %}
<div class="banner {{ 'bad' if n_failed else 'good' }}">{{ n_passed }} passed, <b>{{ n_failed }} FAILED</b>,
{{ n_na }} not applicable.{% if n_failed %} Read the failed checks before the results.{% endif %}</div>
<div class="wrap"><table>
<tr><th class="l">status</th><th class="l">check</th><th class="l">kind</th><th class="l">eval set</th>
<th class="l">subject</th><th class="l">detail</th></tr>
{% for c in checks %}<tr class="{{ c.css }}"><td class="l status">{{ c.status }}</td>
<td class="l">{{ c.name | wbr }}</td>
<td class="l">{{ c.kind }}</td><td class="l">{{ c.eval_set | wbr }}</td><td class="l">{{ c.subject | wbr }}</td>
<td class="l">{{ c.detail }}</td></tr>
{% endfor %}</table></div>
{% else %}<p class="note">No <code>checks.json</code> in the study folder.</p>{% endif %}

{% for fig in figures %}
<h2 id="{{ fig.id }}">{{ fig.title }}</h2>
<p class="note">{{ fig.caption }}</p>
<a href="{{ fig.file }}" title="open the full-size figure"><img src="{{ fig.file }}" alt="{{ fig.title }}"></a>
{% for tab in fig.tables %}<h3>{{ tab.title }}</h3>
{% if tab.note %}<p class="note">{{ tab.note }}</p>{% endif %}
<div class="wrap">{{ tab.html }}</div>{% endfor %}
{% endfor %}

{% for sec in table_sections %}
<h2 id="{{ sec.id }}">{{ sec.title }}</h2>
{% if sec.note %}<p class="note">{{ sec.note }}</p>{% endif %}
{% for tab in sec.tables %}<h3>{{ tab.title }}</h3>
<div class="wrap">{{ tab.html }}</div>{% endfor %}
{% if sec.long %}<details><summary>every row ({{ sec.long_n }})</summary>
<div class="wrap">{{ sec.long }}</div></details>{% endif %}
{% endfor %}
</body></html>
"""


# ---------------------------------------------------------------------------------------------- helpers
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _flag(v: Any) -> bool | None:
    """A True / False flag of a table, None for None / NA."""
    if v is None:
        return None
    try:
        if pd.isna(v):
            return None
    except (TypeError, ValueError):
        return None
    return bool(v)


def _false(v: Any) -> bool:
    """True for a False flag (not for None / NA)."""
    return _flag(v) is False


def _true(v: Any) -> bool:
    """True for a True flag (not for None / NA)."""
    return _flag(v) is True


def _fmt(v: Any, nd: int = 3) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return "" if v is None else str(v)
    return "" if not math.isfinite(f) else f"{f:.{nd}f}"


def _ci(lo: Any, hi: Any, nd: int = 3) -> str:
    a, b = _fmt(lo, nd), _fmt(hi, nd)
    return f"[{a}, {b}]" if a and b else ""


def _text_color(rgba) -> str:
    r, g, b = rgba[:3]
    return "k" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "w"


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=100, bbox_inches="tight", pad_inches=0.15)
    _plt().close(fig)


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


def _heatmap_size(rows: list, cols: list, label_lines: int) -> tuple[float, float]:
    """Figure size (in) of a rows x cols annotated heatmap: 1.25 in per column, 0.62 in per row, room
    for the row labels (0.07 in per character at 9 pt), wrapped column labels, a two-line title and
    the colour bar."""
    ylab = max((len(str(r)) for r in rows), default=0)
    w = 1.0 + 0.07 * ylab + 1.25 * len(cols) + 1.5
    h = 1.5 + 0.17 * label_lines + 0.62 * len(rows)
    return max(w, 6.0), max(h, 3.2)


def _grid(n: int) -> tuple[int, int]:
    ncols = min(MAX_COLS, max(1, n))
    return math.ceil(n / ncols), ncols


def _order(values, first: str | None = None) -> list:
    """Unique values in first-seen order, ``first`` moved to the front."""
    out = list(dict.fromkeys(v for v in values))
    if first is not None and first in out:
        out.remove(first)
        out.insert(0, first)
    return out


def _budgets(df: pd.DataFrame) -> list:
    return _order(df["budget"].astype(str)) if "budget" in df and not df.empty else []


# ---------------------------------------------------------------------------------------------- loading
def load_study(study_dir: str | Path) -> dict[str, Any]:
    """Read a study folder's tables.

    Parameters
    ----------
    study_dir : path
        The output folder of ``atlasmix study run``.

    Returns
    -------
    dict
        One DataFrame per table of :mod:`atlasmix.study.tables`, keyed by file stem (``summary``,
        ``deltas``, ``curves``, ``scaling``, ``scaling_smallest``, ``results``; an absent optional
        file gives an empty frame with the contract's columns; ``budget`` as str), ``checks`` (list
        of dicts, empty without ``checks.json``) and ``study`` (the ``study.json`` dict, or {}).

    Raises
    ------
    AtlasmixError
        No ``summary.parquet`` (not a study folder), or a table lacks columns of the contract.
    """
    d = Path(study_dir)
    if not (d / "summary.parquet").is_file():
        raise AtlasmixError(f"{d} is not a study output folder (no summary.parquet)")
    out: dict[str, Any] = {}
    for fname, cols in _FILES.items():
        p = d / fname
        if p.is_file():
            df = pd.read_parquet(p)
            missing = [c for c in cols if c not in df.columns]
            if missing:
                raise AtlasmixError(f"{p} lacks the columns {missing} of the study tables contract")
        else:
            df = pd.DataFrame(columns=cols)
        if "budget" in df.columns:
            df["budget"] = df["budget"].astype(str)
        out[fname.removesuffix(".parquet")] = df
    checks = []
    if (d / "checks.json").is_file():
        try:
            checks = json.loads((d / "checks.json").read_text())
        except json.JSONDecodeError as e:
            raise AtlasmixError(f"{d / 'checks.json'} is not valid JSON ({e})") from None
    out["checks"] = checks if isinstance(checks, list) else []
    study = {}
    if (d / "study.json").is_file():
        try:
            study = json.loads((d / "study.json").read_text())
        except json.JSONDecodeError as e:
            raise AtlasmixError(f"{d / 'study.json'} is not valid JSON ({e})") from None
    out["study"] = study if isinstance(study, dict) else {}
    return out


# ---------------------------------------------------------------------------------------------- figures
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
    d = summary[(summary["metric"] == metric) & (summary["model_kind"] == model_kind)]
    if budget is not None:
        d = d[d["budget"].astype(str) == str(budget)]
    d = d[np.isfinite(d["mean"].astype(float))]
    if d.empty:
        return None
    plt = _plt()
    rows, cols = _order(d["mixture"], reference), _order(d["eval_set"])
    idx = d.groupby(["mixture", "eval_set"]).agg(mean=("mean", "mean"), lo=("lo", "mean"), hi=("hi", "mean"),
                                                 under=("undertrained", lambda s: any(_true(v) for v in s)),
                                                 notbeat=("beats_baseline", lambda s: any(_false(v) for v in s)))
    M = np.full((len(rows), len(cols)), np.nan)
    for (m, e), r in idx.iterrows():
        M[rows.index(m), cols.index(e)] = r["mean"]
    xl = [wrap_label(c, 16) for c in cols]
    nl = max(s.count("\n") + 1 for s in xl)
    fig, ax = plt.subplots(figsize=_heatmap_size(rows, cols, nl), layout="constrained")
    im = ax.imshow(M, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), xl, fontsize=9)
    ax.tick_params(axis="x", top=True, labeltop=True, bottom=False, labelbottom=False)
    ax.set_yticks(range(len(rows)), rows, fontsize=9)
    under, notbeat = [], []
    for (m, e), r in idx.iterrows():
        i, j = rows.index(m), cols.index(e)
        if not np.isfinite(r["mean"]):
            continue
        c = _text_color(im.cmap(im.norm(r["mean"])))
        mark = ""
        if r["under"]:
            mark += "\u2020"
            under.append((m, e))
        if r["notbeat"]:
            mark += "\u2021"
            notbeat.append((m, e))
        ax.text(j, i - 0.12, f"{r['mean']:.3f}{mark}", ha="center", va="center", color=c, fontsize=9.5,
                fontweight="bold")
        ax.text(j, i + 0.22, _ci(r["lo"], r["hi"]), ha="center", va="center", color=c, fontsize=7)
    fig.colorbar(im, ax=ax, label=f"{metric}\n(mean over seeds)", shrink=0.9, pad=0.02)
    ax.set_ylabel("training mixture")
    notes = []
    if under:
        notes.append("\u2020 undertrained: the validation loss had not plateaued at the end of the budget")
    if notbeat:
        notes.append(f"\u2021 {NOT_BEATING}")
    ttl = f"{model_kind} {metric}" + (f", budget {budget}" if budget is not None else "")
    ax.set_title(ttl + ("\n" + "\n".join(notes) if notes else ""), fontsize=10, loc="left")
    _save(fig, Path(path))
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
    d = deltas[(deltas["metric"] == metric) & (deltas["model_kind"] == model_kind)]
    if budget is not None:
        d = d[d["budget"].astype(str) == str(budget)]
    d = d[np.isfinite(d["delta"].astype(float))]
    if d.empty:
        return None
    if reference is None:
        reference = str(d["reference"].iloc[0])
    d = d[d["reference"] == reference]
    if d.empty:
        return None
    plt = _plt()
    from matplotlib.patches import Rectangle

    rows, cols = _order(d["mixture"]), _order(d["eval_set"])
    M = np.full((len(rows), len(cols)), np.nan)
    for r in d.itertuples():
        M[rows.index(r.mixture), cols.index(r.eval_set)] = r.delta
    lim = float(np.nanmax(np.abs(np.r_[M.ravel(), d["lo"].astype(float), d["hi"].astype(float)])))
    lim = lim if np.isfinite(lim) and lim > 0 else 1.0
    xl = [wrap_label(c, 16) for c in cols]
    nl = max(s.count("\n") + 1 for s in xl)
    fig, ax = plt.subplots(figsize=_heatmap_size(rows, cols, nl), layout="constrained")
    im = ax.imshow(M, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    ax.set_xticks(range(len(cols)), xl, fontsize=9)
    ax.tick_params(axis="x", top=True, labeltop=True, bottom=False, labelbottom=False)
    ax.set_yticks(range(len(rows)), rows, fontsize=9)
    marked = []
    for r in d.itertuples():
        i, j = rows.index(r.mixture), cols.index(r.eval_set)
        c = _text_color(im.cmap(im.norm(r.delta)))
        ex = _true(r.excludes_zero)
        if ex:
            marked.append((r.mixture, r.eval_set))
            ax.add_patch(Rectangle((j - 0.46, i - 0.44), 0.92, 0.88, fill=False, lw=2.0, ec="k"))
        ax.text(j, i - 0.12, f"{r.delta:+.3f}{'*' if ex else ''}", ha="center", va="center", color=c,
                fontsize=9.5 if ex else 9, fontweight="bold" if ex else "normal")
        ax.text(j, i + 0.22, _ci(r.lo, r.hi), ha="center", va="center", color=c, fontsize=7)
    fig.colorbar(im, ax=ax, label=f"\u0394 {metric}\n(mixture \u2212 reference)", shrink=0.9, pad=0.02)
    ax.set_ylabel("training mixture")
    ttl = f"Paired delta vs reference '{reference}' ({model_kind})" + (f", budget {budget}" if budget else "")
    ax.set_title(ttl + "\n* boxed, bold: 95 % interval excludes 0", fontsize=10, loc="left")
    _save(fig, Path(path))
    return {"rows": rows, "cols": cols, "reference": reference, "marked": marked}


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
    Panels wrap into rows of at most :data:`MAX_COLS`; a panel is one (model kind, mixture,
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
        one eval set; :data:`NOT_BEATING`).

    Returns
    -------
    dict or None
        None without curves; else ``panels`` (titles) and ``train_fallback`` (run keys drawn from
        the training loss).
    """
    if curves.empty:
        return None
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    c = curves.copy()
    c["_strategy"] = c["strategy"].astype(object).where(c["strategy"].notna(), "")
    c["_fraction"] = pd.to_numeric(c["fraction"], errors="coerce").fillna(-1.0)
    keys = ["model_kind", "mixture", "_strategy", "_fraction"]
    multi_kind = c["model_kind"].nunique() > 1
    groups = list(c.groupby(keys, sort=False))
    kinds = _order(c["model_kind"])
    mix_order = _order(c["mixture"], reference)
    groups.sort(key=lambda kv: (kinds.index(kv[0][0]), mix_order.index(kv[0][1]), kv[0][2], kv[0][3]))
    seeds = sorted(c["seed"].dropna().unique().tolist())
    colors = plt.get_cmap("tab10")
    budgets = _order(c["budget"].astype(str))
    nrows, ncols = _grid(len(groups))
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
        ax.set_title(wrap_label(title, 30), fontsize=8)
        ax.tick_params(labelsize=6.5)
        ax.xaxis.set_major_formatter(_count_formatter())
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.grid(alpha=0.3)
        lines = [ln.get_ydata() for ln in ax.get_lines()]
        if lines and all(np.nanmin(np.asarray(y, dtype=float)) > 0 for y in lines if len(y)):
            ax.set_yscale("log")  # the first points are 10x the plateau: a log axis shows the plateau
    for ax in axes.ravel()[len(groups):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("validation loss", fontsize=7.5)
    for j in range(ncols):  # x label under the lowest visible panel of each column
        vis = [i for i in range(nrows) if i * ncols + j < len(groups)]
        if vis:
            axes[vis[-1], j].set_xlabel("cells seen", fontsize=7.5)
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
    _save(fig, Path(path))
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
    plt = _plt()
    sets, strategies = _order(scaling["eval_set"]), _order(scaling["strategy"])
    nrows, ncols = _grid(len(sets))
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
        ax.set_title(wrap_label(e, 30), fontsize=8)
        ax.tick_params(labelsize=6.5)
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(sets):]:
        ax.set_visible(False)
    metric = str(scaling["metric"].iloc[0])
    for ax in axes[:, 0]:
        ax.set_ylabel(wrap_label(metric, 22), fontsize=8)
    for j in range(ncols):
        vis = [i for i in range(nrows) if i * ncols + j < len(sets)]
        if vis:
            axes[vis[-1], j].set_xlabel("fraction of the base corpus", fontsize=7.5)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors(k % 10), marker="o", ms=4, lw=1.5, label=st)
               for k, st in enumerate(strategies)]
    if smallest is not None and not smallest.empty:
        handles.append(Line2D([], [], color="grey", ls=":", label="smallest fraction within 95 % of the best"))
    fig.legend(handles=handles, loc="outside upper center", ncols=min(len(handles), 4), fontsize=8, frameon=False)
    _save(fig, Path(path))
    return {"panels": sets, "strategies": strategies}


def baseline_plot(summary: pd.DataFrame, path: str | Path) -> dict | None:
    """Scores of metrics that have a baseline, beside the baseline (dot plot, one row per score).

    One panel per (model kind, metric); a row is (mixture, eval set[, budget]): the mean with its
    interval (error bar) and the baseline (red cross). A row that does not beat its baseline is
    drawn grey and labelled :data:`NOT_BEATING` at the right of the panel.

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
    plt = _plt()
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
            bad = _false(r.beats_baseline)
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
    _save(fig, Path(path))
    return {"panels": names, "not_beating": notbeat}


# ---------------------------------------------------------------------------------------------- tables
def _esc(s: Any) -> str:
    from markupsafe import escape

    return str(escape("" if s is None else str(s)))


def _wbr(s: Any) -> str:
    """Escaped text with line-break opportunities after underscores and slashes."""
    return _esc(s).replace("_", "_<wbr>").replace("/", "/<wbr>")


def _pivot_html(d: pd.DataFrame, value: str, *, rows_first: str | None = None, mark: str | None = None,
                flags: bool = False, signed: bool = False) -> str:
    """Mixtures (rows) x eval sets (columns): value with ``[lo, hi]`` in small text beneath.

    ``mark``: a boolean column; marked cells get class ``excl`` and an asterisk. ``flags``:
    dagger for undertrained, the :data:`NOT_BEATING` label for beats_baseline False.
    """
    multi_b = d["budget"].nunique() > 1
    d = d.assign(row_label=d["mixture"].astype(str) + ((" @ " + d["budget"].astype(str)) if multi_b else ""))
    rows = _order(d["row_label"], rows_first)
    cols = _order(d["eval_set"])
    cell = {(r.row_label, r.eval_set): r for r in d.itertuples()}
    h = ['<table><tr><th class="l">mixture</th>' + "".join(f"<th>{_wbr(c)}</th>" for c in cols) + "</tr>"]
    for rw in rows:
        tds = []
        for c in cols:
            r = cell.get((rw, c))
            if r is None:
                tds.append("<td></td>")
                continue
            v = getattr(r, value)
            txt = _fmt(v)
            if signed and txt:
                txt = f"{float(v):+.3f}"
            cls = ""
            if mark and _true(getattr(r, mark)):
                cls, txt = ' class="excl"', txt + "*"
            extra = ""
            if flags:
                if _true(getattr(r, "undertrained")):
                    txt += "\u2020"
                if _false(getattr(r, "beats_baseline")):
                    extra = f'<br><span class="notbeat">{NOT_BEATING}</span>'
            tds.append(f"<td{cls}>{txt}<br><small>{_ci(r.lo, r.hi)}</small>{extra}</td>")
        h.append(f'<tr><td class="l mix">{_esc(rw)}</td>' + "".join(tds) + "</tr>")
    h.append("</table>")
    return "\n".join(h)


def _long_html(df: pd.DataFrame, cols: list[str], *, notbeat: bool = False, mark: str | None = None) -> str:
    h = ["<table><tr>" + "".join(f'<th class="{"l" if df[c].dtype == object else ""}">{_wbr(c)}</th>'
                                 for c in cols) + ("<th class=\"l\">label</th>" if notbeat else "") + "</tr>"]
    for r in df.itertuples(index=False):
        rd = r._asdict()
        cls = ' class="excl"' if mark and _true(rd.get(mark)) else ""
        tds = []
        for c in cols:
            v = rd[c]
            if isinstance(v, (float, np.floating)):
                tds.append(f"<td>{_fmt(v)}</td>")
            elif isinstance(v, (bool, np.bool_)) or v is None:
                tds.append(f'<td class="l">{"" if v is None else str(bool(v))}</td>')
            else:
                tds.append(f'<td class="l">{_wbr(v)}</td>' if isinstance(v, str) else f"<td>{_esc(v)}</td>")
        if notbeat:
            tds.append(f'<td class="l"><span class="notbeat">{NOT_BEATING}</span></td>'
                       if _false(rd.get("beats_baseline")) else "<td></td>")
        h.append(f"<tr{cls}>" + "".join(tds) + "</tr>")
    h.append("</table>")
    return "\n".join(h)


def _baseline_table(d: pd.DataFrame) -> str:
    """Rows of one (model kind, metric): mixture, eval set, [budget], seeds, score, interval, baseline, verdict."""
    multi_b = d["budget"].nunique() > 1
    h = ['<table><tr><th class="l">mixture</th><th class="l">eval set</th>' +
         ('<th class="l">budget</th>' if multi_b else "") +
         "<th>seeds</th><th>score</th><th>95 % interval</th><th>baseline</th><th class=\"l\">verdict</th></tr>"]
    for r in d.itertuples():
        verdict = (f'<span class="notbeat">{NOT_BEATING}</span>' if _false(r.beats_baseline)
                   else "beats its baseline" if _true(r.beats_baseline) else "")
        h.append(f'<tr><td class="l">{_wbr(r.mixture)}</td><td class="l">{_wbr(r.eval_set)}</td>' +
                 (f'<td class="l">{_esc(r.budget)}</td>' if multi_b else "") +
                 f"<td>{_esc(r.n_seeds)}</td><td>{_fmt(r.mean)}</td><td><small>{_ci(r.lo, r.hi)}</small></td>"
                 f'<td>{_fmt(r.baseline)}</td><td class="l">{verdict}</td></tr>')
    h.append("</table>")
    return "\n".join(h)


def _checks(raw: list) -> list[dict]:
    out = []
    for c in raw:
        if not isinstance(c, dict):
            continue
        if c.get("applicable") is False:
            status, css = "not applicable", "na"
        elif c.get("passed") is True:
            status, css = "passed", "passed"
        else:
            status, css = "FAILED", "failed"
        out.append({"status": status, "css": css, **{k: "" if c.get(k) is None else c.get(k) for k in T.CHECK_KEYS}})
    return out


# ---------------------------------------------------------------------------------------------- the page
def render_study_report(study_dir: str | Path, out: str | Path | None = None, title: str = "atlasmix study", *,
                        metric: str = HEADLINE_METRIC, model_kind: str = HEADLINE_KIND) -> dict:
    """Write the HTML report of a study and its PNG figures.

    Parameters
    ----------
    study_dir : path
        Output folder of ``atlasmix study run`` (tables of :mod:`atlasmix.study.tables`; only
        ``summary.parquet`` is required, a figure whose table is absent or empty is left out).
    out : path, optional
        The HTML file (default ``study_dir/report.html``); PNGs are written beside it, named
        ``<stem>_<figure>.png`` (module doc).
    title : str
        Page title.
    metric, model_kind : str
        The headline metric of the heatmaps (default scFM-datamix reconstruction accuracy of the
        LDVAE, ``recon_pearson_median``).

    Returns
    -------
    dict
        ``html`` (Path) and ``figures`` (list of PNG Paths, in page order).

    Raises
    ------
    AtlasmixError
        ``study_dir`` is not a study folder (no ``summary.parquet``), a table lacks contract
        columns, or a JSON file is malformed.
    """
    from jinja2 import Environment
    from markupsafe import Markup

    sdir = Path(study_dir)
    t = load_study(sdir)
    out = Path(out) if out is not None else sdir / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.stem
    summ, dl, cur, sc, scs, res = (t["summary"], t["deltas"], t["curves"], t["scaling"], t["scaling_smallest"],
                                   t["results"])
    spec = t["study"].get("spec", {}) if isinstance(t["study"].get("spec"), dict) else {}
    reference = spec.get("reference") or (str(dl["reference"].iloc[0]) if not dl.empty else None)

    figs: list[dict] = []
    files: list[Path] = []

    def fig_path(name: str, i: int, n: int) -> Path:
        return out.parent / (f"{stem}_{name}.png" if n == 1 else f"{stem}_{name}_{i}.png")

    def add(p: Path, fid: str, ftitle: str, caption: str, tables: list | None = None) -> None:
        figs.append({"id": fid, "title": ftitle, "caption": caption, "file": p.name, "tables": tables or []})
        files.append(p)

    # heatmap of means, one per budget
    hb = _budgets(summ[(summ["metric"] == metric) & (summ["model_kind"] == model_kind)])
    for i, b in enumerate(hb):
        p = fig_path("heatmap_means", i, len(hb))
        info = mean_heatmap(summ, p, metric=metric, model_kind=model_kind, budget=b, reference=reference)
        if info:
            cap = (f"Mean over seeds of {metric} ({model_kind}) with its 95 % interval [lo, hi] beneath, budget {b}."
                   + (" \u2020: undertrained runs (the validation loss had not plateaued); compare them with care."
                      if info["undertrained"] else "")
                   + (f" \u2021: {NOT_BEATING}." if info["not_beating"] else ""))
            add(p, f"means{i}",
                "Headline metric: mixtures \u00d7 eval sets" + (f" (budget {b})" if len(hb) > 1 else ""), cap)
    # deltas, one per (budget, reference)
    dsel = dl[(dl["metric"] == metric) & (dl["model_kind"] == model_kind)]
    combos = list(dict.fromkeys(zip(dsel["budget"].astype(str), dsel["reference"].astype(str))))
    for i, (b, ref) in enumerate(combos):
        p = fig_path("heatmap_deltas", i, len(combos))
        info = delta_heatmap(dl, p, metric=metric, model_kind=model_kind, budget=b, reference=ref)
        if info:
            add(p, f"deltas{i}", f"Paired deltas vs the reference {ref}" + (f" (budget {b})" if len(hb) > 1 else ""),
                f"Mean over seeds of the paired difference {metric}(mixture) \u2212 {metric}({ref}) on the same "
                f"eval cells, with its 95 % interval. Red: better than the reference, blue: worse. Boxed, bold, "
                f"with an asterisk: the interval excludes 0 ({len(info['marked'])} of "
                f"{int(np.isfinite(dsel[dsel['budget'].astype(str) == b]['delta'].astype(float)).sum())} cells).")
    # curves
    p = out.parent / f"{stem}_curves.png"
    under = {(r.model_kind, r.mixture) for r in summ.itertuples() if _true(r.undertrained)}
    notbeat = {(r.model_kind, r.mixture) for r in summ.itertuples() if _false(r.beats_baseline)}
    info = curves_plot(cur, p, reference=reference, undertrained=under, not_beating=notbeat)
    if info:
        add(p, "curves", "Training curves of every run",
            f"{cur['run_key'].nunique()} runs; one panel per mixture, one colour per seed; y: validation loss (log axis) "
            "against cells seen" + (f"; dashed: training loss of the {len(info['train_fallback'])} run(s) without "
                                   "a validation split" if info["train_fallback"] else "")
            + ("; \u2020: undertrained" if any("\u2020" in t for t in info["panels"]) else "")
            + (f"; \u2021: {NOT_BEATING} on at least one eval set" if any("\u2021" in t for t in info["panels"])
               else "") + ".")
    # scaling
    if not sc.empty:
        gkeys = ["model_kind", "base", "budget", "metric"]
        groups = list(sc.groupby(gkeys, sort=False))
        for i, (k, g) in enumerate(groups):
            p = fig_path("scaling", i, len(groups))
            sm = scs
            for col, v in zip(gkeys, k):
                sm = sm[sm[col].astype(str) == str(v)]
            if scaling_plot(g, p, smallest=sm):
                tabs = []
                if not sm.empty:
                    piv = sm.pivot_table(index="strategy", columns="eval_set", values="smallest_fraction",
                                         aggfunc="first", sort=False)
                    h = ['<table><tr><th class="l">strategy</th>' + "".join(f"<th>{_wbr(c)}</th>" for c in piv.columns)
                         + "</tr>"]
                    for st, r in piv.iterrows():
                        best = sm[sm["strategy"] == st].set_index("eval_set")
                        h.append(f'<tr><td class="l">{_wbr(st)}</td>' + "".join(
                            f"<td>{'' if not np.isfinite(v) else f'{v:g}'}<br><small>best "
                            f"{_fmt(best['best_mean'].get(c))}</small></td>" for c, v in r.items()) + "</tr>")
                    h.append("</table>")
                    tabs.append({"title": "Smallest fraction within 95 % of the best score",
                                 "note": "Per strategy and eval set: the smallest fraction whose mean reaches 95 % "
                                         "of the best mean over fractions (best mean beneath).",
                                 "html": Markup("\n".join(h))})
                add(p, f"scaling{i}", f"Subset-size scaling of {k[1]}" + (f" ({k[0]}, {k[3]})" if len(groups) > 1
                                                                             else ""),
                    f"{k[0]} {k[3]}, budget {k[2]}: mean over seeds (line) and 95 % interval (band) by fraction of "
                    f"the base corpus {k[1]}, one line per subsampling strategy; dotted: the smallest fraction "
                    "within 95 % of the best.", tabs)
    # baselines
    bl = summ[np.isfinite(pd.to_numeric(summ["baseline"], errors="coerce").astype(float))]
    if not bl.empty:
        p = out.parent / f"{stem}_baselines.png"
        info = baseline_plot(summ, p)
        if info:
            n_bad = len(info["not_beating"])
            add(p, "baselines", "Models with a baseline",
                "Score (dot, 95 % interval) beside its baseline (red cross), e.g. Geneformer rank prediction vs "
                f"the mean-rank baseline. {n_bad} of {len(bl)} scores are labelled \u201c{NOT_BEATING}\u201d: "
                "such a score is no evidence that the model learned anything its baseline does not know.",
                [{"title": f"Scores and baselines: {k}, {m}", "note": "", "html": Markup(_baseline_table(g))}
                 for (k, m), g in bl.groupby(["model_kind", "metric"], sort=False)])

    # tables
    sections = []
    stabs = []
    for (k, m), g in summ.groupby(["model_kind", "metric"], sort=False):
        stabs.append({"title": f"{k}: {m}", "html": Markup(_pivot_html(g, "mean", rows_first=reference, flags=True))})
    sections.append({"id": "summary", "title": "Summary: means over seeds with 95 % intervals",
                     "note": "Mean [lo, hi] per mixture and eval set; \u2020 undertrained; rows with a baseline that "
                             f"they do not beat are labelled \u201c{NOT_BEATING}\u201d.",
                     "tables": stabs, "long": Markup(_long_html(summ, T.SUMMARY, notbeat=True)), "long_n": len(summ)})
    if not dl.empty:
        dtabs = []
        for (k, m, ref), g in dl.groupby(["model_kind", "metric", "reference"], sort=False):
            dtabs.append({"title": f"{k}: {m}, vs {ref}",
                          "html": Markup(_pivot_html(g, "delta", mark="excludes_zero", signed=True))})
        sections.append({"id": "delta_table", "title": "Paired deltas vs the reference",
                         "note": "Delta [lo, hi]; bold on yellow with an asterisk: the 95 % interval excludes 0.",
                         "tables": dtabs, "long": Markup(_long_html(dl, T.DELTAS, mark="excludes_zero")),
                         "long_n": len(dl)})

    checks = _checks(t["checks"])
    runs = t["study"].get("grid") if isinstance(t["study"].get("grid"), list) else None
    if runs:
        n_runs = len(runs)
        st = pd.Series([r.get("status") for r in runs if isinstance(r, dict)]).value_counts()
        run_detail = ", ".join(f"{n} {s}" for s, n in st.items()) if len(st) else ""
    else:
        keys = pd.concat([res["run_key"], cur["run_key"]]).dropna()
        n_runs, run_detail = keys.nunique(), ""
    seeds = sorted(pd.concat([res["seed"], cur["seed"]]).dropna().unique().tolist()) or spec.get("seeds") or []
    budgets = _budgets(summ) or [str(b) for b in spec.get("budgets", [])]
    env = Environment(autoescape=True)
    env.filters["wbr"] = lambda s: Markup(_wbr(s))
    toc = [{"id": "checks", "title": "Sanity checks"}] + [{"id": f["id"], "title": f["title"]} for f in figs] + \
          [{"id": s["id"], "title": s["title"]} for s in sections]
    page = env.from_string(_TEMPLATE).render(
        title=title, study_name=spec.get("name") or t["study"].get("name") or sdir.name, n_runs=n_runs,
        run_detail=run_detail, seeds=", ".join(f"{s:g}" if isinstance(s, float) else str(s) for s in seeds),
        budgets=budgets, n_mixtures=summ["mixture"].nunique(), reference=reference,
        n_eval_sets=summ["eval_set"].nunique(), study_dir=str(sdir), metric=metric, model_kind=model_kind,
        sections=toc, checks=checks, n_passed=sum(c["css"] == "passed" for c in checks),
        n_failed=sum(c["css"] == "failed" for c in checks), n_na=sum(c["css"] == "na" for c in checks),
        figures=figs, table_sections=sections)
    out.write_text(page)
    return {"html": out, "figures": files}
