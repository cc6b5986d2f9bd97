"""Outputs of the pretrained models on an eval set: cell embeddings and their pretraining task.

:func:`geneformer_outputs` (embeddings, masked rank prediction vs the mean-rank baseline) and
:func:`masked_prediction_outputs` (scGPT / scBERT masked value / token prediction vs the per-gene
mean baseline), both streamed over the eval set; the adapters are :mod:`atlasmix.evaluation.pretrained`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from atlasmix.errors import AtlasmixError
from atlasmix.evaluation import metrics as M


def geneformer_outputs(model, eval_set, *, batch_size: int = 1024, forward_batch_size: int = 32,
                       max_rank_cells: int | None = 500, mask_fraction: float = 0.15, seed: int = 0) -> dict:
    """Embeddings and rank prediction scores of a Geneformer model on an eval set (streamed).

    Counts are read in batches of ``batch_size`` cells on the model's vocabulary genes (genes the
    set lacks are absent from every cell's encoding) with each cell's total counts over all its
    genes (:meth:`~atlasmix.evaluation.evalsets.EvalSet.iter_counts_totals`), rank value encoded
    (:meth:`~atlasmix.evaluation.models.GeneformerAdapter.tokenize`), sorted by length and run
    through the model ``forward_batch_size`` cells at a time.

    Rank prediction (sc-foundation-eval's zero-shot test of the MLM head) runs on a seeded
    subsample of at most ``max_rank_cells`` cells (None: all; BERT on CPU is slow): per cell
    ``mask_fraction`` of the gene tokens (at least 3) are replaced by ``<mask>`` with
    :func:`~atlasmix.evaluation.metrics.mask_positions` (seed ``seed``), the model's score is
    :meth:`~atlasmix.evaluation.models.GeneformerAdapter.rank_scores` and the baseline's
    :func:`~atlasmix.evaluation.metrics.mean_rank_baseline_scores`, with each gene's mean position
    over all cells of the eval set (unmasked encodings).

    Returns
    -------
    dict
        ``emb`` float32 (n_cells, hidden) (NaN rows: cells without a vocabulary gene), ``n_tokens``
        int64 (gene tokens per cell), ``n_expressed`` int64 (vocabulary genes expressed, before
        truncation), ``rank_pred`` and ``rank_baseline`` float64 (n_cells,) (NaN outside the
        subsample), ``vocab_genes_in_set`` (int).
    """
    n = eval_set.n_cells
    fids = model.feature_ids
    have = eval_set.store.var()["feature_id"].to_numpy() if eval_set.kind == "store" else eval_set.feature_ids
    present = pd.Index(fids).isin(have)  # (np.isin on object arrays is quadratic)
    axis = fids[present]
    if len(axis) == 0:
        raise AtlasmixError(f"eval set {eval_set.name}: no gene of {model.name}'s vocabulary is measured")
    # the model sees the vocabulary genes the set measures; tokenize() expects the full vocabulary axis
    cols = np.flatnonzero(present)
    rng = np.random.default_rng(seed)
    n_rank = n if max_rank_cells is None else min(n, int(max_rank_cells))
    rank_pick = np.sort(rng.permutation(n)[:n_rank])
    emb = np.full((n, model.n_latent), np.nan, dtype=np.float32)
    n_tok = np.zeros(n, dtype=np.int64)
    n_expr = np.zeros(n, dtype=np.int64)
    psum = np.zeros(model.vocab_size, dtype=np.float64)
    pcnt = np.zeros(model.vocab_size, dtype=np.int64)
    rank_tokens = np.full((len(rank_pick), model.max_len), model.dicts.pad_id, dtype=np.int64)
    rank_len = np.zeros(len(rank_pick), dtype=np.int64)
    import scipy.sparse as sp

    for sl, cnt, tot in eval_set.iter_counts_totals(axis, batch_size):
        m = cnt.tocoo()
        full = sp.csr_matrix((m.data, (m.row, cols[m.col])), shape=(cnt.shape[0], len(fids)))
        n_expr[sl] = np.asarray((cnt > 0).sum(axis=1)).ravel()
        toks, lens = model.tokenize(full, tot)
        n_tok[sl] = model.n_genes(lens)
        s, c = M.mean_positions(toks, model.vocab_size, model.special_ids)
        psum += s
        pcnt += c
        order = np.argsort(-lens, kind="stable")
        for k in range(0, len(order), forward_batch_size):
            g = order[k:k + forward_batch_size]
            emb[sl.start + g] = model.embed(toks[g], lens[g])
        sel = rank_pick[(rank_pick >= sl.start) & (rank_pick < sl.stop)]
        if len(sel):
            at = np.searchsorted(rank_pick, sel)
            rank_tokens[at, :toks.shape[1]] = toks[sel - sl.start]
            rank_len[at] = lens[sel - sl.start]
    rank_pred = np.full(n, np.nan)
    rank_base = np.full(n, np.nan)
    if len(rank_pick):
        mask = M.mask_positions(rank_tokens, fraction=mask_fraction, seed=seed, special_ids=model.special_ids)
        mean_pos = np.where(pcnt > 0, psum / np.maximum(pcnt, 1), np.nan)
        rank_base[rank_pick] = M.mean_rank_baseline_scores(rank_tokens, mask, mean_pos)
        order = np.argsort(-rank_len, kind="stable")
        for k in range(0, len(order), forward_batch_size):
            g = order[k:k + forward_batch_size]
            rank_pred[rank_pick[g]] = model.rank_scores(rank_tokens[g], rank_len[g], mask[g])
    return {"emb": emb, "n_tokens": n_tok, "n_expressed": n_expr, "rank_pred": rank_pred,
            "rank_baseline": rank_base, "vocab_genes_in_set": int(len(axis)), "n_rank_cells": int(len(rank_pick))}


def cell_keys(eval_set) -> np.ndarray:
    """Keys of the encodings' random draws: the cells' ``soma_joinid`` in a store set (as in
    pretraining and the embed commands), their positions in a file set (whose cells have none).

    Returns
    -------
    numpy.ndarray of int64, shape (n_cells,)
    """
    sj = pd.to_numeric(eval_set.obs["soma_joinid"], errors="coerce").to_numpy()
    if np.isfinite(sj).all() and (sj >= 0).all():
        return sj.astype(np.int64)
    return np.arange(eval_set.n_cells, dtype=np.int64)


def masked_prediction_outputs(model, eval_set, *, batch_size: int = 1024, forward_batch_size: int = 32,
                              max_cells: int | None = 200, mask_fraction: float | None = None, seed: int = 0) -> dict:
    """Masked prediction by an scGPT / scBERT model on eval cells, against a per-gene mean baseline.

    On a seeded subsample of at most ``max_cells`` cells, each cell's eligible tokens (scGPT: its gene
    tokens; scBERT: its nonzero expression tokens) are partly masked (``mask_fraction``, default the
    model's pretraining ratio: scGPT 0.4, scBERT 0.15; at least 3) and predicted by the model's head
    (:meth:`~atlasmix.evaluation.models.ScGPTAdapter.masked_prediction`). Per cell the score is the
    Pearson r between predicted and true values (bins / tokens) at the masked positions; the
    baseline predicts each masked gene's mean value over the *other* subsampled cells that hold it
    (a model that learned nothing about the cell's context does no better) -- the analogue of
    Geneformer's mean-rank baseline. Masked genes no other sampled cell holds are not scored.

    Returns
    -------
    dict
        ``pred`` and ``baseline`` float64 (n_cells,) (NaN outside the subsample or with a constant
        truth), ``n_scored`` (int).
    """
    n = eval_set.n_cells
    frac = mask_fraction if mask_fraction is not None else {"scgpt": 0.4, "scbert": 0.15}[model.kind]
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.permutation(n)[:n if max_cells is None else min(n, int(max_cells))])
    keys = cell_keys(eval_set)
    cells: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
    sums: dict[int, float] = {}
    cnts: dict[int, int] = {}
    for sl, cnt in eval_set.iter_counts(model.feature_ids, batch_size):
        sel = pick[(pick >= sl.start) & (pick < sl.stop)]
        for k in range(0, len(sel), forward_batch_size):
            rows = sel[k:k + forward_batch_size]
            g, truth, pred, elig = model.masked_prediction(cnt[rows - sl.start], keys[rows], frac, rng)
            gk, gv = g[elig], truth[elig]
            uk, inv = np.unique(gk, return_inverse=True)
            ws = np.bincount(inv, weights=gv)
            wc = np.bincount(inv)
            for key, s, c in zip(uk.tolist(), ws.tolist(), wc.tolist()):
                sums[key] = sums.get(key, 0.0) + s
                cnts[key] = cnts.get(key, 0) + c
            for i, r in enumerate(rows):
                mk = np.isfinite(pred[i])
                cells.append((int(r), g[i][mk], truth[i][mk], pred[i][mk]))
    out_pred, out_base = np.full(n, np.nan), np.full(n, np.nan)
    for r, gk, truth, pred in cells:
        # leave the scored cell out of its genes' means (a gene holds one value per cell); genes no
        # other sampled cell holds have no baseline and are not scored
        c = np.array([cnts[k] for k in gk.tolist()], dtype=np.float64)
        other = c > 1
        gk, truth, pred = gk[other], truth[other], pred[other]
        if len(truth) < 3 or np.ptp(truth) == 0:
            continue
        base = (np.array([sums[k] for k in gk.tolist()]) - truth) / (c[other] - 1)
        out_pred[r] = np.corrcoef(pred, truth)[0, 1] if np.ptp(pred) > 0 else np.nan
        out_base[r] = np.corrcoef(base, truth)[0, 1] if np.ptp(base) > 0 else np.nan
    return {"pred": out_pred, "baseline": out_base, "n_scored": int(np.isfinite(out_pred).sum())}
