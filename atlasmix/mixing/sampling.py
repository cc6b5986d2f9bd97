"""Seeded, hash-stable sampling of cells.

Every random choice of a resolution is derived from ``(spec seed, purpose, name)`` through sha256,
never from Python's ``hash`` or global state, so a spec resolves to the same cells in any process, on
any machine.

Random draws use *bottom-k (priority) sampling*: each cell gets the key
``splitmix64(soma_joinid XOR k)`` where ``k`` comes from ``(seed, purpose, name)``, and a draw of
``n`` cells takes the ``n`` smallest keys. splitmix64's finaliser (Steele, Lea & Flood 2014) is a
bijection of 64-bit integers, so keys never tie. Compared with ``Generator.choice`` this gives

* nesting: asking for more cells gives a superset of a smaller draw (data-scaling series);
* stability: cells added to or removed from the pool do not reshuffle the others;
* O(n) cost (``argpartition``) with no dependence on the pool's order.
"""

from __future__ import annotations

import hashlib

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def derive_key(seed: int, *parts: str) -> int:
    """A 64-bit integer from sha256 of ``seed`` and ``parts`` (stable across processes and platforms)."""
    h = hashlib.sha256("\x00".join(["atlasmix.mixing", str(int(seed)), *map(str, parts)]).encode())
    return int.from_bytes(h.digest()[:8], "little")


def rng(seed: int, *parts: str) -> np.random.Generator:
    """``numpy.random.Generator`` (PCG64) seeded by :func:`derive_key` of ``(seed, *parts)``."""
    return np.random.default_rng(derive_key(seed, *parts))


def splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser of uint64 values, shape preserved (a bijection on 64-bit integers)."""
    z = np.asarray(x, dtype=np.uint64) + _GOLDEN
    z ^= z >> np.uint64(30)
    z *= _M1
    z ^= z >> np.uint64(27)
    z *= _M2
    z ^= z >> np.uint64(31)
    return z


def priority_keys(joinids: np.ndarray, key: int) -> np.ndarray:
    """Sampling keys of cells: ``splitmix64(soma_joinid XOR key)``, uint64, same shape as ``joinids``."""
    with np.errstate(over="ignore"):
        return splitmix64(np.asarray(joinids, dtype=np.int64).view(np.uint64) ^ np.uint64(key))


def bottom_k(joinids: np.ndarray, n: int, key: int) -> np.ndarray:
    """The ``n`` cells of ``joinids`` with the smallest priority keys, sorted ascending (int64).

    Parameters
    ----------
    joinids : numpy.ndarray of int64
        Distinct soma_joinids (any order).
    n : int
        Cells to draw; ``n >= len(joinids)`` returns all of them.
    key : int
        64-bit key from :func:`derive_key`.
    """
    joinids = np.asarray(joinids, dtype=np.int64)
    if n >= len(joinids):
        return np.sort(joinids)
    if n <= 0:
        return np.empty(0, dtype=np.int64)
    k = priority_keys(joinids, key)
    idx = np.argpartition(k, n - 1)[:n]
    return np.sort(joinids[idx])


def largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Split ``total`` into integers proportional to ``weights`` (Hamilton's method; ties to the first).

    Returns
    -------
    numpy.ndarray of int64, same length as ``weights``, summing to ``total``.
    """
    w = np.asarray(weights, dtype=np.float64)
    if total <= 0 or len(w) == 0:
        return np.zeros(len(w), dtype=np.int64)
    exact = total * w / w.sum()
    base = np.floor(exact).astype(np.int64)
    rest = int(total - base.sum())
    order = np.lexsort((np.arange(len(w)), -(exact - base)))
    base[order[:rest]] += 1
    return base


def balanced_quota(sizes: np.ndarray, n: int, gen: np.random.Generator) -> np.ndarray:
    """Cells per group for an as-equal-as-possible draw of ``n`` cells (water-filling).

    Each group gets ``min(size, c)`` cells for the largest level ``c`` that fits in ``n``; the few
    cells left over (fewer than the number of groups still above ``c``) go to randomly chosen such
    groups. Groups smaller than the level give all their cells, and their shortfall is shared by the
    others, as in the cell-type re-weighting of scFM-dataselection.

    Parameters
    ----------
    sizes : numpy.ndarray of int64
        Cells available per group.
    n : int
        Cells to draw, ``0 <= n <= sizes.sum()``.
    gen : numpy.random.Generator
        Chooses which groups get the leftover cells.

    Returns
    -------
    numpy.ndarray of int64, per-group quota, ``<= sizes``, summing to ``n``.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    if n >= sizes.sum():
        return sizes.copy()
    lo, hi = 0, int(sizes.max())
    while lo < hi:  # largest c with sum(min(sizes, c)) <= n
        mid = (lo + hi + 1) // 2
        if np.minimum(sizes, mid).sum() <= n:
            lo = mid
        else:
            hi = mid - 1
    q = np.minimum(sizes, lo)
    rest = int(n - q.sum())
    if rest:
        open_ = np.flatnonzero(sizes > lo)
        q[gen.choice(open_, size=rest, replace=False)] += 1
    return q
