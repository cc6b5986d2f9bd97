"""Reading one IO batch of a :class:`atlasmix.training.loader.MixtureLoader`: cells x the gene axis as CSR.

From the store's x layout (:class:`atlasmix.store.xlayout.LayoutReader`), TileDB X or an x cache
(:func:`open_source`, :func:`read_csr`), in read threads or in spawned read processes that hand the
CSR back through shared memory (:func:`_worker_init`, :func:`_worker_read`, :func:`_attach`).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from atlasmix.store.xlayout import LayoutReader

_OPEN_LOCK = threading.Lock()  # X opens and closes of all loaders, one at a time


# ---------------------------------------------------------------------------------------------- loader
def gene_columns(var_joinids: np.ndarray, n_var_store: int) -> np.ndarray:
    """var joinid -> column of the gene axis ``var_joinids`` (-1: not on it), the ``col_of`` of :func:`read_csr`.

    Returns
    -------
    numpy.ndarray of int32, shape (max(n_var_store, max(var_joinids) + 1),)
    """
    col_of = np.full(max(int(n_var_store), int(np.max(var_joinids, initial=-1)) + 1), -1, dtype=np.int32)
    col_of[var_joinids] = np.arange(len(var_joinids), dtype=np.int32)
    return col_of


def read_csr(X, ids_sorted: np.ndarray, col_of: np.ndarray | None, n_vars: int) -> sp.csr_matrix:
    """One TileDB read of cells ``ids_sorted`` x the gene axis, as CSR (rows in ``ids_sorted`` order).

    Parameters
    ----------
    X : atlasmix.store.xlayout.LayoutReader, tiledbsoma.SparseNDArray or atlasmix.training.xcache.H5CSR
        The store's x layout, ``ms/RNA/X/raw`` or an x cache, open for reading (:func:`open_source`).
    ids_sorted : numpy.ndarray of int64, shape (n,)
        Cell soma_joinids, ascending.
    col_of : numpy.ndarray of int32 (or int64) or None
        var joinid -> column of the gene axis (-1: drop the gene); None: column = var joinid.
    n_vars : int
        Columns of the result.

    Returns
    -------
    scipy.sparse.csr_matrix, float32, shape (n, n_vars), int32 indices

    Notes
    -----
    The arrow result pieces are converted one at a time to int32 columns and float32 values, so
    the transient memory is ~ one piece plus the CSR being built (8 bytes per nonzero). X's space
    tiles span the whole gene axis, so a gene subset saves no IO, while point ranges on soma_dim_1
    make TileDB's read far slower: rows only are selected in TileDB, genes afterwards. The
    per-nonzero work after TileDB (gene mapping, filtering, row counts) is a few passes over 4-byte
    arrays; a single piece is not copied again. Measured on a 16,384-cell read of ~28M nonzeros
    (2 CPU cores): 0.62 s -> 0.39 s for mapping and filtering, against ~1.2-1.5 s in TileDB.
    """
    ids_sorted = np.asarray(ids_sorted, dtype=np.int64)
    if isinstance(X, LayoutReader):  # the store's x layout: rows projected onto the gene axis in one pass
        return X.read(ids_sorted, col_of, n_vars)
    if hasattr(X, "read_rows"):  # an h5 x cache (atlasmix.training.xcache.H5CSR): rows already on the gene axis
        return X.read_rows(ids_sorted)
    n = len(ids_sorted)
    if col_of is not None and col_of.dtype != np.int32:
        col_of = col_of.astype(np.int32)
    pieces = []
    for t in X.read(coords=(pa.array(ids_sorted),)).tables():
        d0 = t["soma_dim_0"].to_numpy()
        c = t["soma_dim_1"].to_numpy()
        v = t["soma_data"].to_numpy()
        if col_of is not None:  # gene subset / reorder: map var joinid -> column, drop other genes
            c = col_of[c]
            keep = c >= 0
            if not keep.all():
                d0, c, v = d0[keep], c[keep], v[keep]
        else:
            c = c.astype(np.int32)
        pieces.append((d0, c, v.astype(np.float32, copy=False)))
    d0s = [p[0] for p in pieces if len(p[0])]
    ordered = all(bool(np.all(a[1:] >= a[:-1])) for a in d0s) and all(
        a[-1] <= b[0] for a, b in zip(d0s[:-1], d0s[1:]))

    def cat(parts, dtype):
        return parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.zeros(0, dtype)

    c, v = cat([p[1] for p in pieces], np.int32), cat([p[2] for p in pieces], np.float32)
    if not v.flags.writeable:  # arrow's zero-copy buffer: callers may hand it to torch or write to it
        v = v.copy()
    if ordered:  # TileDB returns row-major order: row starts from n binary searches per piece
        counts = np.zeros(n, dtype=np.int64)
        for a in d0s:
            counts += np.searchsorted(a, ids_sorted, "right") - np.searchsorted(a, ids_sorted, "left")
    else:  # fallback: sort nonzeros by row
        d0 = np.concatenate(d0s)
        o = np.argsort(d0, kind="stable")
        c, v = c[o], v[o]
        counts = np.bincount(np.searchsorted(ids_sorted, d0), minlength=n)
    del pieces, d0s
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return sp.csr_matrix((v, c, indptr), shape=(n, n_vars))


# ---------------------------------------------------------------------------------------------- read processes
_W: dict[str, Any] = {}


def open_source(x_uri, context=None):
    """Open an X source for :func:`read_csr`: ``("layout", store_uri, datasets)`` opens the store's x
    layout (:class:`atlasmix.store.xlayout.LayoutReader`); a path or URI an x cache or TileDB X
    (:func:`atlasmix.training.xcache.open_x`)."""
    if isinstance(x_uri, tuple) and x_uri[0] == "layout":
        return LayoutReader(x_uri[1], x_uri[2])
    from atlasmix.training.xcache import open_x

    return open_x(x_uri, context)


def _worker_init(x_uri, tiledb_config: dict, col_of: np.ndarray | None, n_vars: int) -> None:
    """Read-process initializer: open X (the x layout, the store's TileDB X or an x cache) once
    (spawned process; see "Read processes")."""
    import tiledbsoma as soma

    ctx = soma.SOMATileDBContext(tiledb_config=tiledb_config)
    _W.update(X=open_source(x_uri, ctx), col_of=col_of, n_vars=n_vars)


def shm_prefix(training_pid: int) -> str:
    """Name prefix of the shared-memory blocks the read processes of training process
    ``training_pid`` create (on Linux, files ``/dev/shm/<prefix>...``)."""
    return f"atlasmix_{training_pid}_"


def _worker_read(ids_sorted: np.ndarray) -> tuple:
    """Read one IO batch in a read process; returns shared-memory block names, dtypes and lengths.

    Blocks are named ``atlasmix_<training pid>_<read pid>_<random>`` (see :func:`shm_prefix`), so
    what a killed run leaves in ``/dev/shm`` says whose it was."""
    import secrets
    from multiprocessing import resource_tracker, shared_memory

    m = read_csr(_W["X"], ids_sorted, _W["col_of"], _W["n_vars"])
    out = []
    for a in (m.indptr, m.indices, m.data):
        shm = shared_memory.SharedMemory(name=f"{shm_prefix(os.getppid())}{os.getpid()}_{secrets.token_hex(8)}",
                                         create=True, size=max(1, a.nbytes))
        np.ndarray(a.shape, a.dtype, buffer=shm.buf)[:] = a
        out.append((shm.name, a.dtype.str, len(a)))
        shm.close()
        resource_tracker.unregister(shm._name, "shared_memory")  # the training process unlinks it
    return tuple(out), m.shape


def _attach(result: tuple) -> tuple[sp.csr_matrix, list]:
    """Map a read process's CSR (no copy); the blocks must be released with :func:`_release`."""
    from multiprocessing import shared_memory

    blocks, shape = result
    shms, arrays = [], []
    for name, dtype, n in blocks:
        shm = shared_memory.SharedMemory(name=name)
        shms.append(shm)
        arrays.append(np.ndarray((n,), np.dtype(dtype), buffer=shm.buf))
    indptr, indices, data = arrays
    m = sp.csr_matrix(shape, dtype=np.float32)
    m.indptr, m.indices, m.data = indptr, indices, data  # views into shared memory, no checks/copies
    return m, shms


def _release(shms: list) -> None:
    for shm in shms:
        try:
            shm.close()
        except BufferError:  # a view is still alive somewhere: unlinking still frees the name
            pass
        try:
            shm.unlink()
        except FileNotFoundError:
            pass


def _free_result(fut) -> None:
    """Done-callback of an abandoned read: unlink its shared-memory blocks."""
    if not fut.cancelled() and fut.exception() is None:
        _release(_attach(fut.result())[1])


def _close_handles(handles: list) -> None:
    """Close read threads' X handles (under the lock that serialises all X opens and closes)."""
    with _OPEN_LOCK:
        for h in handles:
            h.close()


def _cancel_pending(futs: list) -> None:
    """Drop reads not started yet (``None``: consumed); running reads end on their own."""
    for f in futs:
        if f is not None:
            f.cancel()


