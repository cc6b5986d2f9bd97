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
leaves at most that temporary folder, which is never read (delete it), and two processes building
the same projection concurrently both end up reading a complete copy.
"""

from __future__ import annotations

import contextlib

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from atlasmix.errors import AtlasmixError
from atlasmix.store import schema as S

#: file with what a projection holds (written last, before the rename).
META = "atlasmix_x_cache.json"


#: cache formats: compressed TileDB-SOMA array, or uncompressed CSR in HDF5.
FORMATS = ("tiledb", "h5")


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


class H5CSR:
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
    """Open an X source for :func:`atlasmix.training.loader.read_csr`: an ``h5`` x cache file
    (:class:`H5CSR`) or a TileDB-SOMA ``SparseNDArray`` (the store's X or a ``tiledb`` x cache)."""
    if str(uri).endswith(".h5"):
        return H5CSR(uri)
    import tiledbsoma as soma

    return soma.open(str(uri), "r", context=context)


@contextlib.contextmanager
def _store_x(store, cells: np.ndarray):
    """The store's x layout over ``cells`` (:mod:`atlasmix.store.xlayout`), else its TileDB X, open."""
    from atlasmix.store import xlayout

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
                   fmt: str = "tiledb", chunk_cells: int = 16384, progress: bool = False) -> tuple[str, dict]:
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
        ``cache_dir``, or a projection whose metadata disagrees with its name (left as is; delete
        it to rebuild).
    """

    from atlasmix.training.read import gene_columns, read_csr

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
    state = store.identity()["state_hash"]
    root = Path(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / x_cache_key(state, cells, var_joinids, fmt)
    leaf = "X.h5" if fmt == "h5" else "X"
    if (final / META).exists():
        meta = json.loads((final / META).read_text())
        expected = {"format": fmt, "state_hash": state, "n_obs": len(cells), "n_vars": len(var_joinids)}
        if {k: meta.get(k, "tiledb" if k == "format" else None) for k in expected} != expected:
            raise AtlasmixError(f"x cache {final} does not hold what its name says; delete it to rebuild")
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
            meta = json.loads((final / META).read_text())
            return str(final / leaf), {**meta, "built": False}
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
            import tiledbsoma as soma

            self.arr = soma.SparseNDArray.create(str(path), type=pa.float32(), shape=(n_obs, n_vars),
                                                 platform_config=S.X_CREATE_OPTIONS, context=context)

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
