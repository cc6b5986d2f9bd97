"""Geometric sketching of a component's cells on an out-of-core PCA.

Geometric sketching (Hie, Cho, DeMeo, Bryson & Berger 2019, *Geometric sketching compactly
summarizes the single-cell transcriptomic landscape*, Cell Systems 8:483) covers the embedding with
equal-volume boxes and draws cells box by box, so rare cell states keep their share. We call the
``geosketch`` package on a PCA of the component's cells.

The PCA never holds X in memory. X is streamed from the store in row chunks
(:meth:`atlasmix.store.Store.iter_X`) and normalised as in scanpy's default pipeline: counts per
10,000 per cell (CP10k), then ``log1p`` (:func:`atlasmix.preprocess.log1p_cp10k`).

1. pass 1, all genes: per-cell library size and per-gene moments of log1p(CP10k); the
   ``n_top_genes`` genes with the largest variance are kept (:class:`atlasmix.preprocess.HVGStats`,
   flavour ``variance``);
2. pass 2, HVGs only: an exact PCA from the Gram matrix (:class:`atlasmix.preprocess.GramPCA`,
   independent of chunking, unlike incremental PCA);
3. projection: each chunk is centred and projected (pass 3), unless the HVG chunks of pass 2 fitted
   in a small cache, then those are projected without re-reading X.

Memory: O(chunk x genes per cell + n_hvg^2 + n_cells x n_pcs).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp

from atlasmix.preprocess import GramPCA, HVGStats, log1p_cp10k

#: Keep the HVG chunks of pass 2 in memory (and skip pass 3) while they hold fewer nonzeros.
CACHE_NNZ = 20_000_000


def streamed_pca(iter_x: Callable, joinids: np.ndarray, var_joinids: np.ndarray, n_pcs: int = 20,
                 n_top_genes: int = 2000, chunk_size: int = 8192) -> np.ndarray:
    """PCA scores of cells from streamed counts.

    Parameters
    ----------
    iter_x : callable
        ``iter_x(joinids, var_joinids, chunk_size=...)`` yielding ``(ids, csr_matrix)`` chunks with
        columns in the order of ``var_joinids``, as :meth:`atlasmix.store.Store.iter_X`.
    joinids : numpy.ndarray of int64
        Cells, sorted ascending.
    var_joinids : numpy.ndarray of int64
        Genes considered (normally every gene of the store; library sizes are summed over them).
    n_pcs, n_top_genes, chunk_size : int
        Components kept, HVGs used, cells per chunk.

    Returns
    -------
    numpy.ndarray, shape (len(joinids), k), float64
        Scores on the top ``k = min(n_pcs, n_hvg, len(joinids) - 1)`` principal axes, rows in the
        order of ``joinids``. Axis signs are fixed (largest-magnitude loading positive), so results
        are deterministic.
    """
    joinids = np.asarray(joinids, dtype=np.int64)
    n = len(joinids)
    libs = np.zeros(n, dtype=np.float64)
    var_joinids = np.asarray(var_joinids, dtype=np.int64)
    hvg = HVGStats(len(var_joinids), flavor="variance")
    pos = 0
    for ids, m in iter_x(joinids, var_joinids, chunk_size=chunk_size):
        lib = np.asarray(m.sum(axis=1), dtype=np.float64).ravel()
        libs[pos:pos + len(ids)] = lib
        pos += len(ids)
        hvg.update(m, library=lib)
    if hvg.n == 0 or n < 2:
        return np.zeros((n, 0))
    hvg_cols = hvg.top_genes(n_top_genes)
    if len(hvg_cols) == 0:
        return np.zeros((n, 0))
    var_ids = var_joinids[hvg_cols]  # ascending, as hvg_cols is
    h = len(var_ids)
    pca = GramPCA(h)
    cache: list[sp.csr_matrix] | None = []
    cached_nnz = 0
    pos = 0
    for ids, m in iter_x(joinids, var_ids, chunk_size=chunk_size):
        x = log1p_cp10k(m, library=libs[pos:pos + len(ids)])
        pos += len(ids)
        pca.update(x)
        if cache is not None:
            cached_nnz += x.nnz
            if cached_nnz > CACHE_NNZ:
                cache = None
            else:
                cache.append(x)
    pca.fit(max(1, min(n_pcs, h, n - 1)))
    if cache is not None:
        return np.vstack([pca.transform(x) for x in cache])
    out = np.empty((n, pca.components_.shape[1]))
    pos = 0
    for ids, m in iter_x(joinids, var_ids, chunk_size=chunk_size):
        out[pos:pos + len(ids)] = pca.transform(log1p_cp10k(m, library=libs[pos:pos + len(ids)]))
        pos += len(ids)
    return out


def geometric_sketch(scores: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices (rows of ``scores``) of a geometric sketch of ``n`` cells, sorted (int64).

    Calls ``geosketch.gs(scores, n, replace=False, seed=seed)`` (Hie et al. 2019). geosketch seeds
    numpy's global RNG; its state is restored afterwards.

    Parameters
    ----------
    scores : numpy.ndarray, shape (n_cells, n_dims)
        Embedding (e.g. :func:`streamed_pca` scores).
    n : int
        Sketch size, ``<= n_cells``.
    seed : int
        0 <= seed < 2**32.
    """
    n_cells = scores.shape[0]
    if n >= n_cells:
        return np.arange(n_cells, dtype=np.int64)
    if scores.shape[1] == 0 or not np.ptp(scores, axis=0).any():  # no geometry: plain seeded draw
        return np.sort(np.random.default_rng(seed).choice(n_cells, n, replace=False)).astype(np.int64)
    from geosketch import gs

    state = np.random.get_state()
    try:
        idx = gs(np.ascontiguousarray(scores, dtype=np.float64), int(n), replace=False, seed=int(seed))
    finally:
        np.random.set_state(state)
    return np.sort(np.asarray(idx, dtype=np.int64))
