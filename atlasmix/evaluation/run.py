"""Evaluate every model on every eval set; write one tidy results table and a per-cell table.

For each eval set (cells streamed in batches of ``batch_size``; nothing the size of the set is
held dense):

1. The eval set's *data* rows, independent of any model: rank-value-encoding fidelity
   (:func:`atlasmix.evaluation.metrics.rank_fidelity`) on a seeded subsample of at most
   ``max_fidelity_cells`` labelled cells over the set's top ``n_hvg_baseline`` HVGs.
2. The PCA baseline (model ``pca``): top ``n_hvg_baseline`` HVGs of the set's own gene axis
   (streaming seurat HVG statistics), incremental PCA, then the embedding metrics.
3. Every LDVAE: the set's counts aligned to the model's genes (missing zero-filled, extra dropped);
   pass 1 accumulates the HVG statistics on that axis (top ``n_hvg`` = 1,000 HVGs, scanpy seurat
   flavour on log1p CP10k, exact over all cells); pass 2 runs each batch through scvi-tools' public
   API (:meth:`~atlasmix.evaluation.models.LDVAEAdapter.reconstruction`: normalised expression from
   one posterior sample of z per cell, seeded by ``seed``, and the latent means), scores per-cell
   reconstruction accuracy (Pearson r, r^2) on those HVGs; then the embedding metrics on the latent.
4. Every Geneformer (:func:`~atlasmix.evaluation.pretrained_outputs.geneformer_outputs`): the set's
   counts on the model's vocabulary genes, with each cell's total counts over all its genes, rank
   value encoded as in pretraining; cell embedding = mean of the second-to-last hidden layer over the
   gene tokens, then the embedding metrics (cells without a vocabulary gene left out); on a seeded
   subsample of at most ``max_rank_cells`` cells, the masked rank prediction score of the MLM head
   and its mean-rank baseline (``rank_pred_*`` rows: median / IQR over cells). Reconstruction accuracy does not
   apply (no expression output). Store and external file sets alike.
5. Every scGPT / scBERT (:class:`~atlasmix.evaluation.pretrained.ScGPTAdapter`,
   :class:`~atlasmix.evaluation.pretrained.ScBERTAdapter`): the set's counts on the store genes behind
   the model's tokens, encoded as in pretraining (value binning / expression tokens), cell
   embeddings (scGPT ``<cls>``, scBERT the appended last position), then the embedding metrics
   (cells without a token left out); on a seeded subsample of at most ``max_rank_cells`` cells their
   pretraining task, masked value / token prediction, against a per-gene mean baseline
   (:func:`~atlasmix.evaluation.pretrained_outputs.masked_prediction_outputs`; ``masked_pred_*`` rows).

Embedding metrics, on cells whose cell type is known and has >= ``min_cells_per_type`` cells (and
only when >= 2 such types): kNN (k=5) accuracy / macro F1 on a seeded 50/50 split, the few-shot
curve (L1 logistic regression, fractions x seeds), NMI / ARI / cell-type silhouette.

Before any computation every (model, eval set) pair is checked for overlap with the model's
training manifest (train + validation cells), by soma_joinid and by cell count fingerprint (the
same cells stored twice under other joinids, :mod:`atlasmix.store.fingerprint`); an overlapping
pair is refused.

Outputs in ``out``
------------------
``results.parquet`` / ``results.csv``
    tidy: ``model, mixture, eval_set, metric, value``
``per_cell.parquet`` / ``per_cell.csv``
    ``model, mixture, eval_set, cell_id, soma_joinid, dataset_id, cell_type, batch_seen, pearson_r,
    r2``; with a Geneformer model also ``n_tokens, rank_pred_pearson, rank_pred_baseline_pearson`` (NaN
    outside the rank subsample and for other models; Geneformer rows have NaN ``pearson_r`` and empty
    ``batch_seen``)
``few_shot.csv``
    per (model, eval set, fraction, seed) rows
``evaluation.json``
    models, eval-set definitions, options, store identity, timings
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from atlasmix.errors import AtlasmixError
from atlasmix.evaluation import metrics as M
from atlasmix.evaluation.models import LDVAEAdapter, PCABaseline, load_model
from atlasmix.evaluation.overlap import check_overlap
from atlasmix.evaluation.pretrained import GeneformerAdapter, ScBERTAdapter, ScGPTAdapter
from atlasmix.evaluation.pretrained_outputs import cell_keys, geneformer_outputs, masked_prediction_outputs

RESULT_COLUMNS = ["model", "mixture", "eval_set", "metric", "value"]
#: per-cell columns of Geneformer models (NaN for other models' rows)
PER_CELL_GENEFORMER = ["n_tokens", "rank_pred_pearson", "rank_pred_baseline_pearson"]


def _rows(model: str, mixture: str, eval_set: str, d: dict, prefix: str = "") -> list[dict]:
    return [{"model": model, "mixture": mixture, "eval_set": eval_set, "metric": prefix + k, "value": float(v)}
            for k, v in d.items() if isinstance(v, (int, float, np.floating, np.integer))]


def hvg_columns(eval_set, feature_ids, n_top: int, batch_size: int) -> np.ndarray:
    """Column indices (into ``feature_ids``) of the set's top HVGs, from one streamed pass."""
    h = M.HVGStats(len(feature_ids))
    for _, m in eval_set.iter_counts(feature_ids, batch_size):
        h.update(m)
    return h.top_genes(n_top)


def embedding_metrics(emb: np.ndarray, labels: np.ndarray, *, k: int = 5, seed: int = 0,
                      fractions=M.FEW_SHOT_FRACTIONS, seeds=(0, 1, 2), min_cells: int = 10,
                      integration: bool = True) -> tuple[dict, pd.DataFrame]:
    """kNN, few-shot and integration metrics of an embedding on its labelled cells.

    Returns
    -------
    (dict, pandas.DataFrame)
        Flat metrics (empty when fewer than 2 usable cell types) and the few-shot rows.
    """
    ok = M.usable_labels(labels, min_cells=min_cells)
    y = np.asarray(labels).astype(str)[ok]
    if len(np.unique(y)) < 2:
        return {}, pd.DataFrame()
    X = emb[ok]
    out = {f"knn_{a}": v for a, v in M.knn_classification(X, y, k=k, seed=seed).items()
           if a in ("accuracy", "macro_f1")}
    out["n_labelled_cells"] = int(len(y))
    out["n_cell_types"] = int(len(np.unique(y)))
    out["chance_macro_f1"] = 1.0 / len(np.unique(y))
    fs = pd.DataFrame()
    if len(fractions) and len(seeds):
        fs = M.few_shot(X, y, fractions=fractions, seeds=seeds, split_seed=seed)
        for f, g in fs.groupby("fraction"):
            out[f"few_shot_accuracy_f{f:g}"] = float(g["accuracy"].mean())
            out[f"few_shot_macro_f1_f{f:g}"] = float(g["macro_f1"].mean())
    if integration:
        im = M.integration_metrics(X, y, seed=seed)
        out.update({k2: v for k2, v in im.items() if k2 != "backend"})
    return out, fs


def _fidelity(eval_set, genes: np.ndarray, max_cells: int, seed: int, batch_size: int, k: int) -> dict:
    """Rank fidelity on a seeded subsample of labelled cells (their counts over ``genes`` kept sparse)."""
    import scipy.sparse as sp

    ok = M.usable_labels(eval_set.obs["cell_type"].to_numpy(), min_cells=2)
    pos = np.flatnonzero(ok)
    if len(np.unique(eval_set.obs["cell_type"].to_numpy()[pos])) < 2:
        return {}
    pick = np.sort(np.random.default_rng(seed).permutation(pos)[:max_cells])
    parts = []
    for sl, m in eval_set.iter_counts(genes, batch_size):
        sel = pick[(pick >= sl.start) & (pick < sl.stop)] - sl.start
        if len(sel):
            parts.append(m[sel])
    counts = sp.vstack(parts).tocsr()
    return M.rank_fidelity(counts, eval_set.obs["cell_type"].to_numpy()[pick], k=k, max_cells=max_cells, seed=seed)


def _cells(e, m, **columns) -> pd.DataFrame:
    """Per-cell rows of model ``m`` on eval set ``e``: model, mixture, eval set, the cells' ids and cell
    type, then ``columns`` in order."""
    pc = e.obs[["cell_id", "soma_joinid", "dataset_id", "cell_type"]].copy()
    pc.insert(0, "eval_set", e.name)
    pc.insert(0, "mixture", m.mixture)
    pc.insert(0, "model", m.name)
    for k, v in columns.items():
        pc[k] = v
    return pc


def _geneformer_scores(m, e, labels: np.ndarray, **opts):
    """(metric rows, per-cell rows, embedding, its labels, log line) of a Geneformer on ``e``
    (:func:`~atlasmix.evaluation.pretrained_outputs.geneformer_outputs`)."""
    g = geneformer_outputs(m, e, **opts)
    ok = g["n_tokens"] > 0
    # no batch covariate, no reconstruction output
    pc = _cells(e, m, batch_seen=None, pearson_r=np.nan, r2=np.nan, n_tokens=g["n_tokens"],
                rank_pred_pearson=g["rank_pred"], rank_pred_baseline_pearson=g["rank_baseline"])
    s, sb = M.summarize(g["rank_pred"]), M.summarize(g["rank_baseline"])
    sd = M.summarize(g["rank_pred"] - g["rank_baseline"])
    d = {"rank_pred_pearson_median": s["median"], "rank_pred_pearson_iqr": s["iqr"],
         "rank_pred_pearson_mean": s["mean"], "rank_pred_baseline_pearson_median": sb["median"],
         "rank_pred_baseline_pearson_iqr": sb["iqr"], "rank_pred_minus_baseline_median": sd["median"],
         "rank_pred_n_cells_scored": s["n"], "rank_pred_mask_fraction": opts["mask_fraction"],
         "vocab_genes_in_set": g["vocab_genes_in_set"],
         "model_genes_missing_fraction": float(1 - g["vocab_genes_in_set"] / max(len(m.feature_ids), 1)),
         "no_token_cells_fraction": float(1 - ok.mean()),
         "tokens_per_cell_median": float(np.median(g["n_tokens"])),
         "truncated_cells_fraction": float(np.mean(g["n_expressed"] > g["n_tokens"]))}
    # cells without a vocabulary gene have no embedding: left out of the embedding metrics
    lab = np.where(ok, labels.astype(object), "unknown")
    return d, pc, np.nan_to_num(g["emb"], nan=0.0), lab, (
        lambda t: f"median rank prediction r = {s['median']:.3f} (mean-rank baseline {sb['median']:.3f}, "
                  f"{s['n']} cells), {t} s")


def _encoded_model_scores(m, e, labels: np.ndarray, *, batch_size: int, forward_batch_size: int,
                          max_cells: int | None, seed: int):
    """(metric rows, per-cell rows, embedding, its labels, log line) of an scGPT / scBERT on ``e``:
    embeddings of the cells encoded as in pretraining, masked prediction vs the per-gene mean baseline."""
    emb = np.full((e.n_cells, m.n_latent), np.nan, dtype=np.float32)
    n_tok = np.zeros(e.n_cells, dtype=np.int64)
    present = pd.Index(m.feature_ids).isin(e.feature_ids)
    keys = cell_keys(e)
    for sl, cnt in e.iter_counts(m.feature_ids, batch_size):
        for k in range(0, cnt.shape[0], forward_batch_size):
            part = slice(sl.start + k, min(sl.stop, sl.start + k + forward_batch_size))
            emb[part], n_tok[part] = m.embed_counts(cnt[k:k + forward_batch_size], keys[part])
    ok = n_tok > 0
    pc = _cells(e, m, batch_seen=None, pearson_r=np.nan, r2=np.nan, n_tokens=n_tok)
    mp = masked_prediction_outputs(m, e, batch_size=batch_size, forward_batch_size=forward_batch_size,
                                   max_cells=max_cells, seed=seed)
    s, sb = M.summarize(mp["pred"]), M.summarize(mp["baseline"])
    d = {"masked_pred_pearson_median": s["median"], "masked_pred_pearson_iqr": s["iqr"],
         "masked_pred_baseline_pearson_median": sb["median"],
         "masked_pred_minus_baseline_median": M.summarize(mp["pred"] - mp["baseline"])["median"],
         "masked_pred_n_cells_scored": mp["n_scored"], "model_genes_missing_fraction": float(1 - present.mean()),
         "no_token_cells_fraction": float(1 - ok.mean()), "tokens_per_cell_median": float(np.median(n_tok))}
    lab = np.where(ok, labels.astype(object), "unknown")
    return d, pc, np.nan_to_num(emb, nan=0.0), lab, lambda t: f"embeddings of {int(ok.sum())} cells, {t} s"


def _ldvae_scores(m, e, labels: np.ndarray, hv: np.ndarray, *, batch_size: int, seed: int):
    """(metric rows, per-cell rows, latent, its labels, log line) of an LDVAE on ``e``: reconstruction
    accuracy on the HVG columns ``hv`` (:meth:`~atlasmix.evaluation.models.LDVAEAdapter.reconstruction`)."""
    present = pd.Index(m.feature_ids).isin(e.feature_ids)
    codes, seen = m.batch_codes(e.obs)
    r, lat = m.reconstruction(e.iter_counts(m.feature_ids, batch_size), e.n_cells, codes, hv, seed=seed)
    pc = _cells(e, m, batch_seen=seen, pearson_r=r, r2=r * r)
    s, s2 = M.summarize(r), M.summarize(r * r)
    d = {"recon_pearson_median": s["median"], "recon_pearson_q25": s["q25"], "recon_pearson_q75": s["q75"],
         "recon_pearson_iqr": s["iqr"], "recon_pearson_mean": s["mean"], "recon_r2_median": s2["median"],
         "recon_r2_iqr": s2["iqr"], "recon_n_cells_scored": s["n"], "recon_n_hvg": len(hv),
         "model_genes_missing_fraction": float(1 - present.mean()), "batch_unseen_fraction": float(1 - seen.mean())}
    return d, pc, lat, labels, lambda t: f"median r = {s['median']:.3f} ({s['n']} cells, {t} s)"


def evaluate(model_dirs, eval_sets, out: str | Path, *, store=None, pca_baseline: bool = True,
             batch_size: int = 1024, n_hvg: int = 1000, n_hvg_baseline: int = 2000, n_pcs: int = 50,
             knn_k: int = 5, few_shot_fractions=M.FEW_SHOT_FRACTIONS, few_shot_seeds=(0, 1, 2),
             min_cells_per_type: int = 10, integration: bool = True, rank_fidelity: bool = True,
             max_fidelity_cells: int = 3000, sample_z: bool = False, max_rank_cells: int | None = 500,
             mask_fraction: float = 0.15, geneformer_batch_size: int = 32, seed: int = 0, device: str = "cpu",
             log: Callable[[str], None] = print) -> dict:
    """Evaluate every model on every eval set (module doc) and write the tables to ``out``.

    Parameters
    ----------
    model_dirs : sequence of path
        Model directories (:func:`atlasmix.evaluation.models.load_model`): LDVAE run dirs, Geneformer
        run dirs (``OUT``) or model dirs (``OUT/model``).
    eval_sets : sequence of EvalSet
        From :func:`atlasmix.evaluation.evalsets.load_eval_sets`.
    out : path
        Output directory (created; existing result files are replaced).
    store : atlasmix.store.Store, optional
        The store of the store eval sets (also used to check file sets against training sources).
    pca_baseline, rank_fidelity, integration : bool
        Include the PCA baseline, the rank-encoding fidelity rows, NMI/ARI/silhouette.
    batch_size : int
        Eval cells per streamed batch.
    n_hvg : int
        HVGs scored by the reconstruction metric (1,000 in scFM-datamix).
    n_hvg_baseline, n_pcs : int
        HVGs and components of the PCA baseline (and the genes of the fidelity metric).
    knn_k, few_shot_fractions, few_shot_seeds, min_cells_per_type
        Classification settings (see :func:`embedding_metrics`).
    sample_z : bool
        No longer chooses anything (kept for ``eval run --sample-z``): the reconstruction is always
        scvi-tools' ``get_normalized_expression``, one posterior sample of z per cell seeded by
        ``seed``, as scFM-datamix; ``evaluation.json`` records ``sample_z`` True.
    max_rank_cells : int or None
        Geneformer: cells per eval set (seeded subsample) scored by the masked rank prediction
        test; 500 by default because BERT on CPU is slow (one more forward pass per scored cell,
        with up to 2,048 tokens for V1); None scores every cell.
    mask_fraction : float
        Geneformer: share of each cell's gene tokens masked for rank prediction (15 %, as pretraining).
    geneformer_batch_size : int
        Geneformer: cells per forward pass (cells sorted by length within each streamed batch).

    Returns
    -------
    dict
        The contents of ``evaluation.json``.

    Raises
    ------
    AtlasmixError
        No models and no baseline, an eval set overlapping a model's training cells, bad model dirs.
    """
    out = Path(out)
    if not eval_sets:
        raise AtlasmixError("no eval sets given")
    models = [load_model(d, device) for d in model_dirs]
    if not models and not pca_baseline:
        raise AtlasmixError("no models to evaluate (give --models or keep the PCA baseline)")
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise AtlasmixError(f"two model directories share the name {sorted(n for n in names if names.count(n) > 1)[0]!r}")
    overlap = {}
    for m in models:  # refuse before computing anything
        for e in eval_sets:
            overlap[f"{m.name}/{e.name}"] = check_overlap(m, e, store)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    per_cell: list[pd.DataFrame] = []
    few: list[pd.DataFrame] = []
    timings: dict[str, float] = {}
    hvg_of: dict[tuple, np.ndarray] = {}  # (eval set, gene axis) -> HVG columns: one pass per axis, not per model
    emb_kw = dict(k=knn_k, seed=seed, fractions=tuple(few_shot_fractions), seeds=tuple(few_shot_seeds),
                  min_cells=min_cells_per_type, integration=integration)

    for e in eval_sets:
        labels = e.obs["cell_type"].to_numpy()
        rows += _rows("data", "-", e.name, {"n_cells": e.n_cells,
                                            "n_cell_types_labelled": int(len(np.unique(labels[M.usable_labels(labels, 1)])))})
        base_genes = None
        if pca_baseline or rank_fidelity:
            t0 = time.perf_counter()
            cols = hvg_columns(e, e.feature_ids, n_hvg_baseline, batch_size)
            base_genes = e.feature_ids[cols]
            timings[f"hvg_baseline/{e.name}"] = round(time.perf_counter() - t0, 2)
        if rank_fidelity and base_genes is not None and len(base_genes) > 10:
            t0 = time.perf_counter()
            fid = _fidelity(e, base_genes, max_fidelity_cells, seed, batch_size, knn_k)
            rows += _rows("data", "-", e.name, fid, prefix="rank_fidelity_")
            timings[f"rank_fidelity/{e.name}"] = round(time.perf_counter() - t0, 2)
        if pca_baseline and base_genes is not None:
            t0 = time.perf_counter()
            try:
                emb = PCABaseline(n_pcs).fit_transform(e, base_genes, batch_size)
            except AtlasmixError as err:
                log(f"pca on {e.name}: skipped ({err})")
                emb = None
            if emb is not None:
                met, fs = embedding_metrics(emb, labels, **emb_kw)
                rows += _rows("pca", "baseline", e.name, met)
                if len(fs):
                    few.append(fs.assign(model="pca", mixture="baseline", eval_set=e.name))
            timings[f"pca/{e.name}"] = round(time.perf_counter() - t0, 2)
            log(f"pca on {e.name}: {timings[f'pca/{e.name}']} s")

        for m in models:
            t0 = time.perf_counter()
            if isinstance(m, GeneformerAdapter):
                d, pc, emb, lab, say = _geneformer_scores(
                    m, e, labels, batch_size=batch_size, forward_batch_size=geneformer_batch_size,
                    max_rank_cells=max_rank_cells, mask_fraction=mask_fraction, seed=seed)
            elif isinstance(m, (ScGPTAdapter, ScBERTAdapter)):
                d, pc, emb, lab, say = _encoded_model_scores(m, e, labels, batch_size=batch_size,
                                                             forward_batch_size=geneformer_batch_size,
                                                             max_cells=max_rank_cells, seed=seed)
            elif isinstance(m, LDVAEAdapter):
                axis_key = (e.name, tuple(m.feature_ids))
                if axis_key not in hvg_of:  # models sharing a gene axis (e.g. a study's) share the set's HVGs
                    hvg_of[axis_key] = hvg_columns(e, m.feature_ids, n_hvg, batch_size)
                d, pc, emb, lab, say = _ldvae_scores(m, e, labels, hvg_of[axis_key], batch_size=batch_size, seed=seed)
            else:
                continue
            per_cell.append(pc)
            rows += _rows(m.name, m.mixture, e.name, d)
            met, fs = embedding_metrics(emb, lab, **emb_kw)
            rows += _rows(m.name, m.mixture, e.name, met)
            if len(fs):
                few.append(fs.assign(model=m.name, mixture=m.mixture, eval_set=e.name))
            timings[f"{m.name}/{e.name}"] = round(time.perf_counter() - t0, 2)
            log(f"{m.name} on {e.name}: " + say(timings[f"{m.name}/{e.name}"]))

    res = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    res.to_parquet(out / "results.parquet", index=False)
    res.to_csv(out / "results.csv", index=False)
    if per_cell and any("n_tokens" in p for p in per_cell):  # same columns in every part
        for p in per_cell:
            for c in PER_CELL_GENEFORMER:
                if c not in p:
                    p[c] = np.nan
    pcs = pd.concat(per_cell, ignore_index=True) if per_cell else pd.DataFrame(
        columns=["model", "mixture", "eval_set", "cell_id", "soma_joinid", "dataset_id", "cell_type", "batch_seen",
                 "pearson_r", "r2"])
    pcs.to_parquet(out / "per_cell.parquet", index=False)
    pcs.to_csv(out / "per_cell.csv", index=False)
    fsd = pd.concat(few, ignore_index=True) if few else pd.DataFrame(
        columns=["model", "mixture", "eval_set", "fraction", "seed", "n_train", "C", "accuracy", "macro_f1"])
    fsd[["model", "mixture", "eval_set"] + [c for c in fsd.columns if c not in ("model", "mixture", "eval_set")]] \
        .to_csv(out / "few_shot.csv", index=False)
    doc = {
        "models": [{"name": m.name, "kind": m.kind, "mixture": m.mixture, "path": str(Path(m.path).resolve()),
                    "n_genes": int(len(m.feature_ids))} for m in models],
        "eval_sets": [{"name": e.name, "kind": e.kind, "n_cells": e.n_cells, "definition": e.definition,
                       "sha256": e.sha256} for e in eval_sets],
        "overlap_checks": overlap,
        "options": {"batch_size": batch_size, "n_hvg": n_hvg, "n_hvg_baseline": n_hvg_baseline, "n_pcs": n_pcs,
                    "knn_k": knn_k, "few_shot_fractions": list(few_shot_fractions),
                    "few_shot_seeds": list(few_shot_seeds), "min_cells_per_type": min_cells_per_type,
                    "sample_z": True, "seed": seed, "pca_baseline": pca_baseline, "rank_fidelity": rank_fidelity,
                    "max_fidelity_cells": max_fidelity_cells, "max_rank_cells": max_rank_cells,
                    "mask_fraction": mask_fraction, "geneformer_batch_size": geneformer_batch_size},
        "store": store.identity() if store is not None else None,
        "timings_s": timings,
    }
    (out / "evaluation.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return doc
