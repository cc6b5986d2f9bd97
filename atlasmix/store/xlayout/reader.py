"""Read cells of a store from its x layout as CSR: the loader's and ``Store.iter_X``'s fast path.

zarr-python's own reader decodes correctly but spends most of its time in per-chunk Python/async
overhead (27-34 M nonzeros/s on random runs here, ~15-19k cells/s). :class:`LayoutReader` reads the
same files by the zarr v3 sharding specification (``sharding_indexed``: an index of (offset, nbytes)
uint64 pairs at the end of each shard file) with ``os.pread`` and numcodecs' blosc, which releases
the GIL, straight into the output arrays (~4-6x faster). It only does so for the codec chain written
here; any other chain (a layout rewritten by another tool) is read through zarr.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp

from atlasmix._buffers import BufferPool
from atlasmix._ids import unique_ids
from atlasmix.errors import StoreError
from atlasmix.store.xlayout.roots import dataset_ready, layout_root

_NO_CHUNK = np.iinfo(np.uint64).max  # a shard index's offset for an empty inner chunk (the zarr v3 spec)


def _checked_index(raw: bytes, chunk_bytes: int, where: str) -> np.ndarray:
    """A shard file's index from its last bytes (``raw``: the index then its little-endian crc32c, as
    the zarr v3 sharding codec writes it with index codecs bytes + crc32c), checked: complete, its
    checksum right, every chunk inside the file's first ``chunk_bytes`` bytes.

    Raises
    ------
    StoreError
        Any of those fails.
    """
    import google_crc32c

    if chunk_bytes < 0 or len(raw) < 4 or (len(raw) - 4) % 16:
        raise StoreError(f"x layout: {where} is truncated")
    body = raw[:-4]
    if google_crc32c.value(body) != int.from_bytes(raw[-4:], "little"):
        raise StoreError(f"x layout: {where}: the shard index fails its checksum")
    ix = np.frombuffer(body, dtype="<u8").reshape(-1, 2)
    off, nb = ix[:, 0], ix[:, 1]
    used = off != _NO_CHUNK
    if np.any(off[used] > chunk_bytes) or np.any(nb[used] > chunk_bytes - off[used]):
        raise StoreError(f"x layout: {where}: a chunk lies past the end of the file (truncated?)")
    return ix


class _ShardedArray:
    """One 1-D zarr v3 array of the layout, read by the sharding specification (see module doc)."""

    def __init__(self, root, rel: str, want: np.dtype):
        raw = root.read_bytes(f"{rel}/zarr.json")
        if raw is None:
            raise StoreError(f"x layout: {rel} is missing")
        meta = json.loads(raw)
        self.root, self.rel = root, rel
        self.dtype = np.dtype(meta["data_type"])
        self.size = int(meta["shape"][0])
        self.fill = meta.get("fill_value", 0)
        self._zarr = None
        self._index: dict[int, np.ndarray | None] = {}
        self._lock = threading.Lock()
        self.fast = False
        codecs = meta.get("codecs", [])
        grid = meta.get("chunk_grid", {}).get("configuration", {}).get("chunk_shape", [0])
        # the fast path reads keys c/<k> into arrays of the reader's dtype: anything else (v2 keys, a
        # dtype written by another tool) is read through zarr, which casts
        keys = meta.get("chunk_key_encoding", {})
        default_keys = (keys.get("name", "default") == "default"
                        and keys.get("configuration", {}).get("separator", "/") == "/")
        if len(codecs) == 1 and codecs[0].get("name") == "sharding_indexed" and default_keys and self.dtype == want:
            cfg = codecs[0]["configuration"]
            inner = cfg.get("codecs", [])
            names = [c.get("name") for c in inner]
            delta = names[:1] == ["numcodecs.delta"]
            rest = names[1:] if delta else names
            idx_ok = [c.get("name") for c in cfg.get("index_codecs", [])] == ["bytes", "crc32c"]
            little = all(c.get("configuration", {}).get("endian", "little") == "little" for c in inner
                         if c.get("name") == "bytes")
            if rest == ["bytes", "blosc"] and idx_ok and little and cfg.get("index_location", "end") == "end":
                self.shard = int(grid[0])
                self.inner = int(cfg["chunk_shape"][0])
                self.per_shard = self.shard // self.inner
                self.delta = delta
                self.fast = self.shard % self.inner == 0

    def _path(self, k: int) -> str:
        return str(self.root.base / self.rel / "c" / str(k))

    def _shard_index(self, k: int) -> np.ndarray | None:
        """Shard ``k``'s index, (offset, nbytes) uint64 per inner chunk (cached); None: no shard file
        (every chunk of it empty: zarr writes no file).

        Raises
        ------
        StoreError
            The file is shorter than its index, the index fails its crc32c, or a chunk lies past the
            chunks' bytes: a damaged shard is an error, never read as other values.
        """
        if k in self._index:
            return self._index[k]
        with self._lock:
            if k not in self._index:
                nb = self.per_shard * 16 + 4  # the index and its crc32c (index_codecs bytes, crc32c)
                if self.root.local:
                    try:
                        fd = os.open(self._path(k), os.O_RDONLY)
                    except FileNotFoundError:
                        self._index[k] = None
                        return None
                    try:
                        size = os.fstat(fd).st_size
                        raw = os.pread(fd, nb, size - nb) if size >= nb else b""
                    finally:
                        os.close(fd)
                else:
                    size = self.root.size(f"{self.rel}/c/{k}")
                    if size is None:
                        self._index[k] = None
                        return None
                    raw = self.root.read_range(f"{self.rel}/c/{k}", size - nb, nb) if size >= nb else b""
                self._index[k] = _checked_index(raw, size - nb, f"{self.rel}/c/{k}")
        return self._index[k]

    def _decode_chunk(self, c: int, out: np.ndarray, fds: dict[int, int]) -> None:
        """Decode inner chunk ``c`` into ``out`` (length ``inner``); ``fds``: shard files opened by
        this read (closed by it)."""
        from numcodecs import blosc

        k, j = divmod(c, self.per_shard)
        ix = self._shard_index(k)
        if ix is None:
            out[:] = self.fill
            return
        off, nb = ix[j]
        if off == _NO_CHUNK:  # an empty inner chunk: all fill value
            out[:] = self.fill
            return
        if self.root.local:
            fd = fds.get(k)
            if fd is None:
                fd = fds[k] = os.open(self._path(k), os.O_RDONLY)
            raw = os.pread(fd, int(nb), int(off))
        else:
            raw = self.root.read_range(f"{self.rel}/c/{k}", int(off), int(nb))
        try:
            blosc.decompress(raw, out)
        except (ValueError, RuntimeError) as e:  # a damaged chunk (numcodecs' errors)
            raise StoreError(f"x layout: {self.rel}/c/{k}: inner chunk {j} cannot be decoded ({e})") from None
        if self.delta:
            np.cumsum(out, out=out)

    def read_into(self, a: int, b: int, out: np.ndarray, cache: dict) -> None:
        """Elements ``[a, b)`` into ``out`` (length ``b - a``); ``cache`` keeps edge chunks of one read.

        Shard files are opened for this call only (one descriptor per shard it touches, closed on
        return), so a reader of a store of any size holds no file open between reads."""
        if b <= a:
            return
        if not self.fast:
            if self._zarr is None:
                import zarr

                self._zarr = zarr.open_array(self.root.zarr_store(self.rel), mode="r")
            out[:] = self._zarr[a:b]
            return
        inner = self.inner
        fds: dict[int, int] = {}
        try:
            for c in range(a // inner, (b - 1) // inner + 1):
                lo = c * inner
                x0, x1 = max(a, lo), min(b, lo + inner)
                if x0 == lo and x1 == lo + inner:  # the whole chunk: straight into place
                    self._decode_chunk(c, out[x0 - a:x1 - a], fds)
                    continue
                buf = cache.get((id(self), c))
                if buf is None:
                    buf = np.empty(inner, dtype=self.dtype)
                    self._decode_chunk(c, buf, fds)
                    cache[(id(self), c)] = buf
                    if len(cache) > 8:
                        cache.pop(next(iter(cache)))
                out[x0 - a:x1 - a] = buf[x0 - lo:x1 - lo]
        finally:
            for fd in fds.values():
                os.close(fd)

    def read(self, a: int, b: int) -> np.ndarray:
        out = np.empty(max(0, b - a), dtype=self.dtype)
        self.read_into(a, b, out, {})
        return out

    def close(self) -> None:
        self._index.clear()


class _Dataset:
    def __init__(self, root, rel: str, start: int, n_cells: int):
        self.root, self.rel, self.start, self.n_cells = root, rel, int(start), int(n_cells)
        self.indices = _ShardedArray(root, f"{rel}/indices", np.dtype(np.int32))
        self.data = _ShardedArray(root, f"{rel}/data", np.dtype(np.float32))
        self._indptr: np.ndarray | None = None
        self._lock = threading.Lock()

    def indptr(self) -> np.ndarray:
        if self._indptr is None:
            with self._lock:
                if self._indptr is None:
                    import zarr

                    self._indptr = np.asarray(zarr.open_array(self.root.zarr_store(f"{self.rel}/indptr"), mode="r")[:],
                                              dtype=np.int64)
        return self._indptr

    def close(self) -> None:
        self.indices.close()
        self.data.close()


class LayoutReader:
    """Read cells of a store from its x layout as CSR (the loader's and ``Store.iter_X``'s fast path).

    Parameters
    ----------
    store_uri : str
    datasets : sequence of (dataset_joinid, obs_joinid_start, n_cells)
        The complete datasets whose cells may be read; each must have a complete layout group
        (:func:`dataset_ready`).

    Notes
    -----
    Memory: the ``indptr`` of each dataset read from (8 bytes per cell of that dataset, loaded on its
    first read) and each shard file's index (16 bytes per inner chunk of
    :data:`~atlasmix.store.xlayout.writer.INNER_CHUNK` nonzeros), plus the result. No file stays
    open between reads (each read opens the shard files it touches and closes them), so a store of
    any number of shards fits the open-file limit. Safe to use from several threads at once.

    Raises
    ------
    StoreError
        A dataset has no complete layout.
    """

    def __init__(self, store_uri: str, datasets: Sequence[tuple[int, int, int]]):
        ds = sorted((int(s), int(n), int(j)) for j, s, n in datasets)
        self._starts = np.array([s for s, _, _ in ds], dtype=np.int64)
        self._ends = np.array([s + n for s, n, _ in ds], dtype=np.int64)
        self._ds: list[_Dataset] = []
        root = layout_root(store_uri)
        # each read's indices and data, reused once its CSR is dropped (atlasmix._buffers: fresh
        # arrays of this size cost page faults on every read); 12 = the loader's reads in flight
        # (prefetch_io + io_threads + the batch being cut) x 2 arrays, with room
        self._buffers = BufferPool(capacity=12, headroom=1.1)
        for s, n, j in ds:
            if not dataset_ready(store_uri, j):
                raise StoreError(f"dataset joinid {j} has no complete x layout (run `atlasmix store optimize`)")
            self._ds.append(_Dataset(root, f"d{j}", s, n))

    def read(self, ids_sorted: np.ndarray, col_of: np.ndarray | None, n_vars: int) -> sp.csr_matrix:
        """Cells ``ids_sorted`` (ascending soma_joinids) x the gene axis, float32 CSR, int32 indices.

        Parameters
        ----------
        ids_sorted : numpy.ndarray of int64, shape (n,)
        col_of : numpy.ndarray of int32 or None
            var joinid -> column of the gene axis (-1: drop); None: column = var joinid.
        n_vars : int
            Columns of the result.

        Raises
        ------
        StoreError
            A cell outside the reader's datasets.
        """
        ids = np.asarray(ids_sorted, dtype=np.int64)
        n = len(ids)
        if n == 0:
            return sp.csr_matrix((0, n_vars), dtype=np.float32)
        k = np.searchsorted(self._starts, ids, side="right") - 1
        if np.any(k < 0) or np.any(ids >= self._ends[np.maximum(k, 0)]):
            raise StoreError("x layout: a cell outside the layout's datasets")
        local = ids - self._starts[k]
        # runs of consecutive cells of one dataset: one byte range of indices and data each
        brk = np.flatnonzero((np.diff(ids) != 1) | (np.diff(k) != 0)) + 1
        r_start = np.concatenate([[0], brk])
        r_end = np.concatenate([brk, [n]])
        counts = np.empty(n, dtype=np.int64)
        for ds_i in np.unique(k):
            ip = self._ds[ds_i].indptr()
            sel = k == ds_i
            counts[sel] = ip[local[sel] + 1] - ip[local[sel]]
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        indices, _ = self._buffers.take((int(indptr[-1]),), np.int32)
        data, _ = self._buffers.take((int(indptr[-1]),), np.float32)
        cache: dict = {}
        for r0, r1 in zip(r_start.tolist(), r_end.tolist()):
            d = self._ds[k[r0]]
            ip = d.indptr()
            a, b = int(ip[local[r0]]), int(ip[local[r1 - 1] + 1])
            o = int(indptr[r0])
            d.indices.read_into(a, b, indices[o:o + b - a], cache)
            d.data.read_into(a, b, data[o:o + b - a], cache)
        if col_of is not None:
            indptr, indices, data = project_columns(indptr, indices, data, col_of)
            if 2 * len(data) < len(data.base if data.base is not None else data):
                # a small gene axis keeps a fraction of the row nonzeros: hand back a compact copy, so
                # a caller holding the result (Store.iter_X, the in-memory split) does not pin the
                # whole-row buffers, and they serve the next read
                indices, data = indices.copy(), data.copy()
        return sp.csr_matrix((data, indices, indptr), shape=(n, n_vars))

    def dataset_sizes(self, k: int = 0) -> tuple[int, int]:
        """Elements of the reader's ``k``-th dataset's ``indices`` and ``data`` arrays (their zarr
        shapes; both equal ``indptr[-1]`` in a sound layout)."""
        return self._ds[k].indices.size, self._ds[k].data.size

    def dataset_indptr(self, k: int = 0) -> np.ndarray:
        """Row starts (int64, ``n_cells + 1``) of the reader's ``k``-th dataset (in ``obs_joinid`` order)."""
        return self._ds[k].indptr()

    def close(self) -> None:
        for d in self._ds:
            d.close()
        self._buffers.clear()


def project_columns(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, col_of: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Map columns through ``col_of`` (var joinid -> gene-axis column, -1: drop), in place, one pass.

    Returns the new ``(indptr, indices, data)`` (views of the inputs' leading parts). Column order
    within a row follows ``indices`` (not re-sorted: the loader's densify does not need it).
    """
    from atlasmix.store._project import project_inplace

    col_of = np.ascontiguousarray(col_of, dtype=np.int32)
    new_ptr = np.empty_like(indptr)
    m = project_inplace(indptr, indices, data, col_of, new_ptr)
    return new_ptr, indices[:m], data[:m]


def _complete(store) -> list[tuple[int, int, int]]:
    cat = store.catalog()
    return [(int(j), int(r.obs_joinid_start), int(r.n_cells)) for j, r in cat.iterrows()]


def reader_for(store, joinids: np.ndarray | None = None) -> LayoutReader | None:
    """A :class:`LayoutReader` over the complete datasets holding ``joinids`` (default all), or None when
    one of them has no complete layout (an object store, or a store made before the layout existed:
    ``atlasmix store optimize`` adds it)."""
    ds = datasets_for(store, joinids)
    return None if ds is None else LayoutReader(store.uri, ds)


def datasets_for(store, joinids: np.ndarray | None = None) -> list[tuple[int, int, int]] | None:
    """``(dataset_joinid, obs_joinid_start, n_cells)`` of the complete datasets holding ``joinids``
    (default: all), or None when one of them has no complete x layout."""
    if layout_root(store.uri) is None:
        return None
    ds = _complete(store)
    if joinids is not None and len(ds):
        ids = unique_ids(joinids)
        starts = np.array([s for _, s, _ in ds])
        order = np.argsort(starts)
        pos = np.searchsorted(starts[order], ids, side="right") - 1
        used = set(order[unique_ids(pos[pos >= 0])].tolist())
        ds = [d for i, d in enumerate(ds) if i in used]
    if not all(dataset_ready(store.uri, j) for j, _, _ in ds):
        return None
    return ds


