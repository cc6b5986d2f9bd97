"""A loader's split held in memory: the CSR of its cells on its gene axis, read once, served every epoch.

scvi-tools trains on an in-memory AnnData: it reads the cells once (building the AnnData), then every
epoch is a gather from RAM. Streamed from the store, every epoch decodes the rows again, and the
store's x layout decodes *whole rows*: on a 2,000-gene axis that is ~10x the nonzeros the model uses,
and for a mixture drawn sparsely from a large store each compressed chunk yields only a few of its
rows. When the split's cells on the gene axis are small, :class:`InMemoryX` reads them once in store
order (whole chunks, no random access) and serves the loader's IO batches from memory; the epoch
order, the in-memory shuffle and hence every minibatch are exactly those of the streamed loader.

Memory is 8 bytes per nonzero on the gene axis (float32 value, int32 column) plus 8 bytes per cell:
it follows the split and its gene axis, never the store, and :func:`load_split` gives up (and the
loader streams) as soon as it would pass a byte cap.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import scipy.sparse as sp
from numba import njit

from atlasmix._buffers import grown
from atlasmix.errors import AtlasmixError
from atlasmix.training.read import RowReader

IN_MEMORY_MAX_BYTES = 2 * 1024**3
"""Default cap of one loader's in-memory split (bytes): 2 GiB, or ``ATLASMIX_IN_MEMORY_MAX_GB``."""


def cap_bytes() -> int:
    """The in-memory cap in bytes: ``ATLASMIX_IN_MEMORY_MAX_GB`` (GB, 1e9 bytes) if set, else
    :data:`IN_MEMORY_MAX_BYTES`.

    Raises
    ------
    AtlasmixError
        The variable is not a non-negative number.
    """
    v = os.environ.get("ATLASMIX_IN_MEMORY_MAX_GB")
    if v is None or v == "":
        return IN_MEMORY_MAX_BYTES
    try:
        gb = float(v)
    except ValueError:
        gb = -1.0
    if not 0 <= gb < float("inf"):
        raise AtlasmixError(f"ATLASMIX_IN_MEMORY_MAX_GB must be a finite number of GB >= 0, got {v!r}")
    return int(gb * 1e9)


@njit(nogil=True, cache=True)
def _gather_kernel(indptr, indices, data, rows, out_indptr, out_indices, out_data):  # pragma: no cover
    k = 0
    for i in range(rows.shape[0]):
        r = rows[i]
        for j in range(indptr[r], indptr[r + 1]):
            out_indices[k] = indices[j]
            out_data[k] = data[j]
            k += 1
        out_indptr[i + 1] = k


class InMemoryX(RowReader):
    """Rows of a CSR matrix keyed by ascending row keys, read like an X source (a :class:`RowReader`).

    Parameters
    ----------
    keys : numpy.ndarray of int64, shape (n,)
        Row keys, strictly ascending (store ``soma_joinid`` s, or x cache row positions).
    m : scipy.sparse.csr_matrix, float32, int32 indices, shape (n, n_vars)
        Row ``i`` is the row of ``keys[i]``, already on the loader's gene axis. Anything with a
        CSR's ``indptr``, ``indices``, ``data`` and ``shape`` will do: :func:`load_split` passes its
        arrays as they are, since scipy would copy int32 indices to int64 past 2**31 nonzeros.
    """

    def __init__(self, keys: np.ndarray, m: sp.csr_matrix):
        self.keys = np.asarray(keys, dtype=np.int64)
        if m.shape[0] != len(self.keys):
            raise AtlasmixError(f"{m.shape[0]} rows for {len(self.keys)} keys")
        self.indptr = m.indptr.astype(np.int64, copy=False)
        self.indices = m.indices.astype(np.int32, copy=False)
        self.data = m.data.astype(np.float32, copy=False)
        self.n_vars = int(m.shape[1])

    def close(self) -> None:
        """Nothing to close (read threads treat this like an open X handle)."""

    @property
    def nbytes(self) -> int:
        """Bytes held (values, columns, row pointers, keys)."""
        return int(self.indptr.nbytes + self.indices.nbytes + self.data.nbytes + self.keys.nbytes)

    def held_rows(self, ids_sorted: np.ndarray) -> HeldRows:
        """Rows of keys ``ids_sorted`` as a view of the held CSR (nothing is copied).

        Raises
        ------
        AtlasmixError
            A key is not held.
        """
        ids = np.asarray(ids_sorted, dtype=np.int64)
        rows = np.searchsorted(self.keys, ids)
        if len(ids) and (rows[-1] >= len(self.keys) or not np.array_equal(self.keys[np.minimum(rows, len(self.keys) - 1)], ids)):
            raise AtlasmixError("a requested cell is not in the in-memory split")
        return HeldRows(self, rows)

    def read_rows(self, ids_sorted: np.ndarray) -> sp.csr_matrix:
        """Rows of keys ``ids_sorted`` as a new CSR (float32, int32 indices, shape (n, n_vars)).

        Raises
        ------
        AtlasmixError
            A key is not held.
        """
        return self.held_rows(ids_sorted).tocsr()


class HeldRows:
    """Some rows of an :class:`InMemoryX`, addressed in place: an IO batch of a split held in memory.

    A dense CPU minibatch gathers its rows straight from the held CSR (``indptr[rows[i]]`` ...), so
    the IO batch is never copied: on 2 CPU cores (1M cells x 2,000 genes, IO batch 16,384) the
    copy cost ~0.6 us per cell, as much as the densify it feeds (``benchmarks/bench_loader.py``).

    Attributes
    ----------
    indptr, indices, data : numpy.ndarray
        The held CSR's arrays (int64, int32, float32), shared, never written.
    rows : numpy.ndarray of int64, shape (n,)
        Row ``i`` of this IO batch is held row ``rows[i]``.
    shape : tuple of int
        ``(n, n_vars)``.
    """

    def __init__(self, held: InMemoryX, rows: np.ndarray):
        self.indptr, self.indices, self.data = held.indptr, held.indices, held.data
        self.rows = np.asarray(rows, dtype=np.int64)
        self.shape = (len(self.rows), held.n_vars)

    def tocsr(self) -> sp.csr_matrix:
        """The rows as a new CSR (float32, int32 indices, shape ``self.shape``)."""
        rows = self.rows
        total = int((self.indptr[rows + 1] - self.indptr[rows]).sum())
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        indices = np.empty(total, dtype=np.int32)
        data = np.empty(total, dtype=np.float32)
        _gather_kernel(self.indptr, self.indices, self.data, rows, indptr, indices, data)
        return sp.csr_matrix((data, indices, indptr), shape=self.shape)


def load_split(read: Callable[[np.ndarray], sp.csr_matrix], keys: np.ndarray, n_vars: int, chunk: int,
               threads: int = 2, max_bytes: int | None = None) -> InMemoryX | None:
    """Read rows ``keys`` (ascending) in store order, ``chunk`` rows per read, into an :class:`InMemoryX`.

    Parameters
    ----------
    read : callable
        ``read(keys_sorted) -> csr`` (float32, shape (len, n_vars)); called from ``threads`` threads.
    keys : numpy.ndarray of int64, shape (n,)
        Ascending row keys.
    n_vars : int
    chunk : int
        Rows per read (the loader's IO batch).
    threads : int
        Reads in flight.
    max_bytes : int, optional
        Give up (return None, the rows read so far are freed) once the rows read pass this many
        bytes (8 per nonzero + 16 per row); None: no cap.

    Returns
    -------
    InMemoryX or None
    """
    keys = np.asarray(keys, dtype=np.int64)
    starts = list(range(0, len(keys), max(1, int(chunk))))
    held = 0
    rows = _Rows(len(keys), None if max_bytes is None else max_bytes // 8)
    with ThreadPoolExecutor(max(1, int(threads))) as pool:
        futs = {}
        nxt = 0
        for k in range(len(starts)):
            while nxt < len(starts) and nxt <= k + threads:  # a few reads ahead, in order
                s = starts[nxt]
                futs[nxt] = pool.submit(read, keys[s:s + chunk])
                nxt += 1
            m = futs.pop(k).result()
            held += 8 * int(m.nnz) + 16 * m.shape[0]
            if max_bytes is not None and held > max_bytes:
                for f in futs.values():
                    f.cancel()
                return None
            rows.append(m)
            del m
    return InMemoryX(keys, rows.arrays(n_vars))


class _Rows:
    """CSR rows appended in order straight into the held arrays, which grow geometrically.

    The pieces are not kept and stacked at the end: that held the split twice (peak RSS ~2x the
    split) and wrote twice as much fresh memory, whose first touch costs ~2 s per GB of system time
    on the project's VM (1M cells x 2,000 genes: ``benchmarks/bench_loader.py``). Capacity is
    the nonzeros so far plus the rows still to come at the mean so far, +10 %, at most 8x the
    nonzeros so far (an early read much denser than the rest must not reserve far more address
    space than the split) and at most ``max_nnz``; pages past what is written are never touched, so
    they cost address space, not memory.
    """

    def __init__(self, n_rows: int, max_nnz: int | None = None):
        self.indptr = np.zeros(n_rows + 1, dtype=np.int64)
        self.indices = np.empty(0, dtype=np.int32)
        self.data = np.empty(0, dtype=np.float32)
        self.n_rows, self.row, self.nnz, self.max_nnz = n_rows, 0, 0, max_nnz

    def append(self, m: sp.csr_matrix) -> None:
        n, end = m.shape[0], self.nnz + int(m.nnz)
        if end > len(self.data):
            done = self.row + n
            cap = min(int(end + (self.n_rows - done) * end / max(done, 1) * 1.1) + 1, 8 * end)
            if self.max_nnz is not None:
                cap = max(end, min(cap, self.max_nnz))
            self.indices, self.data = grown(self.indices, self.nnz, cap), grown(self.data, self.nnz, cap)
        self.indices[self.nnz:end] = m.indices
        self.data[self.nnz:end] = m.data
        self.indptr[self.row + 1:self.row + n + 1] = m.indptr[1:] + self.nnz
        self.row, self.nnz = self.row + n, end

    def arrays(self, n_vars: int) -> SimpleNamespace:
        """The rows' CSR arrays as they are (int64 ``indptr``, int32 ``indices``, float32 ``data``).

        Not a scipy matrix: past 2**31 nonzeros scipy makes the indices int64 (a copy, and
        :class:`InMemoryX` would copy them back), ~20 instead of 8 bytes per nonzero at the peak."""
        return SimpleNamespace(indptr=self.indptr, indices=self.indices[:self.nnz], data=self.data[:self.nnz],
                               shape=(self.n_rows, n_vars))


def hold_split(read: Callable[[np.ndarray], sp.csr_matrix], keys: np.ndarray, n_vars: int, chunk: int,
               threads: int = 2, max_bytes: int | None = None, seed: int = 0) -> InMemoryX | None:
    """:func:`load_split`, first checking an estimate of the split's size against ``max_bytes``.

    With a cap, a seeded sample of up to 512 rows (``default_rng(seed)``) is read first and the
    split's bytes on the gene axis (8 per nonzero + 16 per row) extrapolated from it; over the cap,
    nothing more is read. Otherwise the whole split is read, giving up once it passes the cap.

    Returns
    -------
    InMemoryX or None
        None: over the cap (the loader streams).
    """
    keys = np.asarray(keys, dtype=np.int64)
    if max_bytes is not None:
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(len(keys), min(len(keys), 512), replace=False))
        m = read(keys[sample])
        est = (8.0 * m.nnz / max(len(sample), 1) + 16.0) * len(keys)
        if est > max_bytes:
            return None
    return load_split(read, keys, n_vars, chunk, threads, max_bytes)
