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
   :data:`~atlasmix.study.report_format.NOT_BEATING` wherever it appears;
8. the summary and delta tables (pivoted per metric, then every row).

One figure per budget (and per reference) when a study has several. A PNG name carries the page's
stem (``report.html`` -> ``report_curves.png``). The figures are drawn by :mod:`atlasmix.study.figures`
and :mod:`atlasmix.study.curves`, the tables by :mod:`atlasmix.study.html_tables`; this module reads
the folder (:func:`load_study_tables`) and writes the page (:func:`render_study_report`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from jinja2 import Environment
from markupsafe import Markup

from atlasmix.errors import AtlasmixError
from atlasmix.study.curves import curves_plot, scaling_plot
from atlasmix.study.figures import baseline_plot, delta_heatmap, mean_heatmap
from atlasmix.study.html_tables import baseline_table, check_rows, long_html, pivot_html, smallest_fraction_table
from atlasmix.study.report_format import NOT_BEATING, budgets_of, is_false, is_true, wbr
from atlasmix.study.tables import (CURVES, DELTAS, HEADLINE_KIND, HEADLINE_METRIC, RESULTS, SCALING,
                                   SCALING_SMALLEST, SUMMARY)

_FILES = {"summary.parquet": SUMMARY, "deltas.parquet": DELTAS, "curves.parquet": CURVES,
          "scaling.parquet": SCALING, "scaling_smallest.parquet": SCALING_SMALLEST,
          "results.parquet": RESULTS}

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


def load_study_tables(study_dir: str | Path) -> dict[str, Any]:
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


def _figures(t: dict, out: Path, metric: str, model_kind: str, reference: str | None) -> tuple[list, list]:
    """Write the report's PNGs beside ``out``; (figure sections of the page, PNG paths), in page order."""
    stem = out.stem
    summ, dl, cur, sc, scs = t["summary"], t["deltas"], t["curves"], t["scaling"], t["scaling_smallest"]
    figs: list[dict] = []
    files: list[Path] = []

    def fig_path(name: str, i: int, n: int) -> Path:
        return out.parent / (f"{stem}_{name}.png" if n == 1 else f"{stem}_{name}_{i}.png")

    def add(p: Path, fid: str, ftitle: str, caption: str, tables: list | None = None) -> None:
        figs.append({"id": fid, "title": ftitle, "caption": caption, "file": p.name, "tables": tables or []})
        files.append(p)

    # heatmap of means, one per budget
    hb = budgets_of(summ[(summ["metric"] == metric) & (summ["model_kind"] == model_kind)])
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
    under = {(r.model_kind, r.mixture) for r in summ.itertuples() if is_true(r.undertrained)}
    notbeat = {(r.model_kind, r.mixture) for r in summ.itertuples() if is_false(r.beats_baseline)}
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
                tabs = [] if sm.empty else [{
                    "title": "Smallest fraction within 95 % of the best score",
                    "note": "Per strategy and eval set: the smallest fraction whose mean reaches 95 % of the best "
                            "mean over fractions (best mean beneath).",
                    "html": Markup(smallest_fraction_table(sm))}]
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
                [{"title": f"Scores and baselines: {k}, {m}", "note": "", "html": Markup(baseline_table(g))}
                 for (k, m), g in bl.groupby(["model_kind", "metric"], sort=False)])

    return figs, files


def _table_sections(summ: pd.DataFrame, dl: pd.DataFrame, reference: str | None) -> list[dict]:
    """The summary and delta table sections of the page."""
    sections = []
    stabs = []
    for (k, m), g in summ.groupby(["model_kind", "metric"], sort=False):
        stabs.append({"title": f"{k}: {m}", "html": Markup(pivot_html(g, "mean", rows_first=reference, flags=True))})
    sections.append({"id": "summary", "title": "Summary: means over seeds with 95 % intervals",
                     "note": "Mean [lo, hi] per mixture and eval set; \u2020 undertrained; rows with a baseline that "
                             f"they do not beat are labelled \u201c{NOT_BEATING}\u201d.",
                     "tables": stabs, "long": Markup(long_html(summ, SUMMARY, notbeat=True)), "long_n": len(summ)})
    if not dl.empty:
        dtabs = []
        for (k, m, ref), g in dl.groupby(["model_kind", "metric", "reference"], sort=False):
            dtabs.append({"title": f"{k}: {m}, vs {ref}",
                          "html": Markup(pivot_html(g, "delta", mark="excludes_zero", signed=True))})
        sections.append({"id": "delta_table", "title": "Paired deltas vs the reference",
                         "note": "Delta [lo, hi]; bold on yellow with an asterisk: the 95 % interval excludes 0.",
                         "tables": dtabs, "long": Markup(long_html(dl, DELTAS, mark="excludes_zero")),
                         "long_n": len(dl)})

    return sections


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
    sdir = Path(study_dir)
    t = load_study_tables(sdir)
    out = Path(out) if out is not None else sdir / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    summ, dl, cur, res = t["summary"], t["deltas"], t["curves"], t["results"]
    spec = t["study"].get("spec", {}) if isinstance(t["study"].get("spec"), dict) else {}
    reference = spec.get("reference") or (str(dl["reference"].iloc[0]) if not dl.empty else None)

    figs, files = _figures(t, out, metric, model_kind, reference)
    sections = _table_sections(summ, dl, reference)

    checks = check_rows(t["checks"])
    runs = t["study"].get("grid") if isinstance(t["study"].get("grid"), list) else None
    if runs:
        n_runs = len(runs)
        st = pd.Series([r.get("status") for r in runs if isinstance(r, dict)]).value_counts()
        run_detail = ", ".join(f"{n} {s}" for s, n in st.items()) if len(st) else ""
    else:
        keys = pd.concat([res["run_key"], cur["run_key"]]).dropna()
        n_runs, run_detail = keys.nunique(), ""
    seeds = sorted(pd.concat([res["seed"], cur["seed"]]).dropna().unique().tolist()) or spec.get("seeds") or []
    budgets = budgets_of(summ) or [str(b) for b in spec.get("budgets", [])]
    env = Environment(autoescape=True)
    env.filters["wbr"] = lambda s: Markup(wbr(s))
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
