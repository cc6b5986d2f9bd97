"""Exact per-gene nonzero medians of CP10k expression, computed out of core.

Geneformer (Theodoris et al. 2023) divides each gene's CP10k value (counts / n_counts * 10,000)
by the gene's *nonzero median* over the pretraining corpus (its cells with a nonzero count of
the gene); Geneformer estimated these medians with a t-digest. Here they are **exact** (the
``numpy.median`` of the gene's nonzero CP10k values: the mean of the two middle values for an
even count) with two streaming passes over X and memory independent of the number of cells:

1. For every gene, a histogram of its nonzero CP10k values over ``bins_per_octave`` log2-spaced
   bins (values outside ``[2^lo_octave, 2^hi_octave)`` fall into the end bins, which keeps the
   method exact: bins only locate the ranks). This fixes, per gene, the number of nonzero values
   ``n`` and the bin(s) holding the middle order statistics ``(n - 1) // 2`` and ``n // 2``.
2. A second pass keeps only the values that fall into those one or two bins per gene; sorting
   them gives the two middle values exactly.

Memory: genes x bins int64 for the histograms (20,000 genes x 192 bins = 31 MB, plus a temporary
of the same size per chunk) plus the values that fall into the median bins (16 bytes each; with
8 bins per octave, a bin spans 9% in value, so typically a few percent of all nonzeros; raise
``bins_per_octave`` to shrink it for very large corpora), plus the loader's IO buffers. Measured:
25,395 cells x 54,793 human genes of ``../shared/data`` in 7 s, 1.1 GB peak RSS (CLI, 2 cores). Both passes stream cells through
:class:`atlasmix.training.loader.MixtureLoader` (store order, no shuffle) and compute the values
with the same float64 operations, so a value lands in the same bin in both passes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from atlasmix.errors import AtlasmixError
from atlasmix.preprocess import TARGET_SUM



def species_genes(store, species: str = "human") -> np.ndarray:
    """Var joinids of the store genes of ``species`` (``human`` matches ``Homo sapiens``; ``all``: every gene).

    Raises
    ------
    AtlasmixError
        No gene of that species.
    """
    var = store.var()
    if species == "all":
        return var.index.to_numpy(dtype=np.int64)
    sp = var["species"].astype(str).str.lower()
    want = species.lower()
    keep = sp.str.contains(want, regex=False) | ((want == "human") & sp.str.contains("homo sapiens", regex=False))
    if not keep.any():
        raise AtlasmixError(f"no store gene has species {species!r}")
    return var.index.to_numpy(dtype=np.int64)[keep.to_numpy()]


def _bins(v: np.ndarray, lo: float, bpo: int, nb: int) -> np.ndarray:
    b = np.floor((np.log2(v) - lo) * bpo)
    return np.clip(b, 0, nb - 1).astype(np.int64)


def _batches(store, cells, split: str, var_joinids: np.ndarray, chunk_size: int):
    from atlasmix.training.loader import MixtureLoader

    L = MixtureLoader(store, cells, split, var_joinids=var_joinids, batch_size=chunk_size,
                      io_batch_size=chunk_size, shuffle=False, obs_columns=(), library="total_counts",
                      sparse=True, rank=0, world_size=1)
    for b in L:
        X = b["X"]
        indptr = X.crow_indices().numpy()
        cols = X.col_indices().numpy()
        data = X.values().numpy().astype(np.float64)
        nc = b["library_size"].numpy().ravel().astype(np.float64)
        row = np.repeat(np.arange(len(nc)), np.diff(indptr))
        keep = data > 0
        if not keep.all():
            cols, data, row = cols[keep], data[keep], row[keep]
        yield cols, data / nc[row] * TARGET_SUM  # CP10k, as Geneformer: counts / n_counts * 10,000


def gene_medians(store, cells=None, split: str = "train", var_joinids: np.ndarray | None = None, *,
                 chunk_size: int = 8192, bins_per_octave: int = 8, lo_octave: int = -10,
                 hi_octave: int = 14, progress=None) -> pd.DataFrame:
    """Exact nonzero median of CP10k expression per gene over a set of cells (two streaming passes).

    Parameters
    ----------
    store : atlasmix.store.Store
    cells : path, pyarrow.Table or numpy.ndarray, optional
        A manifest (its ``split`` cells) or cell joinids; default every complete cell of the store.
    split : str
        Manifest split whose cells are used.
    var_joinids : numpy.ndarray of int64, optional
        Genes (default all store genes).
    chunk_size : int
        Cells per read.
    bins_per_octave, lo_octave, hi_octave : int
        Histogram resolution and range (log2 of CP10k); they change memory, never the result.
    progress : callable, optional
        ``progress(pass_index, cells_done)``.

    Returns
    -------
    pandas.DataFrame
        Index ``soma_joinid`` (var joinid); columns ``feature_id``, ``feature_name``, ``median``
        (float64, NaN when the gene is zero in every cell), ``n_nonzero`` (int64).

    Raises
    ------
    AtlasmixError
        No cells, or a cell with counts has ``total_counts <= 0``.
    """
    var = store.var()
    vj = var.index.to_numpy(dtype=np.int64) if var_joinids is None else np.asarray(var_joinids, dtype=np.int64)
    if cells is None:
        cells = store.obs([])["soma_joinid"].to_numpy()
        if len(cells) == 0:
            raise AtlasmixError("the store has no cells")
    G = len(vj)
    nb = (hi_octave - lo_octave) * bins_per_octave
    hist = np.zeros(G * nb, dtype=np.int64)
    done = 0
    for cols, v in _batches(store, cells, split, vj, chunk_size):
        if len(v) and not np.all(np.isfinite(v)):
            raise AtlasmixError("a cell with counts has total_counts <= 0 in obs")
        hist += np.bincount(cols * nb + _bins(v, lo_octave, bins_per_octave, nb), minlength=G * nb)
        done += 1
        if progress:
            progress(1, done)
    hist = hist.reshape(G, nb)
    cum = np.cumsum(hist, axis=1)
    n = cum[:, -1]
    has = n > 0
    r_lo, r_hi = (n - 1) // 2, n // 2
    b_lo = np.where(has, (cum <= r_lo[:, None]).sum(axis=1), -1)  # first bin whose cum count > rank
    b_hi = np.where(has, (cum <= r_hi[:, None]).sum(axis=1), -1)
    before = np.where(b_lo > 0, cum[np.arange(G), np.maximum(b_lo - 1, 0)], 0)
    before[b_lo == 0] = 0
    keep_c, keep_v = [], []
    done = 0
    for cols, v in _batches(store, cells, split, vj, chunk_size):
        b = _bins(v, lo_octave, bins_per_octave, nb)
        sel = (b == b_lo[cols]) | (b == b_hi[cols])
        keep_c.append(cols[sel].astype(np.int64))
        keep_v.append(v[sel])
        done += 1
        if progress:
            progress(2, done)
    c = np.concatenate(keep_c) if keep_c else np.zeros(0, np.int64)
    v = np.concatenate(keep_v) if keep_v else np.zeros(0)
    o = np.lexsort((v, c))
    c, v = c[o], v[o]
    first = np.searchsorted(c, np.arange(G))
    med = np.full(G, np.nan)
    idx = np.flatnonzero(has)
    lo_v = v[first[idx] + (r_lo[idx] - before[idx])]
    hi_v = v[first[idx] + (r_hi[idx] - before[idx])]
    med[idx] = (lo_v + hi_v) / 2.0
    sub = var.loc[vj]
    return pd.DataFrame({"feature_id": sub["feature_id"].to_numpy(), "feature_name": sub["feature_name"].to_numpy(),
                         "median": med, "n_nonzero": n.astype(np.int64)}, index=pd.Index(vj, name="soma_joinid"))
