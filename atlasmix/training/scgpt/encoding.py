"""scGPT's value binning and gene tokens over whole CSR minibatches (a loader transform).

The method (Cui et al. 2024, *Nature Methods* 21:1470; scGPT's ``scgpt/preprocess.py``,
``Preprocessor.binning`` / ``_digitize``, and ``scgpt/tokenizer/gene_tokenizer.py``,
``tokenize_batch`` / ``pad_batch``), for each cell over the genes of the vocabulary:

1. **Binning** (``n_bins = 51``): the cell's nonzero values ``x`` get the bin edges
   ``np.quantile(x, np.linspace(0, 1, n_bins - 1))`` and each value the bin
   ``ceil(u * (right - left) + left)``, ``left = np.digitize(x, edges)``,
   ``right = np.digitize(x, edges, right=True)``, ``u ~ U[0, 1)``: a value equal to several edges
   lands at random between its left and right bin (1 .. n_bins - 1; 0 is a zero count, never a
   token here).
2. **Tokens**: the nonzero genes only (``include_zero_gene=False``), ``<cls>`` first with value 0;
   a cell with more than ``max_len - 1`` genes keeps a uniform random subset of ``max_len - 1`` of
   them (``pad_batch``); a batch is padded with ``<pad>`` and ``pad_value = -2`` to its longest cell
   (at most ``max_len = 1,200``).

The binning is computed on raw counts. scGPT bins the values after its preprocessing
(``normalize_total`` to 10^4, ``log1p``); per cell that is a strictly increasing map of the counts,
so in exact arithmetic the bins are the same (the quantile edges interpolate between the same two
order statistics, and ``digitize`` only compares). In floating point they can differ where an edge's
interpolation weight is not exact (e.g. 8 values, edge 35 of 50) and the rounded edge lands on a
tied value in one space but not the other; then the tie range of that value differs by one bin.
The edges follow numpy's ``quantile`` (method ``linear``) operation for operation, in float64, so
they are *equal* to ``np.quantile`` of the cell's nonzero counts (tested). They are read from a
histogram of the cell's counts when all are whole numbers up to :data:`HIST_MAX` (runs of equal
values instead of a sort), else from a sort. Differences from scGPT's
code: the random draws (tie bins, gene subset) come from a counter-based generator keyed by
``(seed, epoch, soma_joinid, position)`` -- reproducible whatever the threads or batch
composition -- instead of numpy's global RNG; the kept genes of a subsampled cell stay in gene-axis
order (scGPT's are in random order; the model has no positional encoding, so the order carries no
information). The vocabulary is scGPT's published JSON (symbol -> id, e.g. its repository's
``scgpt/tokenizer/default_census_vocab.json`` or a model folder's ``vocab.json``), given as a file:
store genes are matched by their current HGNC symbol (``var.feature_name``), so every Ensembl id
the store maps reaches its scGPT token.

:func:`bin_and_tokenize` does the whole batch in one compiled (numba) pass without the GIL, in
threads (:func:`atlasmix.training._cells.run_in_chunks`); :func:`bin_and_tokenize_reference` is the
straightforward per-cell numpy version of scGPT's code, kept for tests and the benchmark.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numba import njit

from atlasmix.errors import AtlasmixError
from atlasmix.training._cells import run_in_chunks

#: scGPT's defaults (``scgpt/tasks``, tutorials and the pretraining scripts).
N_BINS = 51
MAX_LEN = 1200
PAD_VALUE = -2
MASK_VALUE = -1
PAD, CLS, EOC = "<pad>", "<cls>", "<eoc>"


def load_vocab(path: str | Path) -> dict[str, int]:
    """scGPT's gene vocabulary (JSON object: token -> id); ``<pad>``, ``<cls>``, ``<eoc>`` are appended
    with the next ids when absent, as scGPT's pretraining scripts do.

    Raises
    ------
    AtlasmixError
        Missing or unreadable file, not a JSON object of str -> non-negative int, repeated ids.
    """
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise AtlasmixError(f"scGPT vocabulary not found: {p}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AtlasmixError(f"scGPT vocabulary {p} is not readable JSON: {e}") from None
    if not isinstance(d, dict) or not d or not all(isinstance(k, str) and isinstance(v, int) and not
                                                   isinstance(v, bool) and v >= 0 for k, v in d.items()):
        raise AtlasmixError(f"scGPT vocabulary {p} must be a JSON object mapping tokens to ids >= 0")
    if len(set(d.values())) != len(d):
        raise AtlasmixError(f"scGPT vocabulary {p} gives one id to several tokens")
    nxt = max(d.values()) + 1
    for s in (PAD, CLS, EOC):
        if s not in d:
            d[s] = nxt
            nxt += 1
    return d


def vocabulary_axis(store, vocab: dict[str, int]) -> dict[str, np.ndarray]:
    """The store genes that have an scGPT token: ``var_joinids`` (ascending int64), ``token_ids``
    (int64, same order) and ``feature_id``. A symbol shared by several store genes goes to the first.

    Raises
    ------
    AtlasmixError
        No store gene is in the vocabulary.
    """
    var = store.var()
    sym = var["feature_name"].astype(str).to_numpy()
    tok = np.array([vocab.get(s, -1) for s in sym], dtype=np.int64)
    keep = tok >= 0
    keep &= ~np.isin(sym, [PAD, CLS, EOC])
    vj = var.index.to_numpy(dtype=np.int64)[keep]
    tok = tok[keep]
    _, first = np.unique(tok, return_index=True)
    first = np.sort(first)
    if len(first) == 0:
        raise AtlasmixError("no store gene symbol is in the scGPT vocabulary")
    return {"var_joinids": vj[first], "token_ids": tok[first],
            "feature_id": var.loc[vj[first], "feature_id"].to_numpy()}


@njit(cache=True, nogil=True)
def _uniform(seed: np.uint64, cell: np.uint64, k: np.uint64) -> float:
    """U[0, 1) from a splitmix64 hash of (seed, cell, k) (Steele et al. 2014, SplittableRandom)."""
    z = seed * np.uint64(0x9E3779B97F4A7C15) + cell * np.uint64(0xBF58476D1CE4E5B9) + k * np.uint64(0x94D049BB133111EB)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return float(z >> np.uint64(11)) * (1.0 / 9007199254740992.0)


#: Counts up to this whole number are ordered by a histogram instead of a sort (module doc).
HIST_MAX = 4096


@njit(cache=True, nogil=True)
def _lerp_edges(lo, hi, g):
    """numpy's ``_lerp`` (``np.quantile``, method "linear"), operation for operation."""
    d = hi - lo
    return hi - d * (1.0 - g) if g >= 0.5 else lo + d * g


@njit(cache=True, nogil=True)
def _bin_cells(r0, r1, indptr, indices, data, token_of_col, q, max_genes, seed, cell_keys, cls_id, pad_id,
               pad_value, out_genes, out_values, lengths, edges_out, want_edges):
    n_edges = len(q)
    edges = np.empty(n_edges)
    width = 0
    for i in range(r0, r1):
        width = max(width, indptr[i + 1] - indptr[i])
    vals = np.empty(width)
    toks = np.empty(width, dtype=np.int64)
    hist = np.zeros(HIST_MAX + 1, dtype=np.int64)
    lut_left = np.zeros(HIST_MAX + 1, dtype=np.int64)
    lut_right = np.zeros(HIST_MAX + 1, dtype=np.int64)
    for i in range(r0, r1):
        a, b = indptr[i], indptr[i + 1]
        n = 0
        small = True  # every value a whole number in 1 .. HIST_MAX: histogram instead of sort
        vmax = 0
        for k in range(a, b):
            x = data[k]
            if x > 0 and token_of_col[indices[k]] >= 0:
                vals[n] = x
                toks[n] = token_of_col[indices[k]]
                n += 1
                if small:
                    if x <= HIST_MAX and x == np.floor(x):
                        v = int(x)
                        hist[v] += 1
                        vmax = max(vmax, v)
                    else:
                        small = False
        out_genes[i, 0] = cls_id
        out_values[i, 0] = 0.0
        if n > 0:
            # np.quantile(sorted values, q), method "linear": virtual index (n - 1) q, numpy's _lerp;
            # the sorted values are read from the histogram (runs of equal values) or a sort
            if small:
                cur, before = 1, 0  # value run `cur` holds sorted positions before .. before + hist[cur] - 1
                while hist[cur] == 0:
                    cur += 1
                for e in range(n_edges):
                    vi = (n - 1) * q[e]
                    if vi >= n - 1:
                        edges[e] = float(vmax)
                        continue
                    p = int(np.floor(vi))
                    while before + hist[cur] <= p:
                        before += hist[cur]
                        cur += 1
                        while hist[cur] == 0:
                            cur += 1
                    lo = float(cur)
                    if p + 1 < before + hist[cur]:
                        hi = lo
                    else:
                        nxt = cur + 1
                        while hist[nxt] == 0:
                            nxt += 1
                        hi = float(nxt)
                    edges[e] = _lerp_edges(lo, hi, vi - np.floor(vi))
                # each distinct value's bins once: np.digitize(x, edges) and np.digitize(x, edges, right=True)
                for v in range(1, vmax + 1):
                    if hist[v] > 0:
                        lut_left[v] = np.searchsorted(edges, float(v), side="right")
                        lut_right[v] = np.searchsorted(edges, float(v), side="left")
                        hist[v] = 0
            else:
                for v in range(1, vmax + 1):
                    hist[v] = 0
                srt = np.sort(vals[:n])
                for e in range(n_edges):
                    vi = (n - 1) * q[e]
                    if vi >= n - 1:
                        edges[e] = srt[n - 1]
                    else:
                        p = int(np.floor(vi))
                        edges[e] = _lerp_edges(srt[p], srt[p + 1], vi - np.floor(vi))
            if want_edges:
                edges_out[i, :] = edges
        key = np.uint64(cell_keys[i])
        # genes kept: all, or a uniform subset of max_genes in gene-axis order (selection sampling,
        # Knuth's Algorithm S: gene j is kept with probability still-needed / still-left)
        m = n if n <= max_genes else max_genes
        need = m
        col = 1
        for j in range(n):
            if need == 0:
                break
            if n <= max_genes or _uniform(seed, key, np.uint64(n + j)) * (n - j) < need:
                need -= 1
                x = vals[j]
                if small:
                    left, right = lut_left[int(x)], lut_right[int(x)]
                else:
                    left = np.searchsorted(edges, x, side="right")  # np.digitize(x, edges)
                    right = np.searchsorted(edges, x, side="left")  # np.digitize(x, edges, right=True)
                out_genes[i, col] = toks[j]
                if right == left:
                    out_values[i, col] = left
                else:  # a value equal to several edges: uniformly between its bins (scGPT's _digitize)
                    out_values[i, col] = np.ceil(_uniform(seed, key, np.uint64(j)) * (right - left) + left)
                col += 1
        for jj in range(m + 1, out_genes.shape[1]):
            out_genes[i, jj] = pad_id
            out_values[i, jj] = pad_value
        lengths[i] = m + 1


def bin_and_tokenize(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, token_of_col: np.ndarray,
                     cell_keys: np.ndarray, *, cls_id: int, pad_id: int, n_bins: int = N_BINS,
                     max_len: int = MAX_LEN, pad_value: float = PAD_VALUE, seed: int = 0, threads: int = 1,
                     return_edges: bool = False) -> dict[str, np.ndarray]:
    """scGPT value binning and tokens of a CSR batch of raw counts (module doc), one compiled pass.

    Parameters
    ----------
    indptr, indices, data : numpy.ndarray
        CSR of the batch: shape (B + 1,), (nnz,), (nnz,); columns index ``token_of_col``.
    token_of_col : numpy.ndarray of int64, shape (G,)
        scGPT token id of each column (-1: not in the vocabulary, ignored).
    cell_keys : numpy.ndarray of int64, shape (B,)
        Per-cell keys of the random draws (e.g. ``soma_joinid``): same key, seed -> same draws.
    cls_id, pad_id : int
    n_bins : int
        Bins including bin 0 (zero counts); edges: ``n_bins - 1`` quantiles.
    max_len : int
        Most tokens per cell, ``<cls>`` included.
    pad_value : float
    seed : int
        Seed of the random draws (add the epoch to vary them between epochs).
    threads : int
    return_edges : bool
        Also return each cell's bin edges (float64, (B, n_bins - 1); NaN for a cell with no value).

    Returns
    -------
    dict
        ``genes`` int64 (B, L) and ``values`` float32 (B, L), ``L`` = the longest cell's tokens
        (<= ``max_len``), ``lengths`` int64 (B,), and ``edges`` if asked.

    Raises
    ------
    AtlasmixError
        ``n_bins`` < 3 or ``max_len`` < 2.
    """
    if n_bins < 3 or max_len < 2:
        raise AtlasmixError(f"n_bins must be >= 3 and max_len >= 2, got {n_bins} and {max_len}")
    B = len(indptr) - 1
    q = np.linspace(0, 1, n_bins - 1)
    L = int(min(np.diff(indptr).max(initial=0), max_len - 1)) + 1
    genes = np.empty((B, L), dtype=np.int64)
    values = np.empty((B, L), dtype=np.float32)
    lengths = np.empty(B, dtype=np.int64)
    edges = np.full((B if return_edges else 1, n_bins - 1), np.nan)
    args = (np.asarray(indptr, dtype=np.int64), np.asarray(indices, dtype=np.int64), np.asarray(data),
            np.asarray(token_of_col, dtype=np.int64), q, max_len - 1, np.uint64(seed & (2**64 - 1)),
            np.asarray(cell_keys, dtype=np.int64), int(cls_id), int(pad_id), float(pad_value), genes, values,
            lengths, edges, bool(return_edges))
    run_in_chunks(lambda a, b: _bin_cells(a, b, *args), args[0], threads)
    n = int(lengths.max(initial=1))
    out = {"genes": np.ascontiguousarray(genes[:, :n]), "values": np.ascontiguousarray(values[:, :n]),
           "lengths": lengths}
    if return_edges:
        out["edges"] = edges
    return out


def bin_and_tokenize_reference(X, token_of_col: np.ndarray, *, cls_id: int, pad_id: int, n_bins: int = N_BINS,
                               max_len: int = MAX_LEN, pad_value: float = PAD_VALUE,
                               rng: np.random.Generator | None = None) -> dict[str, list]:
    """The straightforward per-cell version of scGPT's code (``Preprocessor.binning`` on the
    vocabulary genes, then ``tokenize_batch`` + ``pad_batch``), numpy only; tests and benchmarks.

    Returns
    -------
    dict
        ``genes`` and ``values``: lists of per-cell arrays (unpadded), ``edges``: list of arrays.
    """
    rng = rng or np.random.default_rng(0)
    X = X.tocsr()
    cols = np.flatnonzero(token_of_col >= 0)
    Xv = X[:, cols].toarray().astype(np.float64)
    tok = token_of_col[cols]
    q = np.linspace(0, 1, n_bins - 1)
    out: dict[str, list] = {"genes": [], "values": [], "edges": []}
    for row in Xv:
        nz = np.nonzero(row)[0]
        x = row[nz]
        binned = np.zeros(len(x), dtype=np.int64)
        edges = np.full(n_bins - 1, np.nan)
        if len(x):
            edges = np.quantile(x, q)
            left, right = np.digitize(x, edges), np.digitize(x, edges, right=True)
            binned = np.ceil(rng.random(len(x)) * (right - left) + left).astype(np.int64)
        g = np.insert(tok[nz], 0, cls_id)
        v = np.insert(binned.astype(np.float32), 0, 0)
        if len(g) > max_len:
            idx = np.insert(rng.choice(len(g) - 1, max_len - 1, replace=False) + 1, 0, 0)
            g, v = g[idx], v[idx]
        out["genes"].append(g)
        out["values"].append(v)
        out["edges"].append(edges)
    return out


class ScGPTEncoder:
    """A transform of the loader's sparse minibatches into scGPT inputs (no tokenized copy).

    Parameters
    ----------
    axis : dict
        :func:`vocabulary_axis` (the loader's gene axis must be ``axis["var_joinids"]``).
    vocab : dict
        :func:`load_vocab`.
    n_bins, max_len, pad_value, seed, threads
        As :func:`bin_and_tokenize`.

    Notes
    -----
    Call it on a :class:`~atlasmix.training.loader.MixtureLoader` batch built with ``sparse=True``:
    ``X`` (torch sparse CSR, raw counts) and ``soma_joinid``. :meth:`set_epoch` varies the random
    draws between epochs, keyed by ``(seed, epoch, soma_joinid)``.
    """

    def __init__(self, axis: dict[str, np.ndarray], vocab: dict[str, int], *, n_bins: int = N_BINS,
                 max_len: int = MAX_LEN, pad_value: float = PAD_VALUE, seed: int = 0, threads: int = 1):
        self.token_of_col = np.asarray(axis["token_ids"], dtype=np.int64)
        self.cls_id, self.pad_id = int(vocab[CLS]), int(vocab[PAD])
        self.n_bins, self.max_len, self.pad_value = int(n_bins), int(max_len), float(pad_value)
        self.seed, self.threads, self.epoch = int(seed), int(threads), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        X = batch["X"]
        out = bin_and_tokenize(X.crow_indices().numpy(), X.col_indices().numpy(), X.values().numpy(),
                               self.token_of_col, batch["soma_joinid"].numpy(), cls_id=self.cls_id,
                               pad_id=self.pad_id, n_bins=self.n_bins, max_len=self.max_len,
                               pad_value=self.pad_value, seed=self.seed * 1_000_003 + self.epoch,
                               threads=self.threads)
        return {"genes": torch.from_numpy(out["genes"]), "values": torch.from_numpy(out["values"]),
                "lengths": torch.from_numpy(out["lengths"]), "soma_joinid": batch["soma_joinid"]}
