"""Shared preprocessing of raw counts: log-CP10k normalisation and streamed HVG statistics.

One implementation of each, used by the mixing stage (HVG gene axes, geometric sketching), the
training stage (Geneformer's CP10k) and the evaluation (reconstruction on HVGs). They follow scanpy:
``sc.pp.normalize_total(target_sum=1e4)`` + ``sc.pp.log1p`` and ``sc.pp.highly_variable_genes(
flavor="seurat")`` (scanpy 1.11, ``scanpy/preprocessing/_highly_variable_genes.py``). Counts are raw
UMI counts, cells x genes (CSR or dense); CP10k = counts / library size x 10,000.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

TARGET_SUM = 1e4
"""CP10k's target sum: counts per cell after normalisation."""


# ---------------------------------------------------------------------------------------------- basics
def log1p_cp10k(counts, target_sum: float = TARGET_SUM, library: np.ndarray | None = None
                ) -> np.ndarray | sp.csr_matrix:
    """log1p of counts normalised to ``target_sum`` per cell (scanpy ``normalize_total`` + ``log1p``).

    Parameters
    ----------
    counts : numpy.ndarray or scipy.sparse matrix, shape (n_cells, n_genes)
        Raw counts.
    target_sum : float
        Counts per cell after normalisation (10,000: CP10k).
    library : numpy.ndarray, shape (n_cells,), optional
        Library sizes to normalise by (e.g. obs ``total_counts`` over all genes when ``counts`` holds
        a gene subset); default the row sums of ``counts``.

    Returns
    -------
    numpy.ndarray (float64) or scipy.sparse.csr_matrix (float64), same shape
        Cells with no counts stay all-zero.
    """
    if sp.issparse(counts):
        m = sp.csr_matrix(counts, dtype=np.float64, copy=True)
        lib = np.asarray(m.sum(axis=1)).ravel() if library is None else np.asarray(library, dtype=np.float64).ravel()
        scale = np.divide(target_sum, lib, out=np.zeros_like(lib), where=lib > 0)
        m.data *= np.repeat(scale, np.diff(m.indptr))
        np.log1p(m.data, out=m.data)
        return m
    x = np.asarray(counts, dtype=np.float64)
    lib = x.sum(axis=1, keepdims=True) if library is None else np.asarray(library, dtype=np.float64).reshape(-1, 1)
    scale = np.divide(target_sum, lib, out=np.zeros_like(lib), where=lib > 0)
    return np.log1p(x * scale)



class HVGStats:
    """Streaming per-gene moments of CP10k for scanpy's ``seurat``-flavour highly variable genes.

    scanpy's ``highly_variable_genes(flavor="seurat")`` on a log1p(CP10k) layer undoes the log
    (``expm1``), computes per-gene mean and (ddof=1) variance of CP10k, the log dispersion
    ``log(var / mean)`` and ``log1p(mean)``, bins genes into 20 equal-width bins of ``log1p(mean)``,
    z-scores the dispersion within each bin and takes the genes with the largest normalised
    dispersion. Only the per-gene sum and sum of squares of CP10k are needed, so they are
    accumulated over streamed batches (exact, O(n_genes) memory) and :meth:`top_genes` repeats
    scanpy's steps (checked against scanpy in the tests).

    Parameters
    ----------
    n_genes : int
        Width of the gene axis.
    """

    def __init__(self, n_genes: int):
        self.n = 0
        self.s1 = np.zeros(n_genes, dtype=np.float64)
        self.s2 = np.zeros(n_genes, dtype=np.float64)

    def update(self, counts) -> None:
        """Add a batch of raw counts, shape (n_cells, n_genes) (CSR or dense)."""
        x = log1p_cp10k(counts)
        if sp.issparse(x):
            x.data = np.expm1(x.data)
            self.s1 += np.asarray(x.sum(axis=0)).ravel()
            self.s2 += np.asarray(x.multiply(x).sum(axis=0)).ravel()
        else:
            x = np.expm1(x)
            self.s1 += x.sum(axis=0)
            self.s2 += (x * x).sum(axis=0)
        self.n += x.shape[0]

    def table(self, n_bins: int = 20) -> pd.DataFrame:
        """Per-gene ``means``, ``dispersions``, ``dispersions_norm`` (scanpy's column names and values)."""
        n = self.n
        mean = self.s1 / max(n, 1)
        var = (self.s2 - n * mean * mean) / max(n - 1, 1)
        var = np.maximum(var, 0.0)
        mean[mean == 0] = 1e-12
        disp = var / mean
        disp[disp == 0] = np.nan
        with np.errstate(divide="ignore"):
            disp = np.log(disp)
        mean = np.log1p(mean)
        df = pd.DataFrame({"means": mean, "dispersions": disp})
        df["mean_bin"] = pd.cut(df["means"], bins=n_bins)
        grp = df.groupby("mean_bin", observed=False)["dispersions"]
        avg, dev = grp.mean(), grp.std(ddof=1)
        one = dev.isnull()
        dev[one] = avg[one]
        avg[one] = 0
        b = df["mean_bin"]
        df["dispersions_norm"] = (df["dispersions"].to_numpy() - avg.loc[b].to_numpy()) / dev.loc[b].to_numpy()
        return df

    def top_genes(self, n_top: int = 1000) -> np.ndarray:
        """Column indices of the ``n_top`` most variable genes (sorted ascending).

        Returns
        -------
        numpy.ndarray of int64
            scanpy's selection: genes whose normalised dispersion (NaN -> 0) is at least the
            ``n_top``-th largest non-NaN normalised dispersion (ties can give a few more genes).
        """
        dn = self.table()["dispersions_norm"].to_numpy()
        ok = dn[~np.isnan(dn)]
        if len(ok) == 0:
            return np.empty(0, dtype=np.int64)
        ok = np.sort(ok)[::-1]
        cut = ok[min(n_top, len(ok)) - 1]
        return np.flatnonzero(np.nan_to_num(dn) >= cut).astype(np.int64)
