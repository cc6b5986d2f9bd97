"""scBERT's expression tokens over whole CSR minibatches (a loader transform).

The method (Yang et al. 2022, *Nature Machine Intelligence* 4:852; scBERT's ``preprocess.py`` and
``pretrain.py`` / ``finetune.py``, ``SCDataset.__getitem__``), for each cell:

1. the cell on scBERT's gene axis (16,906 PanglaoDB genes, the ``var_names`` of its
   ``panglao_human.h5ad``; genes the data lack are zero);
2. ``sc.pp.normalize_total(target_sum=1e4)`` over that axis, then ``sc.pp.log1p(base=2)``:
   ``v = log1p(count / total * 1e4) / ln 2`` (the library size ``total`` is the sum over the axis);
3. tokens ``min(floor(v), 5)`` (``full_seq[full_seq > CLASS - 2] = CLASS - 2`` then ``.long()``,
   ``CLASS = bin_num + 2 = 7``), and one token 0 appended: ``SEQ_LEN = gene_num + 1 = 16,907``;
4. mask and pad share the token ``CLASS - 1 = 6`` (:data:`MASK_TOKEN`); token 0 is never masked.

Differences: scanpy computes step 2 in the matrix' float32; here it is float64 (a token can differ
only for a value within a float32 rounding of a bin edge). scBERT's ``preprocess.py`` also drops
cells with fewer than 200 genes (``sc.pp.filter_cells(min_genes=200)``); here the mixture decides
which cells train (add ``n_genes >= 200`` to its SQL). Tokens are ``uint8`` (7 values; 17 kB per
cell instead of 135 kB as int64): the model casts them on its device.

:func:`scbert_tokens` does a batch in one compiled (numba) pass per cell without the GIL, in threads
(:func:`atlasmix.training._cells.run_in_chunks`); :func:`scbert_tokens_reference` is the
straightforward per-cell numpy version, kept for tests and the benchmark.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from numba import njit

from atlasmix.training._cells import mark_whole_counts, run_in_chunks

#: scBERT's defaults (``pretrain.py``: ``bin_num = 5``, ``CLASS = bin_num + 2``).
BIN_NUM = 5
MASK_TOKEN = BIN_NUM + 1
PAD_TOKEN = BIN_NUM + 1
TARGET_SUM = 1e4
_LN2 = math.log(2.0)


#: Whole counts below this get their token from a per-cell table (one log1p per distinct count).
LUT_SIZE = 256


@njit(cache=True, nogil=True)
def _token(c, total, target_sum, ln2, cap):
    v = np.floor(np.log1p(c / total * target_sum) / ln2)
    return cap if v > cap else np.uint8(v)


@njit(cache=True, nogil=True)
def _scbert_cells(r0, r1, indptr, indices, data, position, cap, target_sum, ln2, out):
    lut = np.zeros(LUT_SIZE, dtype=np.uint8)
    seen = np.zeros(LUT_SIZE, dtype=np.bool_)
    for i in range(r0, r1):
        row = out[i]  # zeros (np.zeros: fresh pages come zeroed)
        a, b = indptr[i], indptr[i + 1]
        # whole counts below LUT_SIZE (nearly all of a cell's): one token per distinct count, then a
        # plain gather; other values are computed one by one
        total, small = mark_whole_counts(data, a, b, seen, LUT_SIZE)
        if total <= 0:
            seen[:] = False
            continue
        for w in range(1, LUT_SIZE):
            if seen[w]:
                lut[w] = _token(float(w), total, target_sum, ln2, cap)
                seen[w] = False
        if small:
            for k in range(a, b):
                row[position[indices[k]]] = lut[int(data[k])]
        else:
            for k in range(a, b):
                c = float(data[k])
                if c > 0:
                    w = int(c)
                    row[position[indices[k]]] = lut[w] if w < LUT_SIZE and w == c else _token(c, total, target_sum,
                                                                                               ln2, cap)


def scbert_tokens(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, position: np.ndarray, n_genes: int,
                  *, bin_num: int = BIN_NUM, threads: int = 1) -> np.ndarray:
    """scBERT tokens of a CSR batch of raw counts (module doc), one compiled pass.

    Parameters
    ----------
    indptr, indices, data : numpy.ndarray
        CSR of the batch, shape (B + 1,), (nnz,), (nnz,); column ``j`` is the model gene
        ``position[j]``; counts (the library size is their sum per cell).
    position : numpy.ndarray of int64, shape (G,)
        Each column's position on scBERT's gene axis (:func:`atlasmix.training.gene_lists.model_axis`).
    n_genes : int
        Length of scBERT's axis (16,906 for the published model).
    bin_num : int
        Highest token (scBERT: 5).
    threads : int

    Returns
    -------
    numpy.ndarray of uint8, shape (B, n_genes + 1)
        Tokens 0 .. ``bin_num``; the last column is scBERT's appended 0.
    """
    B = len(indptr) - 1
    out = np.zeros((B, int(n_genes) + 1), dtype=np.uint8)
    args = (np.asarray(indptr, dtype=np.int64), np.asarray(indices), np.asarray(data),
            np.asarray(position, dtype=np.int64), np.uint8(bin_num), float(TARGET_SUM), _LN2, out)
    run_in_chunks(lambda a, b: _scbert_cells(a, b, *args), args[0], threads)
    return out


def scbert_tokens_reference(X, position: np.ndarray, n_genes: int, *, bin_num: int = BIN_NUM) -> np.ndarray:
    """The straightforward per-cell numpy version of scBERT's steps (``preprocess.py`` normalisation
    and log2 on the dense cell, then ``SCDataset.__getitem__``); tests and benchmarks.

    Returns
    -------
    numpy.ndarray of int64, shape (B, n_genes + 1)
    """
    X = X.tocsr()
    out = np.empty((X.shape[0], n_genes + 1), dtype=np.int64)
    for i in range(X.shape[0]):
        row = X[i]
        full = np.zeros(n_genes)
        full[position[row.indices]] = row.data
        total = full.sum()
        v = np.log1p(full / total * TARGET_SUM) / np.log(2.0) if total > 0 else full
        v[v > bin_num] = bin_num
        out[i, :n_genes] = v.astype(np.int64)
        out[i, n_genes] = 0
    return out


class ScBERTEncoder:
    """A transform of the loader's sparse minibatches into scBERT tokens (no tokenized copy).

    Parameters
    ----------
    axis : dict
        :func:`atlasmix.training.gene_lists.model_axis` over scBERT's gene list (the loader's gene
        axis must be ``axis["var_joinids"]``).
    bin_num, threads
        As :func:`scbert_tokens`.

    Notes
    -----
    Call it on a :class:`~atlasmix.training.loader.MixtureLoader` batch built with ``sparse=True``
    (``X``: torch sparse CSR of raw counts). Returns ``tokens`` (uint8 torch tensor, (B, n_genes + 1))
    and ``soma_joinid``.
    """

    def __init__(self, axis: dict[str, Any], *, bin_num: int = BIN_NUM, threads: int = 1):
        self.position = np.asarray(axis["position"], dtype=np.int64)
        self.n_genes = int(axis["n_genes"])
        self.bin_num, self.threads = int(bin_num), int(threads)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        X = batch["X"]
        tok = scbert_tokens(X.crow_indices().numpy(), X.col_indices().numpy(), X.values().numpy(), self.position,
                            self.n_genes, bin_num=self.bin_num, threads=self.threads)
        return {"tokens": torch.from_numpy(tok), "soma_joinid": batch["soma_joinid"]}
