"""HTML report of an evaluation (``atlasmix eval report``): matplotlib PNGs beside a jinja2 page.

Figures
-------
``heatmap_reconstruction.png``
    median per-cell Pearson r, mixtures (rows) x eval sets (columns), as Figure 2 of scFM-datamix
    (several models of one mixture, e.g. seeds, are averaged; the annotation is the value)
``per_cell_<i>.png``
    per eval set: per-cell r distributions (box plots) by model
``few_shot.png``
    few-shot macro F1 vs training fraction (mean +- sd over seeds), one panel per eval set, one line per
    model
``embedding_metrics.png``
    kNN macro F1 by model and eval set (grouped bars), chance marked
``rank_prediction.png``
    Geneformer models only: median per-cell rank prediction score of each model and of the mean-rank
    baseline, per eval set (with a table)

Models without a reconstruction output (Geneformer) are absent from the heatmap and the per-cell
box plots (an eval set with no reconstruction score gets no box plot).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from atlasmix.errors import AtlasmixError
from atlasmix.evaluation.plotting import pyplot, save_figure, wrap_label

_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222;
       overflow-wrap: break-word; }
.wrap { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child, tbody th { text-align: left; }
td.def { text-align: left; overflow-wrap: anywhere; min-width: 16em; font-family: monospace; font-size: 0.9em; }
code { overflow-wrap: anywhere; }
img { max-width: 100%; height: auto; border: 1px solid #eee; margin: 0.5em 0; display: block; }
.note { color: #555; font-size: 0.9em; }
</style></head><body>
<h1>{{ title }}</h1>
<p class="note">{{ n_models }} model(s), {{ n_sets }} eval set(s). Results: <code>{{ results_dir }}</code>.
Reconstruction accuracy follows scFM-datamix: per-cell Pearson r between log1p(CP10k) of the observed
counts and log1p of the model's normalised expression at library size 10,000, on each eval set's top
1,000 HVGs (seurat flavour). Classification follows sc-foundation-eval (kNN k=5 on a 50/50 split;
few-shot L1 logistic regression).</p>
{% for fig in figures %}
<h2>{{ fig.title }}</h2>
<p class="note">{{ fig.caption }}</p>
<a href="{{ fig.file }}" title="open the full-size figure"><img src="{{ fig.file }}" alt="{{ fig.title }}"></a>
{% endfor %}
{% for tab in tables %}
<h2>{{ tab.title }}</h2>
<div class="wrap">{{ tab.html | safe }}</div>
{% endfor %}
<h2>Eval sets</h2>
<div class="wrap"><table><tr><th>eval set</th><th>kind</th><th>cells</th><th>definition</th></tr>
{% for e in eval_sets %}<tr><td>{{ e.name }}</td><td>{{ e.kind }}</td><td>{{ e.n_cells }}</td><td class="def">{{ e.definition }}</td></tr>
{% endfor %}</table></div>
</body></html>
"""


def _legend_outside(ax, **kw) -> None:
    """The legend of ``ax`` to the right of the axes, never over the data."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8, frameon=False, **kw)


def heatmap(res: pd.DataFrame, path: Path) -> bool:
    """Median reconstruction accuracy, mixtures x eval sets; False when there is nothing to plot."""
    d = res[res["metric"] == "recon_pearson_median"]
    if d.empty:
        return False
    plt = pyplot()
    tab = d.pivot_table(index="mixture", columns="eval_set", values="value", aggfunc="mean")
    fig, ax = plt.subplots(figsize=(3.5 + 1.3 * tab.shape[1], 1.6 + 0.6 * tab.shape[0]))
    im = ax.imshow(tab.to_numpy(), cmap="viridis", aspect="auto")
    ax.set_xticks(range(tab.shape[1]), [wrap_label(c) for c in tab.columns], rotation=35, ha="right",
                  rotation_mode="anchor", fontsize=9)
    ax.set_yticks(range(tab.shape[0]), tab.index, fontsize=9)
    for i in range(tab.shape[0]):
        for j in range(tab.shape[1]):
            v = tab.iat[i, j]
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < np.nanmean(tab.to_numpy()) else "k")
    fig.colorbar(im, ax=ax, label="median per-cell Pearson r")
    ax.set_xlabel("eval set")
    ax.set_ylabel("training mixture")
    save_figure(fig, path, dpi=110)
    return True


def per_cell_boxplot(pc: pd.DataFrame, eval_set: str, path: Path) -> bool:
    """Per-cell r distributions of one eval set, one box per model; False when no model has one.

    A tick label is the model name, wrapped, with its mixture beneath when the name does not already
    contain it, rotated 35 degrees; the figure widens by 0.7 in per model.
    """
    d = pc[(pc["eval_set"] == eval_set) & np.isfinite(pc["pearson_r"].astype(float))]
    if d.empty:
        return False
    plt = pyplot()
    models = sorted(d["model"].unique())
    data = [d.loc[d["model"] == m, "pearson_r"].to_numpy() for m in models]
    labels = []
    for m in models:
        mix = str(d.loc[d["model"] == m, "mixture"].iloc[0])
        lab = wrap_label(m, 22)
        if mix and mix not in str(m):
            lab += "\n(" + wrap_label(mix, 22).replace("\n", "\n ") + ")"
        labels.append(lab)
    fig, ax = plt.subplots(figsize=(max(4.5, 0.7 * len(models) + 2.5), 3.6))
    ax.boxplot(data, showfliers=False)
    ax.set_xticks(range(1, len(models) + 1), labels, fontsize=7.5, rotation=35, ha="right", rotation_mode="anchor")
    ax.set_ylabel("per-cell Pearson r (top 1,000 HVGs)")
    ax.set_title(f"{eval_set}: {len(d['cell_id'].unique()):,} cells")
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path, dpi=110)
    return True


def few_shot_plot(fs: pd.DataFrame, path: Path) -> bool:
    """Few-shot macro F1 curves; False when there are none."""
    if fs.empty:
        return False
    plt = pyplot()
    sets = sorted(fs["eval_set"].unique())
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 3.6), squeeze=False, layout="constrained")
    models = sorted(fs["model"].unique())
    colors = plt.get_cmap("tab20" if len(models) > 10 else "tab10")
    for ax, e in zip(axes[0], sets):
        d = fs[fs["eval_set"] == e]
        for m, g in d.groupby("model"):
            s = g.groupby("fraction")["macro_f1"].agg(["mean", "std"]).reset_index()
            ax.errorbar(s["fraction"], s["mean"], yerr=s["std"].fillna(0), marker="o", ms=4, capsize=3, label=m,
                        color=colors(models.index(m) % colors.N))
        ax.set_title(wrap_label(e, 30), fontsize=10)
        ax.set_xlabel("training fraction")
        ax.set_ylabel("macro F1 (test half)")
        ax.set_ylim(0, 1.02)
    handles, labels = axes[0, 0].get_legend_handles_labels()  # one legend for all panels, right of the last
    seen = dict(zip(labels, handles))
    for ax in axes[0, 1:]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    fig.legend(list(seen.values()), list(seen.keys()), loc="outside right upper", fontsize=8, frameon=False)
    save_figure(fig, path, dpi=110)
    return True


def knn_plot(res: pd.DataFrame, path: Path) -> bool:
    """kNN macro F1 per model and eval set (grouped bars) with the chance level."""
    d = res[res["metric"] == "knn_macro_f1"]
    if d.empty:
        return False
    plt = pyplot()
    tab = d.pivot_table(index="eval_set", columns="model", values="value")
    chance = res[res["metric"] == "chance_macro_f1"].groupby("eval_set")["value"].first()
    fig, ax = plt.subplots(figsize=(max(5, len(tab) * max(1.7, 0.25 * tab.shape[1] + 0.6) + 1.5), 3.6))
    w = 0.8 / tab.shape[1]
    colors = plt.get_cmap("tab20" if tab.shape[1] > 10 else "tab10")
    for k, m in enumerate(tab.columns):
        ax.bar(np.arange(len(tab)) + k * w, tab[m].to_numpy(), width=w, label=m, color=colors(k % colors.N))
    for i, e in enumerate(tab.index):
        if e in chance:
            ax.hlines(chance[e], i - w / 2 - 0.03, i + 0.8 - w / 2 + 0.03, colors="k", linestyles="dashed")
    ax.set_xticks(np.arange(len(tab)) + 0.4 - w / 2, [wrap_label(e, 22) for e in tab.index], fontsize=8.5)
    ax.set_xlim(-w / 2 - 0.15, len(tab) - 1 + 0.8 - w / 2 + 0.15)
    ax.set_ylabel("kNN (k=5) macro F1; dashed: 1/n types")
    ax.set_ylim(0, 1.02)
    _legend_outside(ax)
    save_figure(fig, path, dpi=110)
    return True


def rank_prediction_plot(res: pd.DataFrame, path: Path) -> bool:
    """Median rank prediction score per Geneformer model and eval set, beside the mean-rank baseline.

    A model's bar that is not above its own baseline's is labelled "does not beat its baseline".
    """
    d = res[res["metric"].isin(["rank_pred_pearson_median", "rank_pred_baseline_pearson_median"])]
    if d.empty:
        return False
    plt = pyplot()
    d = d.assign(series=np.where(d["metric"] == "rank_pred_pearson_median", d["model"], d["model"] + " mean-rank baseline"))
    tab = d.pivot_table(index="eval_set", columns="series", values="value")
    fig, ax = plt.subplots(figsize=(max(5, len(tab) * max(1.7, 0.35 * tab.shape[1] + 0.6) + 1.5), 3.6))
    w = 0.8 / tab.shape[1]
    x = np.arange(len(tab))
    for k, m in enumerate(tab.columns):
        ax.bar(x + k * w, tab[m].to_numpy(), width=w, label=m, hatch="//" if m.endswith("baseline") else None)
        base = f"{m} mean-rank baseline"
        if base in tab.columns:
            for i, (v, b) in enumerate(zip(tab[m].to_numpy(), tab[base].to_numpy())):
                if np.isfinite(v) and np.isfinite(b) and v <= b:  # above the pair (model, its baseline)
                    ax.text(x[i] + k * w + w / 2, max(v, b, 0) + 0.02, "does not beat\nits baseline", ha="center",
                            va="bottom", fontsize=6.5, color="#b00000", fontweight="bold", linespacing=1.0)
    ax.set_xticks(x + 0.4 - w / 2, [wrap_label(e, 22) for e in tab.index], fontsize=8.5)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylabel("median per-cell Pearson r\n(true vs predicted rank of masked genes)")
    ax.set_ylim(min(-0.1, float(np.nanmin(tab.to_numpy())) - 0.05), max(1.02, float(np.nanmax(tab.to_numpy())) + 0.15))
    _legend_outside(ax)
    save_figure(fig, path, dpi=110)
    return True


def _table_html(df: pd.DataFrame) -> str:
    return df.to_html(float_format=lambda v: f"{v:.3f}", na_rep="", border=0, escape=True)


def render_report(results: str | Path, out: str | Path, title: str = "atlasmix evaluation") -> dict:
    """Write ``out`` (HTML) and its PNGs (in the same folder) from an ``atlasmix eval run`` directory.

    Parameters
    ----------
    results : path
        Directory with ``results.parquet``, ``per_cell.parquet``, ``few_shot.csv``, ``evaluation.json``.
    out : path
        The HTML file; PNGs are written beside it, named ``<stem>_<figure>.png``.

    Returns
    -------
    dict
        ``html`` path and ``figures`` (PNG paths).

    Raises
    ------
    AtlasmixError
        ``results`` is not an evaluation directory.
    """
    from jinja2 import Environment

    rdir = Path(results)
    if not (rdir / "results.parquet").is_file():
        raise AtlasmixError(f"{rdir} is not an evaluation results directory (no results.parquet)")
    res = pd.read_parquet(rdir / "results.parquet")
    pc = pd.read_parquet(rdir / "per_cell.parquet") if (rdir / "per_cell.parquet").is_file() else pd.DataFrame()
    fs = pd.read_csv(rdir / "few_shot.csv") if (rdir / "few_shot.csv").is_file() else pd.DataFrame()
    doc = json.loads((rdir / "evaluation.json").read_text()) if (rdir / "evaluation.json").is_file() else {}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.stem
    figs, files = [], []

    def add(name: str, title: str, caption: str, fn, *args) -> None:
        p = out.parent / f"{stem}_{name}.png"
        if fn(*args, p) is not False:
            figs.append({"title": title, "caption": caption, "file": p.name})
            files.append(str(p))

    add("heatmap", "Reconstruction accuracy: mixtures x eval sets",
        "Median over cells of the per-cell Pearson r (scFM-datamix Figure 2 layout); models of one mixture averaged.",
        heatmap, res)
    if not pc.empty:
        for i, e in enumerate(sorted(pc["eval_set"].unique())):
            add(f"per_cell_{i}", f"Per-cell reconstruction accuracy: {e}",
                "Box: quartiles; whiskers: 1.5 IQR; outliers not drawn.", per_cell_boxplot, pc, e)
    add("few_shot", "Few-shot cell-type classification",
        "L1 logistic regression (liblinear, C by 5-fold CV) on growing fractions of the training half; mean +- sd over seeds.",
        few_shot_plot, fs)
    add("knn", "kNN cell-type classification", "k = 5, seeded stratified 50/50 split.", knn_plot, res)
    add("rank_prediction", "Rank prediction (Geneformer MLM head)",
        "Per cell, 15% of the gene tokens are masked; the masked genes are ordered by the model's expected position "
        "(or by their mean position over the eval set: the mean-rank baseline) and the score is the Pearson r "
        "between true and predicted positions (sc-foundation-eval). Median over the scored cells.",
        rank_prediction_plot, res)

    tables = []
    rec = res[res["metric"].isin(["recon_pearson_median", "recon_pearson_iqr", "recon_r2_median"])]
    if not rec.empty:
        tables.append({"title": "Reconstruction accuracy (median, IQR)",
                       "html": _table_html(rec.pivot_table(index=["model", "mixture"], columns=["eval_set", "metric"],
                                                           values="value"))})
    emb = res[res["metric"].isin(["knn_accuracy", "knn_macro_f1", "few_shot_macro_f1_f1", "nmi", "ari", "silhouette_label"])]
    if not emb.empty:
        tables.append({"title": "Embedding metrics", "html": _table_html(
            emb.pivot_table(index=["eval_set", "model"], columns="metric", values="value"))})
    rp = res[res["metric"].isin(["rank_pred_pearson_median", "rank_pred_pearson_iqr",
                                 "rank_pred_baseline_pearson_median", "rank_pred_minus_baseline_median",
                                 "rank_pred_n_cells_scored"])]
    if not rp.empty:
        tables.append({"title": "Rank prediction (Geneformer; per-cell Pearson r of masked gene ranks)",
                       "html": _table_html(rp.pivot_table(index=["eval_set", "model"], columns="metric",
                                                          values="value"))})
    fid = res[res["metric"].str.startswith("rank_fidelity_")]
    if not fid.empty:
        tables.append({"title": "Rank-value-encoding fidelity (per eval set)", "html": _table_html(
            fid.assign(metric=fid["metric"].str.replace("rank_fidelity_", "", regex=False))
            .pivot_table(index="eval_set", columns="metric", values="value"))})
    sets = [{"name": e["name"], "kind": e["kind"], "n_cells": e["n_cells"],
             "definition": json.dumps(e.get("definition", {}))[:300]} for e in doc.get("eval_sets", [])]
    page = Environment(autoescape=True).from_string(_TEMPLATE).render(
        title=title, figures=figs, tables=tables, eval_sets=sets, results_dir=str(rdir),
        n_models=res.loc[res["model"] != "data", "model"].nunique(), n_sets=res["eval_set"].nunique())
    out.write_text(page)
    return {"html": str(out), "figures": files}
