"""Building an x cache projection: :func:`ensure_x_cache` and its folder name, :func:`x_cache_key`.

:func:`ensure_x_cache` streams: one read of ``chunk_cells`` cells at a time (from the store's x
layout, else its TileDB X), so memory is bounded by the chunk, not by the corpus. The folder name
is a hash of the store's ``state_hash``, the cells and the gene axis, so a changed store, manifest
or gene list gets its own projection and a stale one is never read.

A projection is built into a temporary folder (``<name>.tmp-<pid>-<ns>``) and renamed into place
when complete, so a crash leaves at most that temporary folder, which is never read, and two
processes building the same projection concurrently both end up reading a complete copy. The size
cap is checked after every chunk, and the folder is cleaned afterwards
(:mod:`atlasmix.training.xcache.folder`).
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
from atlasmix.store import xlayout
from atlasmix.training.read import gene_columns, read_csr
from atlasmix.training.xcache.folder import (META, _adopt_lease, _lease, _shared_lock, _size, cap_bytes,
                                             clean_x_cache)

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
        Cache format (:mod:`atlasmix.training.xcache`): compressed TileDB, or uncompressed CSR in
        HDF5 (faster to read, ~4.7x the disk space).
    chunk_cells : int
        Cells per read while building (memory: ~ chunk_cells x nonzeros per cell x 20 bytes).
    progress : bool
        Print one line per chunk while building.
    max_bytes : int, optional
        Size cap of ``cache_dir`` in bytes (default :func:`~atlasmix.training.xcache.folder.cap_bytes`):
        a build that passes it on its own is stopped and refused; afterwards the least recently used
        other projections not in use are deleted until the folder fits
        (:mod:`~atlasmix.training.xcache.folder`). This process then holds a shared lock on the
        projection until it exits (:func:`~atlasmix.training.xcache.folder.release_leases` drops it).

    Returns
    -------
    (str, dict)
        URI of the projection (``tiledb``: a ``SparseNDArray``, float32, shape (n_obs, n_vars),
        int64 coords; ``h5``: the ``X.h5`` file; open either with
        :func:`~atlasmix.training.xcache.readers.open_x`) and its metadata: ``format``,
        ``state_hash``, ``n_obs``, ``n_vars``, ``nnz``, ``build_s``, ``bytes``, ``built`` (True when
        this call built it).

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
        size = _size(tmp)
        if size > cap:  # the estimate above counts the nonzeros; the file holds whole HDF5 chunks
            raise AtlasmixError(f"x cache: the projection of {len(cells):,} cells x {len(var_joinids):,} genes "
                                f"takes {size / 1e9:.3g} GB, over the cap of {cap / 1e9:.3g} GB; raise it "
                                "(--x-cache-max-gb, ATLASMIX_X_CACHE_MAX_GB) or train from the store without "
                                "an x cache")
        meta = {"format": fmt, "state_hash": state, "n_obs": int(len(cells)), "n_vars": int(len(var_joinids)),
                "nnz": nnz, "build_s": round(time.perf_counter() - t0, 3), "bytes": int(size), "store_uri": store.uri}
        (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
        lock = _shared_lock(tmp / META)  # held through the rename: no clean-up deletes it before our lease
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished the same projection first: use it
            os.close(lock)
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
    _adopt_lease(final, lock)
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
