"""Cell fingerprints: a 64-bit hash of each cell's raw counts over the store's Ensembl gene space.

Two datasets can hold the same cells under different ids and formats (the same 10x run as an h5ad
and as a MEX folder; a CELLxGENE dataset and the paper's own file). soma_joinids cannot see that, so
atlasmix fingerprints every cell at ingest: cells with the same count on every gene (after gene
harmonisation) get the same fingerprint, whatever their barcode, gene order or source format.
Ingest reports (or refuses) cells that duplicate cells already in the store and records which
datasets copy which (catalog provenance); mixture resolution reports copies inside a manifest and
the evaluation refuses a held-out set whose cells duplicate training cells, both reading
fingerprints only of the datasets so recorded (:func:`copy_candidates`). An ingest reads every
stored dataset's fingerprints once (8 bytes per cell: ~0.06 s per 2M cells here).

The fingerprint of a cell with nonzero counts ``c_g`` on genes ``g`` is

    F = mix(sum_g mix(h(g) xor bits(c_g) * K) xor n * K)        (wrapping 64-bit arithmetic)

with ``h(g)`` the first 8 bytes of BLAKE2b of the gene's Ensembl id, ``bits(c)`` the IEEE-754 bit
pattern of the float32 count (the X layer's type), ``n`` the number of nonzero genes, ``K`` the
64-bit golden-ratio constant and ``mix`` the SplitMix64 finaliser (Steele, Lea & Flood 2014, "Fast
splittable pseudorandom number generators", OOPSLA; the constants of Java's ``SplittableRandom``).
The sum makes F independent of the order of the nonzeros, so no sort is needed. Two different cells
collide with probability ~2^-64 per pair (~7e-5 for any pair among 50M cells).

Cells with fewer than :data:`MIN_GENES` nonzero genes get fingerprint 0 (not fingerprinted): their
count vectors are low in entropy (two near-empty droplets with 1 count on the same few genes are
identical without being the same cell), so equality would not mean duplication.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
from numba import njit

#: fewest nonzero genes for a cell to be fingerprinted (cells below get 0 = not fingerprinted)
MIN_GENES = 20
_K = np.uint64(0x9E3779B97F4A7C15)  # 2^64 / golden ratio (SplitMix64's increment)


def gene_hashes(feature_ids) -> np.ndarray:
    """64-bit hash per gene id: the first 8 bytes of BLAKE2b of the id (UTF-8).

    Parameters
    ----------
    feature_ids : sequence of str, length G
        Ensembl gene ids (the store's ``var.feature_id``).

    Returns
    -------
    numpy.ndarray of uint64, shape (G,)
    """
    return np.array([int.from_bytes(hashlib.blake2b(str(f).encode(), digest_size=8).digest(), "little")
                     for f in feature_ids], dtype=np.uint64)


def _isin(x: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``np.isin`` through pandas' hash table: O(len(x) + len(values)), no sort (4M cells: ~0.1 s)."""
    return pd.Series(x, copy=False).isin(values).to_numpy() if len(x) and len(values) else np.zeros(len(x), bool)


def _sorted(a: np.ndarray) -> np.ndarray:
    """``a`` as a sorted int64 array, without sorting when it already is (manifests are sorted)."""
    a = np.asarray(a, dtype=np.int64)
    return a if len(a) < 2 or bool(np.all(a[1:] >= a[:-1])) else np.sort(a)


@njit(cache=True, nogil=True)
def _mix(z):  # pragma: no cover - compiled; tested through cell_fingerprints
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(cache=True, nogil=True)
def _fingerprints(indptr, indices, bits, gene_hash, keep, min_genes, out):  # pragma: no cover - compiled
    k = np.uint64(0x9E3779B97F4A7C15)
    for i in range(len(indptr) - 1):
        s = np.uint64(0)
        n = 0
        for j in range(indptr[i], indptr[i + 1]):
            b = bits[j]
            if b == 0 or b >= np.uint32(0x80000000) or not keep[indices[j]]:  # zero, negative, column left out
                continue
            s += _mix(gene_hash[indices[j]] ^ (np.uint64(b) * k))
            n += 1
        if n < min_genes:
            out[i] = 0
        else:
            f = _mix(s ^ (np.uint64(n) * k))
            out[i] = f if f != 0 else np.uint64(1)  # 0 means "not fingerprinted"


def cell_fingerprints(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, gene_hash: np.ndarray,
                      min_genes: int = MIN_GENES, keep: np.ndarray | None = None) -> np.ndarray:
    """Fingerprint each row of a CSR matrix of raw counts (see the module docstring).

    Parameters
    ----------
    indptr : numpy.ndarray of int, shape (B + 1,)
    indices : numpy.ndarray of int, shape (nnz,)
        Columns into ``gene_hash``; each (row, column) at most once (sum duplicates first).
    data : numpy.ndarray, shape (nnz,)
        Counts; cast to float32 (the store's X type). Zeros are ignored.
    gene_hash : numpy.ndarray of uint64, shape (G,)
        :func:`gene_hashes` of the columns' Ensembl ids.
    min_genes : int
        Rows with fewer nonzero genes get 0.
    keep : numpy.ndarray of bool, shape (G,), optional
        Columns to hash (default all): lets ingest hash a source's own columns, skipping those that
        map to no gene, when no two columns map to the same gene (no sum needed first).

    Returns
    -------
    numpy.ndarray of int64, shape (B,)
        The fingerprints as int64 (the uint64 bit pattern), 0 for rows not fingerprinted.
    """
    bits = np.ascontiguousarray(data, dtype=np.float32).view(np.uint32)
    out = np.empty(len(indptr) - 1, dtype=np.uint64)
    keep = np.ones(len(gene_hash), dtype=np.bool_) if keep is None else np.ascontiguousarray(keep, dtype=np.bool_)
    if len(keep) != len(gene_hash):
        raise ValueError("keep and gene_hash differ in length")
    _fingerprints(np.asarray(indptr, dtype=np.int64), np.ascontiguousarray(indices), bits,
                  np.ascontiguousarray(gene_hash, dtype=np.uint64), keep, int(min_genes), out)
    return out.view(np.int64)


def duplicates_in_store(store, fingerprints: list[np.ndarray], exclude: set[int] | frozenset = frozenset()) -> dict:
    """Which complete datasets of a store hold cells with the same counts as the given cells.

    Reads each stored dataset's fingerprints once (8 bytes per cell) and tests every array against
    them, so memory is set by the largest dataset, not the corpus.

    Parameters
    ----------
    store : atlasmix.store.Store
    fingerprints : list of numpy.ndarray of int64
        One array per group of cells to look up (e.g. per dataset being ingested); 0 = not
        fingerprinted, never matches.
    exclude : set of int
        Catalog joinids of datasets to skip (e.g. the one a ``--replace`` retires).

    Returns
    -------
    dict
        ``by_dataset``: per input array, {dataset_id: number of its cells whose counts equal a cell
        of that dataset}; ``example``: per input array, {dataset_id: (index into the array, obs_id of
        the matching stored cell)}; ``unchecked``: dataset_ids stored without fingerprints
        (ingested by an older atlasmix).
    """
    fps = [np.asarray(f, dtype=np.int64) for f in fingerprints]
    out: dict = {"by_dataset": [{} for _ in fps], "example": [{} for _ in fps], "unchecked": []}
    if not any(np.any(f != 0) for f in fps):
        return out
    for jid, row in store.catalog().iterrows():
        if int(jid) in exclude:
            continue
        stored = store.x_fingerprints(int(jid))
        if stored is None:
            out["unchecked"].append(str(row["dataset_id"]))
            continue
        for k, f in enumerate(fps):
            n, i, j = first_match(f, stored)
            if not n:
                continue
            j += int(row["obs_joinid_start"])
            with store._open("obs") as df:
                obs_id = df.read(coords=[[j]], column_names=["obs_id"]).concat()["obs_id"][0].as_py()
            out["by_dataset"][k][str(row["dataset_id"])] = n
            out["example"][k][str(row["dataset_id"])] = (i, obs_id)
    return out


def first_match(fingerprints: np.ndarray, other: np.ndarray) -> tuple[int, int, int]:
    """How many of ``fingerprints`` occur in ``other`` (0s never match), and the first such cell's
    index in each array (-1, -1 when none)."""
    hit = _isin(fingerprints, other[other != 0]) & (fingerprints != 0)
    n = int(hit.sum())
    if not n:
        return 0, -1, -1
    i = int(np.flatnonzero(hit)[0])
    return n, i, int(np.flatnonzero(other == fingerprints[i])[0])


def duplicates_within(fingerprints: np.ndarray) -> int:
    """Number of cells whose counts equal those of an earlier cell of the same array (0s excluded)."""
    fps = np.asarray(fingerprints, dtype=np.int64)
    fps = fps[fps != 0]
    return int(len(fps) - len(pd.unique(fps)))


def shared_cells(store, joinids: np.ndarray, other_joinids: np.ndarray) -> dict:
    """Cells of ``joinids`` whose counts equal those of a cell of ``other_joinids`` (by fingerprint).

    Finds the same cells stored twice under different soma_joinids (e.g. a held-out dataset that is
    a copy of a training dataset in another format). Streams one dataset's fingerprints at a time
    and tests membership with a hash table (no sort of ``other_joinids`` when it is sorted, as
    manifests are), so ``other_joinids`` may be the whole corpus.

    Parameters
    ----------
    store : atlasmix.store.Store
    joinids : numpy.ndarray of int64, shape (n,)
        Cells to test (e.g. an evaluation set).
    other_joinids : numpy.ndarray of int64, shape (m,)
        Cells to test against (e.g. a training manifest).

    Returns
    -------
    dict
        ``n_shared`` (cells of ``joinids``), ``datasets`` ({dataset_id of ``other_joinids`` cells:
        number of ``joinids`` cells they duplicate}), ``unchecked`` (dataset_ids holding cells of
        either set but stored without fingerprints).
    """
    fa, unchecked = fingerprints_of(store, joinids)
    fa = fa[fa != 0]
    out: dict = {"n_shared": 0, "datasets": {}, "unchecked": list(unchecked)}
    if not len(fa):  # no fingerprinted cell to look for
        return out
    b = _sorted(other_joinids)
    shared = []
    for did, s, lo, hi, f in _per_dataset(store, b):
        if f is None:
            if did not in out["unchecked"]:
                out["unchecked"].append(did)
            continue
        fb = f[b[lo:hi] - s]
        common = pd.unique(fb[_isin(fb, fa) & (fb != 0)])
        if len(common):
            out["datasets"][did] = int(_isin(fa, common).sum())
            shared.append(common)
    if shared:
        out["n_shared"] = int(_isin(fa, np.concatenate(shared)).sum())
    return out


def fingerprints_of(store, joinids: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Fingerprints of the given cells, read one stored dataset at a time.

    Parameters
    ----------
    store : atlasmix.store.Store
    joinids : numpy.ndarray of int64, shape (n,)
        Cells of complete datasets.

    Returns
    -------
    (numpy.ndarray of int64, list of str)
        Fingerprints in the order of ``joinids`` (0 for cells not fingerprinted, including cells of
        datasets stored without fingerprints), and the dataset_ids of the latter.
    """
    ids = np.asarray(joinids, dtype=np.int64)
    srt = _sorted(ids)
    order = None if srt is ids else np.argsort(ids, kind="stable")
    out = np.zeros(len(ids), np.int64)
    unchecked = []
    for did, s, lo, hi, f in _per_dataset(store, srt):
        if f is None:
            unchecked.append(did)
        else:
            out[slice(lo, hi) if order is None else order[lo:hi]] = f[srt[lo:hi] - s]
    return out, unchecked


def _per_dataset(store, srt: np.ndarray):
    """Per complete dataset holding cells of the sorted joinids ``srt``: (dataset_id, its first
    joinid, lo, hi, its fingerprints or None) with ``srt[lo:hi]`` its cells."""
    for jid, row in store.catalog().iterrows():
        s, e = int(row["obs_joinid_start"]), int(row["obs_joinid_end"])
        lo, hi = int(np.searchsorted(srt, s)), int(np.searchsorted(srt, e))
        if hi > lo:
            yield str(row["dataset_id"]), s, lo, hi, store.x_fingerprints(int(jid))


def copy_suspects(catalog: pd.DataFrame, dataset_ids) -> tuple[set[str], list[str]]:
    """Datasets among ``dataset_ids`` that can hold copies of each other's (or their own) cells.

    Ingest records, for each dataset, the stored datasets whose cells it copies and its repeats of
    its own cells (catalog provenance ``duplicate_cells``); every pair of copies is recorded by the
    later of the two. So among a set of datasets, only those named in such a record with another
    member (or with repeats of their own) need their fingerprints read: resolving a mixture over
    datasets without copies costs no fingerprint read at all.

    Parameters
    ----------
    catalog : pandas.DataFrame
        ``Store.catalog()``.
    dataset_ids : iterable of str

    Returns
    -------
    (set of str, list of str)
        The suspects, and the datasets without a record (ingested before fingerprints).
    """
    import json

    ids = set(map(str, dataset_ids))
    suspects: set[str] = set()
    unchecked = []
    for did, prov in zip(catalog["dataset_id"], catalog["provenance"]):
        if did not in ids:
            continue
        rec = json.loads(prov or "{}").get("duplicate_cells")
        if rec is None:
            unchecked.append(str(did))
            continue
        if rec.get("within_dataset"):
            suspects.add(did)
        for other in rec.get("by_dataset", {}):
            if other in ids:
                suspects |= {did, other}
    return suspects, sorted(unchecked)


def copy_candidates(store, *joinids: np.ndarray) -> tuple[list[np.ndarray], list[str]]:
    """Keep, of each joinid array, the cells of datasets that may hold copies of each other's cells.

    Uses :func:`copy_suspects` over the datasets the arrays touch, so callers read fingerprints
    only where ingest found copies (usually nowhere).

    Parameters
    ----------
    store : atlasmix.store.Store
    *joinids : numpy.ndarray of int64
        Cell soma_joinids (complete datasets), any order.

    Returns
    -------
    (list of numpy.ndarray of int64, list of str)
        The arrays restricted to suspect datasets (order kept), and the touched datasets ingested
        without fingerprints.
    """
    cat = store.catalog().sort_values("obs_joinid_start")
    starts = cat["obs_joinid_start"].to_numpy(np.int64)
    ends = cat["obs_joinid_end"].to_numpy(np.int64)
    names = cat["dataset_id"].to_numpy(object)
    where = []
    for ids in joinids:
        ids = np.asarray(ids, dtype=np.int64)
        k = np.searchsorted(starts, ids, side="right") - 1
        ok = (k >= 0) & (ids < ends[np.clip(k, 0, None)]) if len(starts) else np.zeros(len(ids), bool)
        where.append((ids, k, ok))
    hit = np.zeros(len(names), bool)
    for _, k, ok in where:
        hit |= np.bincount(k[ok], minlength=len(names)).astype(bool)  # O(n), no sort
    touched = set(names[hit])
    suspects, unchecked = copy_suspects(cat, touched)
    is_suspect = np.array([n in suspects for n in names], dtype=bool)
    out = [ids[ok & is_suspect[np.clip(k, 0, None)]] if len(names) else ids[:0] for ids, k, ok in where]
    return out, unchecked
