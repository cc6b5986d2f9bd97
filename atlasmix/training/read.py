"""Reading the IO batches of a :class:`atlasmix.training.loader.MixtureLoader`: cells x the gene axis as CSR.

An IO batch is ``io_batch_size`` cells of one shard's epoch order (:mod:`atlasmix.training.order`),
read in one go in ascending joinid order and shuffled in memory afterwards. Where X is read from is
an :class:`XSource`: the store's x layout (:class:`LayoutSource`: one byte range per run of
consecutive cells, decoded in the read threads with the GIL released, projected onto the gene axis
in the same pass), the store's TileDB X (:class:`TileDBSource`: point coordinates on the cell axis
only, genes selected afterwards) or an x cache
(:class:`atlasmix.training.xcache.readers.XCacheSource`). Sources that already hold rows on the gene
axis (an h5 x cache, a split held in memory) are :class:`RowReader` s. :func:`read_csr` reads one
IO batch from any of them.

Read threads and read processes
-------------------------------
By default the loader reads with ``io_threads`` threads of the training process, each with its own
open X handle (the layout reader is shared: it is thread-safe). Each epoch opens X once per read
thread before its first read and closes it after its last; the opens and closes of all loaders run
one at a time (one lock, ``_OPEN_LOCK``), never while this loader reads: concurrent opens and reads have
crashed tiledbsoma.

The read of an IO batch (TileDB decode, var joinid -> column mapping, CSR assembly) competes for the
GIL with the training loop when it runs in threads of the training process. With
``read_processes=N`` it runs in N processes started with ``spawn`` (forking after TileDB is
opened hangs), kept for the loader's lifetime (:class:`ReadProcesses`). A worker writes the CSR's
three arrays into ``multiprocessing.shared_memory`` blocks and returns their names; the training
process maps them without a copy (:func:`_attach`), uses them (pins and copies them to the GPU, or
gathers minibatches on the CPU) and unlinks them (:func:`release`). Order, shuffle and resume are
unchanged: every order is still drawn in the training process. Memory: each worker holds one read's
TileDB buffers; at most ``prefetch_io + 1`` IO batches are in shared memory at a time.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import secrets
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import scipy.sparse as sp
import tiledbsoma as soma

from atlasmix.errors import AtlasmixError
from atlasmix.store.xlayout import LayoutReader

_OPEN_LOCK = threading.Lock()  # X opens and closes of all loaders, one at a time


# ---------------------------------------------------------------------------------------------- sources
class RowReader(ABC):
    """An open X source whose rows are already on the loader's gene axis, read by row key.

    Implemented by the h5 x cache (:class:`atlasmix.training.xcache.readers.H5CSR`) and a split held
    in memory (:class:`atlasmix.training.memory.InMemoryX`); :func:`read_csr` reads them with
    :meth:`read_rows`.
    """

    @abstractmethod
    def read_rows(self, ids_sorted: np.ndarray) -> sp.csr_matrix:
        """Rows of keys ``ids_sorted`` (ascending) as CSR: float32 data, int32 indices, shape (n, n_vars)."""

    @abstractmethod
    def close(self) -> None:
        """Release the source's files (nothing to do for memory)."""


class XSource(ABC):
    """Where a loader reads X from; picklable, so that read processes open it themselves.

    Attributes
    ----------
    thread_safe : bool
        One open handle may be shared by all read threads (otherwise each thread opens its own).
    """

    thread_safe: ClassVar[bool] = False

    @abstractmethod
    def open(self, context: Any = None) -> Any:
        """An open handle for :func:`read_csr` (``context``: the TileDB-SOMA context, where used)."""


@dataclass(frozen=True)
class LayoutSource(XSource):
    """The store's x layout (:mod:`atlasmix.store.xlayout`) over ``datasets``
    (``(dataset_joinid, obs_joinid_start, n_cells)`` each, :func:`atlasmix.store.xlayout.datasets_for`)."""

    store_uri: str
    datasets: tuple
    thread_safe: ClassVar[bool] = True

    def open(self, context: Any = None) -> LayoutReader:
        return LayoutReader(self.store_uri, self.datasets)


@dataclass(frozen=True)
class TileDBSource(XSource):
    """A TileDB-SOMA ``SparseNDArray`` of counts (the store's ``ms/RNA/X/raw``) at ``uri``."""

    uri: str

    def open(self, context: Any = None):
        return soma.open(str(self.uri), "r", context=context)


# ---------------------------------------------------------------------------------------------- one read
def gene_columns(var_joinids: np.ndarray, n_var_store: int) -> np.ndarray:
    """var joinid -> column of the gene axis ``var_joinids`` (-1: not on it), the ``col_of`` of :func:`read_csr`.

    Returns
    -------
    numpy.ndarray of int32, shape (max(n_var_store, max(var_joinids) + 1),)
    """
    col_of = np.full(max(int(n_var_store), int(np.max(var_joinids, initial=-1)) + 1), -1, dtype=np.int32)
    col_of[var_joinids] = np.arange(len(var_joinids), dtype=np.int32)
    return col_of


def column_map(var_joinids: np.ndarray, n_var_store: int) -> np.ndarray | None:
    """var joinid -> column of the gene axis ``var_joinids`` (-1: not on it), covering every var joinid
    of the store (``n_var_store`` of them): the ``col_of`` of :func:`read_csr` (:func:`gene_columns`);
    None when the gene axis is the whole store var in joinid order (no mapping needed)."""
    n = n_var_store
    if len(var_joinids) == n and np.array_equal(var_joinids, np.arange(n)):
        return None
    return gene_columns(var_joinids, n)


def read_csr(X, ids_sorted: np.ndarray, col_of: np.ndarray | None, n_vars: int) -> sp.csr_matrix:
    """One TileDB read of cells ``ids_sorted`` x the gene axis, as CSR (rows in ``ids_sorted`` order).

    Parameters
    ----------
    X : atlasmix.store.xlayout.LayoutReader, RowReader or tiledbsoma.SparseNDArray
        An :class:`XSource` open for reading (:meth:`XSource.open`): the store's x layout, a source
        of rows already on the gene axis (an h5 x cache, a split in memory), or TileDB X (the store's
        ``ms/RNA/X/raw`` or a tiledb x cache).
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
    if isinstance(X, RowReader):  # an h5 x cache or a split in memory: rows already on the gene axis
        return X.read_rows(ids_sorted)
    if len(ids_sorted) > 1 and np.any(ids_sorted[1:] == ids_sorted[:-1]):
        # a repeated cell (uneven="pad" can repeat a shard's cells within one IO batch): TileDB returns
        # its nonzeros once, so read each cell once and repeat the rows
        u, inv = np.unique(ids_sorted, return_inverse=True)
        return read_csr(X, u, col_of, n_vars)[inv]
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


def _worker_init(source: XSource, tiledb_config: dict, col_of: np.ndarray | None, n_vars: int) -> None:
    """Read-process initializer: open X (``source``) once (spawned process; see the module doc).

    An error opening it is not raised here (an initializer's exception only breaks the pool:
    ``BrokenProcessPool``, the cause logged to stderr, never reaching the caller): each read tries
    again and raises it, so the caller gets the error, and a later read succeeds once it is fixed."""
    _W.update(source=source, tiledb_config=tiledb_config, col_of=col_of, n_vars=n_vars, X=None)
    try:
        _open_worker_x()
    except Exception:  # noqa: BLE001  (raised again by the first read, in the caller)
        pass


def _open_worker_x():
    if _W["X"] is None:
        _W["X"] = _W["source"].open(soma.SOMATileDBContext(tiledb_config=_W["tiledb_config"]))
    return _W["X"]


def shm_prefix(training_pid: int) -> str:
    """Name prefix of the shared-memory blocks the read processes of training process
    ``training_pid`` create (on Linux, files ``/dev/shm/<prefix>...``)."""
    return f"atlasmix_{training_pid}_"


def _worker_read(ids_sorted: np.ndarray) -> tuple:
    """Read one IO batch in a read process; returns shared-memory block names, dtypes and lengths.

    Blocks are named ``atlasmix_<training pid>_<read pid>_<random>`` (see :func:`shm_prefix`), so
    what a killed run leaves in ``/dev/shm`` says whose it was."""
    m = read_csr(_open_worker_x(), ids_sorted, _W["col_of"], _W["n_vars"])
    out, made = [], []
    try:
        for a in (m.indptr, m.indices, m.data):
            shm = shared_memory.SharedMemory(name=f"{shm_prefix(os.getppid())}{os.getpid()}_{secrets.token_hex(8)}",
                                             create=True, size=max(1, a.nbytes))
            made.append(shm)
            try:  # reserve the pages now: on a full tmpfs, writing into a merely truncated block is a SIGBUS
                os.posix_fallocate(shm._fd, 0, max(1, a.nbytes))
            except OSError as e:
                need = sum(x.nbytes for x in (m.indptr, m.indices, m.data))
                raise AtlasmixError(f"no room in /dev/shm for a read process's IO batch ({need / 1e6:,.0f} MB: "
                                    f"{e.strerror}); enlarge /dev/shm (e.g. docker --shm-size), lower "
                                    "io_batch_size, or read in threads (read_processes=0)") from None
            np.ndarray(a.shape, a.dtype, buffer=shm.buf)[:] = a
            out.append((shm.name, a.dtype.str, len(a)))
    except BaseException:
        for shm in made:  # nothing of a failed read is left in /dev/shm
            shm.close()
            shm.unlink()
        raise
    for shm in made:
        shm.close()
        resource_tracker.unregister(shm._name, "shared_memory")  # the training process unlinks it
    return tuple(out), m.shape


def _attach(result: tuple) -> tuple[sp.csr_matrix, list]:
    """Map a read process's CSR (no copy); the blocks must be released with :func:`release`."""
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


def release(shms: list) -> None:
    """Unmap and unlink a read process's shared-memory blocks (:func:`_attach`).

    Call it only after the last read of the attached CSR: numpy arrays made on ``shm.buf`` hold no
    buffer export, so ``close`` unmaps the block under them and a later read would crash (the
    loader releases after the minibatches are copied out, or after the copy to the device)."""
    for shm in shms:
        try:
            shm.close()
        except BufferError:  # a memoryview of the block is still exported: unlinking still frees the name
            pass
        try:
            shm.unlink()
        except FileNotFoundError:
            pass


def release_held(held: list) -> None:
    """Release the shared-memory blocks in ``held`` (a read process's; at most once): the loader's
    release callback for the minibatches cut from one IO batch."""
    if held:
        release(held.pop())


def _free_result(fut) -> None:
    """Done-callback of an abandoned read: unlink its shared-memory blocks."""
    if not fut.cancelled() and fut.exception() is None:
        release(_attach(fut.result())[1])


class ProcessRead:
    """A read process's pending IO batch, resolved to ``(pos, csr, perm, shared blocks)`` like a
    read thread's ``(pos, csr, perm, None)``; the blocks must be released with :func:`release`."""

    def __init__(self, fut, pos: np.ndarray, perm: np.ndarray):
        self.fut, self.pos, self.perm = fut, pos, perm

    def result(self) -> tuple:
        m, shms = _attach(self.fut.result())
        return self.pos, m, self.perm, shms

    def cancel(self) -> None:
        """Not started: dropped; running or done: its blocks are freed when it ends."""
        if not self.fut.cancel():
            self.fut.add_done_callback(_free_result)


class ReadProcesses:
    """``n`` spawned processes that each open ``source`` once and read IO batches into shared memory.

    Parameters
    ----------
    n : int
        Processes (>= 1).
    source : XSource
    tiledb_config : dict
        The TileDB-SOMA context's settings for the processes' own context.
    col_of : numpy.ndarray of int32 or None
        var joinid -> column of the gene axis (:func:`gene_columns`); None: column = var joinid.
    n_vars : int
    """

    def __init__(self, n: int, source: XSource, tiledb_config: dict, col_of: np.ndarray | None, n_vars: int):
        self._pool = ProcessPoolExecutor(n, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                                         initargs=(source, dict(tiledb_config), col_of, n_vars))

    def submit(self, ids_sorted: np.ndarray, pos: np.ndarray, perm: np.ndarray) -> ProcessRead:
        """Read rows ``ids_sorted`` (ascending) in a process; ``pos`` and ``perm`` ride along."""
        return ProcessRead(self._pool.submit(_worker_read, ids_sorted), pos, perm)

    def shutdown(self) -> None:
        """Stop the processes (reads not started are dropped)."""
        self._pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------- read threads
def open_handles(source: XSource, context: Any, n: int) -> list:
    """``n`` open X handles for ``n`` read threads (one shared by all when ``source.thread_safe``),
    opened under the lock that serialises all X opens and closes (see the module doc)."""
    with _OPEN_LOCK:
        if source.thread_safe:
            return [source.open(context)] * n
        return [source.open(context) for _ in range(n)]


def close_handles(handles: list) -> None:
    """Close read threads' X handles (under the lock that serialises all X opens and closes)."""
    with _OPEN_LOCK:
        for h in handles:
            h.close()


class ReadThreads:
    """Read threads sharing open X handles, as a context manager.

    Each read takes a free handle, calls ``fn(handle, *args)`` and gives the handle back. On exit
    the reads still running are waited for, then the handles are closed, so no open or close ever
    overlaps a read of these handles (concurrent opens and reads in threads have crashed
    tiledbsoma: TileDB-SOMA PRs #2800, #2801).

    Parameters
    ----------
    handles : list
        Open handles (:func:`open_handles`), at least one per thread that reads at a time; closed on
        exit.
    threads : int
        Threads of :meth:`submit` (0: only :meth:`call`, from the caller's threads).
    """

    def __init__(self, handles: list, threads: int = 0):
        self.handles = handles
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for h in handles:
            self._free.put(h)
        self._pool = ThreadPoolExecutor(threads) if threads else None

    def call(self, fn: Callable, *args: Any) -> Any:
        """``fn(handle, *args)`` with a free handle, in the calling thread."""
        X = self._free.get()  # never waits while no more threads read than there are handles
        try:
            return fn(X, *args)
        finally:
            self._free.put(X)

    def submit(self, fn: Callable, *args: Any) -> Future:
        """:meth:`call` in one of the read threads."""
        return self._pool.submit(self.call, fn, *args)

    def __enter__(self) -> ReadThreads:
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
        finally:
            close_handles(self.handles)


def read_ahead(submit: Callable[[int], Any], n: int, depth: int) -> Iterator[Any]:
    """The results of reads ``0..n-1`` in order, with up to ``depth`` reads started ahead of the one
    awaited; when the consumer stops early (``close()``), reads not started yet are dropped.

    Parameters
    ----------
    submit : callable
        ``submit(i)`` starts read ``i`` and returns its future (``result()``, ``cancel()``).
    n, depth : int
    """
    futs: list = []
    try:
        nxt = 0
        for k in range(n):
            while nxt < n and nxt <= k + depth:
                futs.append(submit(nxt))
                nxt += 1
            # no local name keeps read k (nor its future) alive here: the consumer drops it before
            # asking for read k + 1, and the reads submitted above can then reuse its buffers
            # (atlasmix._buffers). A `result` local held it one read longer: 12 % fewer
            # whole-transcriptome cells/s and +0.2 GiB peak RSS (bench_loader, 1M cells, 2 cores)
            yield _take_result(futs, k)
    finally:
        for f in futs:  # (None: consumed); running reads end on their own
            if f is not None:
                f.cancel()


def _take_result(futs: list, k: int) -> Any:
    """``futs[k].result()``, the future dropped from ``futs``."""
    f, futs[k] = futs[k], None
    return f.result()
