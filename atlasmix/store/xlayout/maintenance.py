"""Whole-store operations on the x layout: ``atlasmix store optimize`` and ``atlasmix store verify``."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
import tiledbsoma as soma

from atlasmix.errors import StoreError
from atlasmix.store import schema as S
from atlasmix.store.xlayout.reader import LayoutReader
from atlasmix.store.xlayout.roots import dataset_ready, layout_root
from atlasmix.store.xlayout.writer import LayoutWriter


def _tiledb_rows(X: soma.SparseNDArray, s: int, e: int, n_cols: int) -> sp.csr_matrix:
    """Cells ``[s, e)`` of TileDB X as float32 CSR with ``n_cols`` columns, repeated entries summed."""
    t = X.read(coords=(slice(s, e - 1),)).tables().concat()
    m = sp.csr_matrix((t["soma_data"].to_numpy(), (t["soma_dim_0"].to_numpy() - s, t["soma_dim_1"].to_numpy())),
                      shape=(e - s, n_cols), dtype=np.float32)
    m.sum_duplicates()
    return m


def _open_x(store) -> soma.SparseNDArray:
    return soma.SparseNDArray.open(f"{store.uri}/ms/{S.MEASUREMENT}/X/{S.X_LAYER}", context=store.context)


def write_dataset_from_tiledb(store, dataset_joinid: int, start: int, n_cells: int, chunk_size: int = 16384,
                              progress: Callable[[int], None] | None = None) -> dict:
    """(Re)write one dataset's layout from TileDB X (``atlasmix store optimize``).

    Returns
    -------
    dict
        :meth:`LayoutWriter.close`'s ``n_cells``, ``nnz``, ``bytes``.
    """
    n_var = len(store.var())
    w = LayoutWriter(store.uri, dataset_joinid, n_cells, n_var)
    with _open_x(store) as X:
        for s in range(start, start + n_cells, chunk_size):
            e = min(s + chunk_size, start + n_cells)
            m = _tiledb_rows(X, s, e, max(n_var, 1))
            w.append(m.indptr, m.indices, m.data)
            if progress:
                progress(e - s)
    return w.close()


def optimize(store, progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Write the layout of every complete dataset that lacks it (resumable: finished ones are kept).

    Call with the store's write lock held. Returns ``{"written": [...], "kept": [...], "removed":
    [...]}`` (dataset_ids; ``removed``: layout groups of datasets that are no longer complete).

    Raises
    ------
    StoreError
        A URI scheme with no layout (neither local nor ``s3://``).
    """
    root = layout_root(store.uri)
    if root is None:
        raise StoreError(f"no x layout for {store.uri}: local and s3:// stores only")
    cat = store.catalog()
    out: dict = {"written": [], "kept": [], "removed": []}
    live = {f"d{int(j)}" for j in cat.index}
    for name in root.children():
        if name.startswith("d") and name[1:].isdigit() and name not in live:
            root.delete(name)
            out["removed"].append(name)
    for j, r in cat.iterrows():
        if dataset_ready(store.uri, int(j)):
            out["kept"].append(r.dataset_id)
            continue
        done = [0]

        def tick(k, r=r, done=done):
            done[0] += k
            if progress:
                progress(str(r.dataset_id), done[0], int(r.n_cells))

        write_dataset_from_tiledb(store, int(j), int(r.obs_joinid_start), int(r.n_cells), progress=tick)
        out["written"].append(r.dataset_id)
    return out


def verify(store, chunk_size: int = 16384, progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Compare every complete dataset's layout with TileDB X, cell by cell, exactly.

    Returns
    -------
    dict
        ``{"ok": bool, "datasets": [{"dataset_id", "status": "equal" | "missing" | "differs",
        "detail"}]}``. ``missing``: no complete layout group (``store optimize`` writes it).
        ``differs`` also for a group that cannot be read (a truncated or corrupted shard file, a
        shard index failing its crc32c, arrays whose sizes disagree with ``indptr``); the other
        datasets are still checked.
    """
    res: dict = {"ok": True, "datasets": []}
    if layout_root(store.uri) is None:
        return {"ok": True, "datasets": [], "detail": "this URI scheme has no x layout: TileDB X only"}
    n_var = max(len(store.var()), 1)
    with _open_x(store) as X:
        for j, r in store.catalog().iterrows():
            row = {"dataset_id": r.dataset_id, "status": "equal", "detail": ""}
            res["datasets"].append(row)
            if not dataset_ready(store.uri, int(j)):
                row.update(status="missing", detail="no complete x layout")
                res["ok"] = False
                continue
            start, n = int(r.obs_joinid_start), int(r.n_cells)
            reader = None
            try:
                reader = LayoutReader(store.uri, [(int(j), start, n)])
                ip = reader.dataset_indptr(0)
                if len(ip) != n + 1:
                    row.update(status="differs", detail=f"indptr has {len(ip) - 1} rows, catalog {n}")
                    res["ok"] = False
                    continue
                if ip[0] != 0 or np.any(np.diff(ip) < 0) or any(size != ip[-1] for size in reader.dataset_sizes(0)):
                    row.update(status="differs", detail=f"indptr ({int(ip[-1])} nonzeros) and the arrays "
                                                        f"{reader.dataset_sizes(0)} disagree")
                    res["ok"] = False
                    continue
                for s in range(start, start + n, chunk_size):
                    e = min(s + chunk_size, start + n)
                    ref = _tiledb_rows(X, s, e, n_var)
                    got = reader.read(np.arange(s, e, dtype=np.int64), None, n_var)
                    got.sort_indices()
                    if (ref.nnz != got.nnz or not np.array_equal(ref.indptr, got.indptr)
                            or not np.array_equal(ref.indices, got.indices) or not np.array_equal(ref.data, got.data)):
                        bad = np.flatnonzero(np.diff(ref.indptr) != np.diff(got.indptr))
                        first = s + int(bad[0]) if len(bad) else s
                        row.update(status="differs", detail=f"cells from soma_joinid {first} differ from TileDB X")
                        res["ok"] = False
                        break
                    if progress:
                        progress(str(r.dataset_id), e - start, n)
            except (StoreError, OSError, ValueError, RuntimeError, OverflowError) as err:
                # a damaged group (a truncated or corrupted file, a missing array): report it, go on
                row.update(status="differs", detail=f"unreadable x layout: {err}")
                res["ok"] = False
            finally:
                if reader is not None:
                    reader.close()
    return res
