"""Compiled (numba) inner loops of the simulator: alias tables, the sparse NB sampler, MEX formatting.

Why a compound-Poisson sampler
------------------------------
A negative-binomial count ``X ~ NB(mean mu, size r)`` is a compound Poisson sum: the number of
*clusters* is ``Poisson(r * log(1 + mu / r))`` and each cluster has a logarithmic-series size with
parameter ``q = mu / (mu + r)`` (Quenouille 1949). Summed over genes, the clusters of one cell form a
single Poisson process whose events fall on gene ``g`` with probability proportional to
``rho_g = r_g * log(1 + mu_g / r_g)``. Sampling the cell's cluster count, then a gene per cluster
(Walker's alias method, O(1)) and a size per cluster (inverse CDF), costs O(#clusters) -- about the
number of detected genes -- instead of O(#genes) gamma and Poisson draws. This is exact NB sampling.

Random numbers inside the kernels come from SplitMix64 (Steele, Lea & Flood 2014), seeded per cell,
so that a cell's counts do not depend on the thread, block or chunk it is generated in.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

@njit(inline="always", cache=True)
def _next(state):
    """SplitMix64 step: return (new_state, 64 random bits)."""
    state = state + np.uint64(0x9E3779B97F4A7C15)
    z = state
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return state, z ^ (z >> np.uint64(31))


_THR_BITS = 33  # low bits of a packed alias record hold the threshold (0..2**32)


@njit(cache=True)
def build_alias(weights):
    """Walker/Vose alias table for sampling an index with probability proportional to ``weights``.

    Parameters
    ----------
    weights : ndarray of float64, shape (G,)
        Non-negative weights with a positive sum; ``G < 2**31``.

    Returns
    -------
    ndarray of uint64, shape (G,)
        Packed records ``alias << 33 | threshold``: column ``i`` is kept when 32 uniform bits are
        below ``threshold`` (``prob * 2**32``), otherwise ``alias`` is taken.
    """
    n = weights.shape[0]
    total = weights.sum()
    scaled = weights * (n / total)
    prob = np.ones(n, np.float64)
    alias = np.arange(n)
    small = np.empty(n, np.int64)
    large = np.empty(n, np.int64)
    ns = 0
    nl = 0
    for i in range(n):
        if scaled[i] < 1.0:
            small[ns] = i
            ns += 1
        else:
            large[nl] = i
            nl += 1
    while ns > 0 and nl > 0:
        ns -= 1
        s = small[ns]
        lg = large[nl - 1]
        prob[s] = scaled[s]
        alias[s] = lg
        scaled[lg] = (scaled[lg] + scaled[s]) - 1.0
        if scaled[lg] < 1.0:
            nl -= 1
            small[ns] = lg
            ns += 1
    # what is left has probability 1 up to rounding
    for i in range(nl):
        prob[large[i]] = 1.0
    for i in range(ns):
        prob[small[i]] = 1.0
    out = np.empty(n, np.uint64)
    for i in range(n):
        thr = np.uint64(min(prob[i] * 4294967296.0, 4294967296.0))
        out[i] = (np.uint64(alias[i]) << np.uint64(_THR_BITS)) | thr
    return out


@njit(inline="always", cache=True)
def _logseries(rec, u):
    """Inverse-CDF draw from a logarithmic-series distribution.

    ``rec`` holds ``(P(1), q)`` (P(1) = -q / log(1 - q)). Sizes 1-3 (~90 % of draws) are found
    without branches from ``P(k+1) = P(k) * q * k / (k + 1)``; larger ones continue the recursion.
    """
    p1 = float(rec[0])
    q = float(rec[1])
    p2 = p1 * q * 0.5
    p3 = p2 * q * (2.0 / 3.0)
    f2 = p1 + p2
    f3 = f2 + p3
    s = 1 + (u > p1) + (u > f2) + (u > f3)
    if s < 4:
        return s
    cdf = f3
    pk = p3
    k = 3
    while u > cdf:
        pk = pk * q * k / (k + 1)
        k += 1
        cdf += pk
        if pk <= 1e-300:
            break
    return k


def logseries_records(q: np.ndarray) -> np.ndarray:
    """Records ``(P(1), q)`` (float32, shape ``q.shape + (2,)``) for :func:`_logseries`.

    Parameters
    ----------
    q : ndarray of float64
        Logarithmic-series parameters in [0, 1); ``q = 0`` gives the point mass at 1.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        p1 = np.where(q > 0, q / -np.log1p(-q), 1.0)
    return np.stack([p1, q], axis=-1).astype(np.float32)


#: De Bruijn sequence and table: index of the lowest set bit of a 64-bit word without a branch.
_DEBRUIJN = 0x03F79D71B4CB0A89
_DEBRUIJN_TABLE = (0, 1, 48, 2, 57, 49, 28, 3, 61, 58, 50, 42, 38, 29, 17, 4, 62, 55, 59, 36, 53, 51, 43,
                   22, 45, 39, 33, 30, 24, 18, 12, 5, 63, 47, 56, 27, 60, 41, 37, 16, 54, 35, 52, 21,
                   44, 32, 23, 11, 46, 26, 40, 15, 34, 20, 31, 10, 25, 14, 19, 9, 13, 8, 7, 6)


@njit(cache=True)
def _draw_clusters(buf, bits, st, n_clusters, alias, lsr):
    """Add ``n_clusters`` NB clusters of one cell to ``buf`` (marking genes in ``bits``); return the RNG state.

    One 64-bit draw per cluster: its high 32 bits pick an alias column and test its threshold,
    its low 32 bits give the uniform of the cluster size.
    """
    G = alias.shape[0]
    lo32 = np.uint64(0xFFFFFFFF)
    thr_mask = np.uint64((1 << _THR_BITS) - 1)
    g64 = np.uint64(G)
    one = np.uint64(1)
    for _ in range(n_clusters):
        st, z = _next(st)
        x = (z >> np.uint64(32)) * g64
        i = x >> np.uint64(32)
        rec = alias[i]
        gene = i if (x & lo32) < (rec & thr_mask) else rec >> np.uint64(_THR_BITS)
        u2 = (float(z & lo32) + 0.5) * (1.0 / 4294967296.0)
        buf[gene] += _logseries(lsr[gene], u2)
        bits[gene >> np.uint64(6)] |= one << (gene & np.uint64(63))
    return st


@njit(parallel=True, cache=True)
def sample_cells(table, n_clusters, lib_nuc, mito_counts, mito_idx, seeds,
                 alias, lsr, pmean, dropout_on, dropout_mid, dropout_shape, n_threads,
                 work_idx, work_val, out_idx, out_val, out_base):
    """Draw the sparse count rows of a block of cells (compound-Poisson NB, see module docstring).

    Parameters
    ----------
    table : int64 (n,)
        Expression table (group x donor) of each cell.
    n_clusters : int64 (n,)
        Number of NB clusters of each cell (already Poisson-drawn).
    lib_nuc : float64 (n,)
        Nuclear library size of each cell (UMIs), used only by dropout.
    mito_counts : int64 (n, M)
        Counts of the M mitochondrial genes of each cell.
    mito_idx : int64 (M,)
        Gene positions of the mitochondrial genes.
    seeds : uint64 (n,)
        SplitMix64 seed per cell.
    alias : uint64 (T, G)
        Packed alias tables over genes of the cluster rates (:func:`build_alias`).
    lsr : float32 (T, G, 2)
        Logarithmic-series records of the cluster sizes per gene (:func:`logseries_records`).
    pmean : float64 (T, G)
        Expected proportion of each gene (used only by dropout).
    dropout_on : bool
        Apply Splatter's logistic dropout to the drawn counts.
    dropout_mid, dropout_shape : float
        Dropout midpoint (log mean) and shape of the logistic.
    n_threads : int
        Number of cell partitions processed in parallel (``numba.get_num_threads()``); the result
        does not depend on it.
    work_idx : int32 (>= W,), work_val : float32 (>= W,)
        Scratch space, ``W = sum(n_clusters) + n * M`` (reused between calls: fresh memory costs
        page faults).
    out_idx : int32 (>= out_base + W,), out_val : float32 (>= out_base + W,)
        Destination of the CSR column indices and values.
    out_base : int
        Position in ``out_idx``/``out_val`` of the block's first non-zero.

    Returns
    -------
    ndarray of int64, shape (n + 1,)
        CSR row pointer of the block, starting at 0 (add ``out_base`` for positions in ``out_*``);
        column indices are sorted within each row.
    """
    n = table.shape[0]
    G = alias.shape[1]
    M = mito_idx.shape[0]
    offs = np.empty(n + 1, np.int64)
    offs[0] = 0
    for c in range(n):
        offs[c + 1] = offs[c] + n_clusters[c] + M
    nnz = np.zeros(n, np.int64)
    order = np.argsort(table, kind="mergesort")  # cells of one table together: cache locality
    nth = min(n_threads, max(n, 1))
    nw = (G + 63) // 64
    db = np.uint64(_DEBRUIJN)
    for th in prange(nth):
        buf = np.zeros(G, np.int32)
        bits = np.zeros(nw, np.uint64)
        for oc in range(th * n // nth, (th + 1) * n // nth):
            c = order[oc]
            t = table[c]
            st = _draw_clusters(buf, bits, seeds[c], n_clusters[c], alias[t], lsr[t])
            for m in range(M):
                if mito_counts[c, m] > 0:
                    g = mito_idx[m]
                    buf[g] += mito_counts[c, m]
                    bits[g >> 6] |= np.uint64(1) << np.uint64(g & 63)
            pos = offs[c]
            # visit the touched genes in increasing order through the bitmap (no scan of all G)
            for w in range(nw):
                word = bits[w]
                if word == 0:
                    continue
                bits[w] = 0
                while word != 0:
                    low = word & (~word + np.uint64(1))
                    j = w * 64 + _DEBRUIJN_TABLE[(low * db) >> np.uint64(58)]
                    word ^= low
                    v = buf[j]
                    buf[j] = 0
                    if dropout_on:
                        mu = lib_nuc[c] * pmean[t, j]
                        if mu > 0.0:
                            pdrop = 1.0 / (1.0 + np.exp(-dropout_shape * (np.log(mu) - dropout_mid)))
                            st, z = _next(st)
                            if float(z >> np.uint64(11)) * (1.0 / 9007199254740992.0) < pdrop:
                                continue
                    work_idx[pos] = j
                    work_val[pos] = v
                    pos += 1
            nnz[c] = pos - offs[c]
    indptr = np.empty(n + 1, np.int64)
    indptr[0] = 0
    for c in range(n):
        indptr[c + 1] = indptr[c] + nnz[c]
    for c in prange(n):
        a = offs[c]
        b = out_base + indptr[c]
        for k in range(nnz[c]):
            out_idx[b + k] = work_idx[a + k]
            out_val[b + k] = work_val[a + k]
    return indptr


@njit(inline="always", cache=True)
def _write_int(buf, pos, v):
    if v == 0:
        buf[pos] = 48
        return pos + 1
    n = 0
    x = v
    while x > 0:
        n += 1
        x //= 10
    x = v
    for k in range(n - 1, -1, -1):
        buf[pos + k] = 48 + x % 10
        x //= 10
    return pos + n


@njit(cache=True)
def format_mtx(indptr, indices, data, col_offset):
    """Format CSR rows (cells) as MatrixMarket lines ``gene cell value`` (1-based, genes x cells).

    Parameters
    ----------
    indptr : int64 (n + 1,), indices : int32 (nnz,), data : float32 (nnz,)
        CSR chunk of cells x genes with integer-valued data.
    col_offset : int
        Index of the chunk's first cell in the whole matrix.

    Returns
    -------
    ndarray of uint8
        ASCII bytes of the lines.
    """
    n = indptr.shape[0] - 1
    nnz = indices.shape[0]
    buf = np.empty(nnz * 32 + 1, np.uint8)
    pos = 0
    for c in range(n):
        for k in range(indptr[c], indptr[c + 1]):
            pos = _write_int(buf, pos, int(indices[k]) + 1)
            buf[pos] = 32
            pos = _write_int(buf, pos + 1, c + col_offset + 1)
            buf[pos] = 32
            pos = _write_int(buf, pos + 1, int(data[k]))
            buf[pos] = 10
            pos += 1
    return buf[:pos]
