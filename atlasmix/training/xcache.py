"""A local, gene-axis projection of X for training: read only the nonzeros the model uses.

X's space tiles span the whole gene axis (see :mod:`atlasmix.store.schema`), so a read of a cell
decodes all of its nonzeros, and TileDB's read costs ~40 ns of CPU per nonzero whatever the codec
(``benchmarks/bench_loader.py``). A model trained on a gene subset -- scvi-tools' usual 2,000-4,000
HVGs -- uses few of them: the top 2,000 seurat HVGs hold 6 % (pisces PBMC, 58,828 genes) to 17 %
(Kang PBMC, 9,015 genes) of the nonzeros of ``../shared/data``'s whole-transcriptome files. Every
epoch would decode the rest again for nothing.

:func:`ensure_x_cache` writes, once, the loader's cells (rows in soma_joinid order) x its gene axis
(columns in axis order) under a local folder, in one of the two formats below. It streams: one read of ``chunk_cells`` cells at a time, so memory is bounded by the chunk,
not by the corpus. The folder name is a hash of the store's ``state_hash``, the cells and the gene
axis, so a changed store, manifest or gene list gets its own projection and a stale one is never
read. Building costs about one epoch's read; every later epoch (and every later run on the same
mixture and genes) reads ``n_vars`` columns only. The loader's shuffle is unchanged: the projection
keeps store order, and the per-epoch permutation is drawn as before (no offline pre-shuffle).

Two formats. ``tiledb`` (default): a SOMA ``SparseNDArray`` with the store's X tiling, compressed
(~1.7 bytes per nonzero), read through TileDB (~40 ns of CPU per nonzero). ``h5``: the CSR arrays
``data`` (float32), ``indices`` (int32) and ``indptr`` (int64) uncompressed in an HDF5 file, the
layout of AnnData's on-disk CSR, read as one contiguous slice per run of consecutive rows: 8 bytes
per nonzero on disk, but a block of cells is a plain copy from the page cache or disk, so it also
speeds up whole-transcriptome axes. The slices are read with ``os.preadv`` at the chunk offsets
HDF5 reports (:class:`H5CSR`), not through h5py's per-call machinery and process-wide lock: read
only, 16,384-cell batches of 64-cell blocks, 2 cores, 1M cells x 2,000 genes 1.58M cells/s vs
133k through ``h5py.Dataset.read_direct``; 400k cells x 19,907 genes 191k (1 thread) / 317k
(2 threads) vs 76k (either). The loader, measured with ``benchmarks/bench_loader.py`` before
that change on 2 CPU cores (dense minibatches of 1,024 on the CPU): 1M cells x 2,000 genes, 124k
cells/s (h5) vs 58k (tiledb cache), 11k (store) and 1.3k (tiledbsoma-ml); 400k cells x 19,907
genes, 28k (h5) vs 8k (store), 6.7k (tiledbsoma-ml) and 51k (scvi-tools on an in-memory AnnData,
13.9 GiB). With it: 119k and ~33k cells/s through the h5 cache (the bench's docstring).

The projection is a cache, not a second store: it can be deleted at any time. It is built into a
temporary folder (``<name>.tmp-<pid>-<ns>``) and renamed into place when complete, so a crash
leaves at most that temporary folder, which is never read, and two processes building the same
projection concurrently both end up reading a complete copy.

Size cap and clean-up. A cache folder holds at most ``max_bytes`` of projections
(:data:`X_CACHE_MAX_BYTES`, ``ATLASMIX_X_CACHE_MAX_GB``, ``train ldvae --x-cache-max-gb``): a build
that would pass the cap on its own stops and is refused, and after every build or use the least
recently used other projections are deleted until the folder fits. A process that uses a projection
holds a shared ``flock`` on its metadata file until it exits, and deletion takes the exclusive lock
without waiting, so a projection another run is reading is never deleted (the folder can then stay
over the cap until that run ends). :func:`clean_x_cache` (``atlasmix x-cache clean``) also deletes
projections of an older state of a store (never read again: the name hashes the state) and the
temporary folders of builds whose process is gone; :func:`list_x_cache` (``atlasmix x-cache list``)
shows what a folder holds.
"""

from __future__ import annotations

import contextlib

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from atlasmix.errors import AtlasmixError
from atlasmix.store import schema as S
from atlasmix.store import xlayout
from atlasmix.training.read import RowReader, XSource, gene_columns, read_csr

#: file with what a projection holds (written last, before the rename).
META = "atlasmix_x_cache.json"


#: cache formats: compressed TileDB-SOMA array, or uncompressed CSR in HDF5.
FORMATS = ("tiledb", "h5")

#: default size cap of one cache folder, bytes (``ATLASMIX_X_CACHE_MAX_GB`` overrides it): 64 GiB,
#: e.g. 2 h5 projections of 1M whole-transcriptome cells (13.7 GB each) and many of 2,000 genes.
X_CACHE_MAX_BYTES = 64 << 30

#: shared locks this process holds on projections it uses: path of the metadata file -> fd.
_LEASES: dict[str, int] = {}


def cap_bytes(max_bytes: int | None = None) -> int:
    """The size cap of a cache folder in bytes: ``max_bytes``, else ``ATLASMIX_X_CACHE_MAX_GB`` (GB of
    10^9 bytes), else :data:`X_CACHE_MAX_BYTES`.

    Raises
    ------
    AtlasmixError
        A negative cap, or an environment value that is not a number.
    """
    if max_bytes is None:
        env = os.environ.get("ATLASMIX_X_CACHE_MAX_GB")
        if env is None:
            return X_CACHE_MAX_BYTES
        try:
            max_bytes = int(float(env) * 1e9)
        except ValueError:
            raise AtlasmixError(f"ATLASMIX_X_CACHE_MAX_GB must be a number of GB, got {env!r}") from None
    if max_bytes < 0:
        raise AtlasmixError(f"x cache size cap must be >= 0 bytes, got {max_bytes}")
    return int(max_bytes)


def _lease(final: Path) -> bool:
    """Hold a shared lock on projection ``final`` for the rest of this process; False when it was
    deleted while we waited for the lock (then it must be built again)."""
    import fcntl

    key = str(final / META)
    if key in _LEASES:
        os.utime(key)
        return True
    try:
        fd = os.open(key, os.O_RDONLY)
    except FileNotFoundError:
        return False
    fcntl.flock(fd, fcntl.LOCK_SH)  # waits only while a clean-up holds it to delete the projection
    if not os.path.exists(key):
        os.close(fd)
        return False
    _LEASES[key] = fd
    os.utime(key)  # last use, for least-recently-used eviction
    return True


def release_leases() -> None:
    """Drop every shared lock this process holds on projections (they become deletable)."""
    for fd in _LEASES.values():
        os.close(fd)
    _LEASES.clear()


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def _lock_unused(final: Path) -> int | None:
    """The exclusive lock on projection ``final``'s metadata file, taken without waiting: its fd, or
    None when a process (this one included) holds the projection. Raises FileNotFoundError when the
    metadata file is gone."""
    import fcntl

    key = final / META
    if str(key) in _LEASES:
        return None
    fd = os.open(key, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _delete_unless_in_use(final: Path) -> bool:
    """Delete projection ``final`` if no process holds it (exclusive lock, not waiting)."""
    try:
        fd = _lock_unused(final)
    except FileNotFoundError:
        shutil.rmtree(final, ignore_errors=True)
        return True
    if fd is None:
        return False
    try:  # the metadata file goes first: a reader that got its lock after us finds it gone and rebuilds
        doomed = final.with_name(f"{final.name}.del-{os.getpid()}-{time.time_ns()}")
        os.rename(final, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    finally:
        os.close(fd)
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_x_cache(cache_dir: str | Path) -> list[dict]:
    """What a cache folder holds, most recently used first.

    Returns
    -------
    list of dict
        One per entry: ``name``, ``kind`` (``projection``, ``unfinished`` for the temporary folder of
        a build, ``unknown`` for a folder without readable metadata), ``bytes``, ``last_used``
        (seconds since the epoch: the metadata file's mtime), ``in_use`` (another process holds it),
        and for projections ``format``, ``store_uri``, ``state_hash``, ``n_obs``, ``n_vars``, ``nnz``.
    """
    root = Path(cache_dir)
    out = []
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        if not p.is_dir() or not p.name.startswith("x-"):
            continue
        row = {"name": p.name, "bytes": _size(p), "last_used": p.stat().st_mtime, "in_use": False}
        if ".tmp-" in p.name or ".del-" in p.name:  # <name>.tmp-<pid>-<ns>: in use while <pid> lives
            pid = p.name.split("-")[-2]
            row.update(kind="unfinished", in_use=pid.isdigit() and _pid_alive(int(pid)))
        elif (p / META).exists():
            try:
                meta = json.loads((p / META).read_text())
            except (OSError, ValueError):
                meta = None
            if meta is None:
                row["kind"] = "unknown"
            else:
                row.update(kind="projection", last_used=(p / META).stat().st_mtime,
                           **{k: meta.get(k) for k in ("format", "store_uri", "state_hash", "n_obs", "n_vars", "nnz")})
                fd = _lock_unused(p)
                row["in_use"] = fd is None
                if fd is not None:
                    os.close(fd)
        else:
            row["kind"] = "unknown"
        out.append(row)
    return sorted(out, key=lambda r: -r["last_used"])


def clean_x_cache(cache_dir: str | Path, *, max_bytes: int | None = None, stale_for=None,
                  everything: bool = False, keep: Path | None = None) -> dict:
    """Delete from a cache folder what will not be read again, then the least recently used
    projections until the folder fits ``max_bytes``.

    Parameters
    ----------
    cache_dir : str or pathlib.Path
    max_bytes : int, optional
        Cap in bytes (None: no cap applied by this call; see :func:`cap_bytes` for the default one
        :func:`ensure_x_cache` applies).
    stale_for : atlasmix.store.Store, optional
        Delete this store's projections of an older state (``state_hash`` differs from the
        store's: they can never be read again).
    everything : bool
        Delete every projection not in use.
    keep : pathlib.Path, optional
        A projection never deleted by this call (the one just built or found).

    Returns
    -------
    dict
        ``removed`` (names), ``freed_bytes``, ``kept_in_use`` (names a running process holds) and
        ``bytes`` (what the folder holds afterwards).

    Notes
    -----
    Temporary folders of builds whose process is gone (``<name>.tmp-<pid>-<ns>``) are always deleted;
    those of live processes never. Projections in use by any process are never deleted.
    """
    rows = list_x_cache(cache_dir)
    root = Path(cache_dir)
    removed, freed, held = [], 0, []
    state = stale_for.identity()["state_hash"] if stale_for is not None else None

    def drop(r):
        nonlocal freed
        p = root / r["name"]
        if keep is not None and p == Path(keep):
            return False
        if r["kind"] == "unfinished":  # only those of dead processes reach here
            shutil.rmtree(p, ignore_errors=True)
            ok = True
        else:
            ok = _delete_unless_in_use(p)
        if ok:
            removed.append(r["name"])
            freed += r["bytes"]
        elif r["kind"] == "projection":
            held.append(r["name"])
        return ok

    left = []
    for r in rows:
        if r["kind"] == "unfinished" and not r["in_use"]:
            drop(r)
        elif r["kind"] == "projection" and (everything or (state is not None and r["store_uri"] == stale_for.uri
                                                           and r["state_hash"] != state)):
            if not drop(r):
                left.append(r)
        else:
            left.append(r)
    if max_bytes is not None:
        total = sum(r["bytes"] for r in left)
        for r in sorted((r for r in left if r["kind"] == "projection"), key=lambda r: r["last_used"]):
            if total <= max_bytes:
                break
            if drop(r):
                total -= r["bytes"]
    return {"removed": removed, "freed_bytes": int(freed), "kept_in_use": sorted(set(held)),
            "bytes": int(sum(r["bytes"] for r in rows) - freed)}


def x_cache_key(state_hash: str, cells: np.ndarray, var_joinids: np.ndarray, fmt: str = "tiledb") -> str:
    """Folder name of a projection: sha256 of the store state, the cell joinids and the gene axis.

    Parameters
    ----------
    state_hash : str
        :meth:`atlasmix.store.Store.identity` ``state_hash``.
    cells : numpy.ndarray of int64, shape (n_obs,)
        Cell soma_joinids, ascending (the rows).
    var_joinids : numpy.ndarray of int64, shape (n_vars,)
        Gene axis as var soma_joinids, in column order.
    fmt : str
        ``tiledb`` or ``h5`` (part of the name: the two never collide).

    Returns
    -------
    str
        ``x-`` followed by 24 hex digits (``-h5`` appended for the HDF5 format).
    """
    h = hashlib.sha256()
    h.update(state_hash.encode())
    h.update(np.ascontiguousarray(cells, dtype=np.int64).tobytes())
    h.update(b"|")
    h.update(np.ascontiguousarray(var_joinids, dtype=np.int64).tobytes())
    return "x-" + h.hexdigest()[:24] + ("" if fmt == "tiledb" else f"-{fmt}")


class H5CSR(RowReader):
    """Rows of an ``h5`` x cache as CSR (see module doc).

    Parameters
    ----------
    path : str or pathlib.Path
        The cache's ``X.h5`` (datasets ``data`` float32, ``indices`` int32, ``indptr`` int64).

    Notes
    -----
    ``indptr`` (8 bytes per cell) is read into memory once; a read copies one contiguous slice of
    ``data`` and ``indices`` per run of consecutive rows straight into the result arrays.

    h5py serialises all its calls behind one process-wide lock, so threads reading through it take
    turns. When both datasets are stored unfiltered (no compression, shuffle or checksum) in the
    machine's byte order -- what :func:`ensure_x_cache` writes -- the file offset of every chunk
    is taken once from HDF5's own chunk index (``h5py`` ``DatasetID.chunk_iter``, HDF5 >= 1.14;
    ``get_offset`` for a contiguous layout) and the slices are read with ``os.preadv`` straight
    into the result arrays, without the lock (the GIL is released during the read), so read
    threads run in parallel. Any other layout is read through ``h5py.Dataset.read_direct``.
    ``direct`` says which path is used.
    """

    def __init__(self, path: str | Path):
        import h5py

        self.file = h5py.File(path, "r")
        self.data, self.indices = self.file["data"], self.file["indices"]
        self.indptr = self.file["indptr"][:]
        self.shape = (len(self.indptr) - 1, int(self.file.attrs["n_vars"]))
        self._layout = {"data": _raw_layout(self.data), "indices": _raw_layout(self.indices)}
        self.direct = hasattr(os, "preadv") and all(v is not None for v in self._layout.values())
        self._fd = os.open(path, os.O_RDONLY) if self.direct else None

    def _read_slice(self, name: str, out: np.ndarray, lo: int, hi: int, o: int) -> None:
        """Elements ``lo:hi`` of dataset ``name`` into ``out[o:o + hi - lo]``."""
        if not self.direct:
            getattr(self, name).read_direct(out, np.s_[lo:hi], np.s_[o:o + hi - lo])
            return
        chunk, offsets = self._layout[name]
        isz = out.itemsize
        for k in range(lo // chunk, (hi - 1) // chunk + 1):
            a, b = max(lo, k * chunk), min(hi, (k + 1) * chunk)
            _pread_into(self._fd, out[o + a - lo:o + b - lo], int(offsets[k]) + (a - k * chunk) * isz)

    def read_rows(self, rows: np.ndarray):
        """CSR of ``rows`` (ascending row numbers), float32 data, int32 indices, shape (len(rows), n_vars)."""
        import scipy.sparse as sp

        rows = np.asarray(rows, dtype=np.int64)
        counts = self.indptr[rows + 1] - self.indptr[rows]
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        data = np.empty(int(indptr[-1]), dtype=np.float32)
        indices = np.empty(int(indptr[-1]), dtype=np.int32)
        if len(rows):
            brk = np.flatnonzero(np.diff(rows) != 1) + 1  # runs of consecutive rows: one slice each
            starts, ends = np.r_[0, brk], np.r_[brk, len(rows)]
            for a, b in zip(starts.tolist(), ends.tolist()):
                lo, hi = int(self.indptr[rows[a]]), int(self.indptr[rows[b - 1] + 1])
                if hi > lo:
                    o = int(indptr[a])
                    self._read_slice("data", data, lo, hi, o)
                    self._read_slice("indices", indices, lo, hi, o)
        return sp.csr_matrix((data, indices, indptr), shape=(len(rows), self.shape[1]))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.file.close()


def _raw_layout(ds) -> tuple[int, np.ndarray] | None:
    """(elements per chunk, file byte offset of each chunk) of a 1-D dataset whose bytes on disk are
    the array itself (unfiltered, native byte order, every chunk allocated); None otherwise."""
    import h5py

    dt = ds.dtype
    if ds.ndim != 1 or dt.byteorder not in ("=", "|", "<" if np.little_endian else ">"):
        return None
    plist = ds.id.get_create_plist()
    if plist.get_nfilters():
        return None
    n = int(ds.shape[0])
    layout = plist.get_layout()
    if layout == h5py.h5d.CONTIGUOUS:
        off = ds.id.get_offset()
        return None if off is None else (max(n, 1), np.array([off], dtype=np.int64))
    if layout != h5py.h5d.CHUNKED or not hasattr(ds.id, "chunk_iter"):
        return None
    chunk = int(ds.chunks[0])
    offsets = np.full(-(-n // chunk), -1, dtype=np.int64)

    def visit(info):
        if info.filter_mask == 0 and info.size == chunk * dt.itemsize:
            offsets[info.chunk_offset[0] // chunk] = info.byte_offset

    ds.id.chunk_iter(visit)
    return (chunk, offsets) if bool(np.all(offsets >= 0)) else None


def _pread_into(fd: int, out: np.ndarray, offset: int) -> None:
    """Fill the contiguous array ``out`` with the bytes of ``fd`` at ``offset`` (GIL released)."""
    buf = memoryview(out).cast("B")
    while len(buf):
        n = os.preadv(fd, [buf], offset)
        if n <= 0:
            raise AtlasmixError(f"x cache: short read at byte {offset}")
        buf, offset = buf[n:], offset + n


def open_x(uri: str, context=None):
    """Open an x cache for :func:`atlasmix.training.read.read_csr`: an ``h5`` file (:class:`H5CSR`) or
    a TileDB-SOMA ``SparseNDArray`` (a ``tiledb`` x cache)."""
    if str(uri).endswith(".h5"):
        return H5CSR(uri)
    import tiledbsoma as soma

    return soma.open(str(uri), "r", context=context)


@dataclass(frozen=True)
class XCacheSource(XSource):
    """An x cache projection at ``uri`` (:func:`ensure_x_cache`) as a loader's X source: its rows
    are the loader's cells in order, its columns the gene axis."""

    uri: str

    def open(self, context=None):
        return open_x(self.uri, context)


@contextlib.contextmanager
def _store_x(store, cells: np.ndarray):
    """The store's x layout over ``cells`` (:mod:`atlasmix.store.xlayout`), else its TileDB X, open."""
    ds = xlayout.datasets_for(store, cells)
    if ds is not None:
        reader = xlayout.LayoutReader(store.uri, ds)
        try:
            yield reader
        finally:
            reader.close()
        return
    import tiledbsoma as soma

    with soma.open(f"{store.uri}/ms/{S.MEASUREMENT}/X/{S.X_LAYER}", "r", context=store.context) as X:
        yield X


def ensure_x_cache(store, cells: np.ndarray, var_joinids: np.ndarray, cache_dir: str | Path, *,
                   fmt: str = "tiledb", chunk_cells: int = 16384, progress: bool = False,
                   max_bytes: int | None = None) -> tuple[str, dict]:
    """The projection of ``store``'s X onto ``cells`` x ``var_joinids``, built if it is not there yet.

    Parameters
    ----------
    store : atlasmix.store.Store
    cells : numpy.ndarray of int64, shape (n_obs,)
        Cell soma_joinids, ascending and unique: row ``i`` of the projection is ``cells[i]``.
    var_joinids : numpy.ndarray of int64, shape (n_vars,)
        The gene axis: column ``j`` is var joinid ``var_joinids[j]``.
    cache_dir : str or pathlib.Path
        A local folder (created if needed); object-store URIs are refused.
    fmt : {"tiledb", "h5"}
        Cache format (module doc): compressed TileDB, or uncompressed CSR in HDF5 (faster to read,
        ~4.7x the disk space).
    chunk_cells : int
        Cells per read while building (memory: ~ chunk_cells x nonzeros per cell x 20 bytes).
    progress : bool
        Print one line per chunk while building.
    max_bytes : int, optional
        Size cap of ``cache_dir`` in bytes (default :func:`cap_bytes`): a build that passes it on its
        own is stopped and refused; afterwards the least recently used other projections not in use
        are deleted until the folder fits (module doc). This process then holds a shared lock on the
        projection until it exits (:func:`release_leases` drops it).

    Returns
    -------
    (str, dict)
        URI of the projection (``tiledb``: a ``SparseNDArray``, float32, shape (n_obs, n_vars),
        int64 coords; ``h5``: the ``X.h5`` file; open either with :func:`open_x`) and its
        metadata: ``format``, ``state_hash``, ``n_obs``, ``n_vars``, ``nnz``, ``build_s``,
        ``bytes``, ``built`` (True when this call built it).

    Raises
    ------
    AtlasmixError
        Unknown format, no cells or genes, ``cells`` not ascending and unique, an object-store
        ``cache_dir``, a projection whose metadata disagrees with its name (left as is; delete
        it to rebuild), or a projection larger than the size cap.
    """
    cells = np.asarray(cells, dtype=np.int64)
    var_joinids = np.asarray(var_joinids, dtype=np.int64)
    if fmt not in FORMATS:
        raise AtlasmixError(f"x cache format must be one of {FORMATS}, got {fmt!r}")
    if len(cells) == 0 or len(var_joinids) == 0:
        raise AtlasmixError("x cache: no cells or no genes")
    if np.any(np.diff(cells) <= 0):
        raise AtlasmixError("x cache: cells must be ascending and unique")
    if "://" in str(cache_dir):
        raise AtlasmixError(f"x cache: {cache_dir} is not a local folder")
    cap = cap_bytes(max_bytes)
    state = store.identity()["state_hash"]
    root = Path(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / x_cache_key(state, cells, var_joinids, fmt)
    leaf = "X.h5" if fmt == "h5" else "X"
    if (final / META).exists() and _lease(final):
        meta = json.loads((final / META).read_text())
        expected = {"format": fmt, "state_hash": state, "n_obs": len(cells), "n_vars": len(var_joinids)}
        if {k: meta.get(k, "tiledb" if k == "format" else None) for k in expected} != expected:
            raise AtlasmixError(f"x cache {final} does not hold what its name says; delete it to rebuild")
        clean_x_cache(root, max_bytes=cap, keep=final)
        return str(final / leaf), {**meta, "built": False}

    t0 = time.perf_counter()
    tmp = root / f"{final.name}.tmp-{os.getpid()}-{time.time_ns()}"
    var_index = store.var().index
    col_of = gene_columns(var_joinids, int(var_index.max()) + 1 if len(var_index) else 0)
    nnz = 0
    try:
        tmp.mkdir()
        with _store_x(store, cells) as X, \
                _Writer(tmp / leaf, fmt, len(cells), len(var_joinids), store.context) as out:
            for s in range(0, len(cells), chunk_cells):
                ids = cells[s:s + chunk_cells]
                m = read_csr(X, ids, col_of, len(var_joinids))
                m.sort_indices()  # row-major order: TileDB needs no sort, h5 rows are sorted CSR
                out.append(s, m)
                nnz += int(m.nnz)
                if out.bytes() > cap:
                    raise AtlasmixError(f"x cache: the projection of {len(cells):,} cells x {len(var_joinids):,} "
                                        f"genes passed the cap of {cap / 1e9:.3g} GB after {s + len(ids):,} cells; "
                                        "raise it (--x-cache-max-gb, ATLASMIX_X_CACHE_MAX_GB) or train from "
                                        "the store without an x cache")
                if progress:
                    print(f"x cache: {min(s + chunk_cells, len(cells)):,}/{len(cells):,} cells, {nnz:,} nonzeros",
                          flush=True)
        size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        meta = {"format": fmt, "state_hash": state, "n_obs": int(len(cells)), "n_vars": int(len(var_joinids)),
                "nnz": nnz, "build_s": round(time.perf_counter() - t0, 3), "bytes": int(size), "store_uri": store.uri}
        (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished the same projection first: use it
            if not (final / META).exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            if _lease(final):
                meta = json.loads((final / META).read_text())
                clean_x_cache(root, max_bytes=cap, keep=final)
                return str(final / leaf), {**meta, "built": False}
            return ensure_x_cache(store, cells, var_joinids, cache_dir, fmt=fmt, chunk_cells=chunk_cells,
                                  progress=progress, max_bytes=max_bytes)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _lease(final)
    clean_x_cache(root, max_bytes=cap, keep=final)
    return str(final / leaf), {**meta, "built": True}


class _Writer:
    """Appends CSR chunks (rows in order) to a ``tiledb`` or ``h5`` x cache being built."""

    def __init__(self, path: Path, fmt: str, n_obs: int, n_vars: int, context):
        self.fmt, self.n_obs = fmt, n_obs
        if fmt == "h5":
            import h5py

            self.f = h5py.File(path, "w")
            self.f.attrs["n_vars"] = n_vars
            # 2^16-element chunks (256 KiB): HDF5 reads whole chunks, so a 64-cell block of a 2,000-gene
            # axis (~11k nonzeros) read 71k cells/s with 2^20-element chunks, 191k with 2^16
            chunk = (1 << 16,)
            self.data = self.f.create_dataset("data", shape=(0,), maxshape=(None,), dtype="f4", chunks=chunk)
            self.indices = self.f.create_dataset("indices", shape=(0,), maxshape=(None,), dtype="i4", chunks=chunk)
            self.indptr = [np.zeros(1, dtype=np.int64)]
            self.nnz = 0
        else:
            self.path = path
            import tiledbsoma as soma

            self.arr = soma.SparseNDArray.create(str(path), type=pa.float32(), shape=(n_obs, n_vars),
                                                 platform_config=S.X_CREATE_OPTIONS, context=context)

    def bytes(self) -> int:
        """Bytes written so far (h5: the nonzeros and row pointers; tiledb: the array folder)."""
        if self.fmt == "h5":
            return self.nnz * 8 + (self.n_obs + 1) * 8
        return _size(self.path)

    def append(self, row0: int, m) -> None:
        if self.fmt == "h5":
            n = self.nnz + int(m.nnz)
            for ds, a in ((self.data, m.data), (self.indices, m.indices)):
                ds.resize((n,))
                ds[self.nnz:n] = a
            self.indptr.append(self.nnz + m.indptr[1:].astype(np.int64))
            self.nnz = n
        else:
            import tiledbsoma as soma

            rows = np.repeat(np.arange(row0, row0 + m.shape[0], dtype=np.int64), np.diff(m.indptr))
            t = pa.table({"soma_dim_0": rows, "soma_dim_1": m.indices.astype(np.int64), "soma_data": m.data})
            self.arr.write(t, platform_config=soma.TileDBWriteOptions(sort_coords=False))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.fmt == "h5":
            if exc[0] is None:
                self.f.create_dataset("indptr", data=np.concatenate(self.indptr))
            self.f.close()
        else:
            self.arr.close()
        return False
