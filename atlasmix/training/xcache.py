"""A local, gene-axis projection of X for training: read only the nonzeros the model uses.

X's space tiles span the whole gene axis (see :mod:`atlasmix.store.schema`), so a read of a cell
decodes all of its nonzeros, and TileDB's read costs ~40 ns of CPU per nonzero whatever the codec
(``benchmarks/bench_loader.py``). A model trained on a gene subset -- scvi-tools' usual 2,000-4,000
HVGs -- uses few of them: the top 2,000 seurat HVGs hold 6 % (pisces PBMC, 58,828 genes) to 17 %
(Kang PBMC, 9,015 genes) of the nonzeros of ``../shared/data``'s whole-transcriptome files. Every
epoch would decode the rest again for nothing.

:func:`ensure_x_cache` writes, once, the loader's cells (rows in soma_joinid order) x its gene axis
(columns in axis order) into a TileDB-SOMA ``SparseNDArray`` under a local folder, with the store's
X tiling. It streams: one read of ``chunk_cells`` cells at a time, so memory is bounded by the chunk,
not by the corpus. The folder name is a hash of the store's ``state_hash``, the cells and the gene
axis, so a changed store, manifest or gene list gets its own projection and a stale one is never
read. Building costs about one epoch's read; every later epoch (and every later run on the same
mixture and genes) reads ``n_vars`` columns only. The loader's shuffle is unchanged: the projection
keeps store order, and the per-epoch permutation is drawn as before (no offline pre-shuffle).

The projection is a cache, not a second store: it can be deleted at any time. It is built into a
temporary folder and renamed into place when complete, so a crash leaves no partial projection
behind, and two processes building the same one concurrently both end up reading a complete copy.
"""

from __future__ import annotations

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


def x_cache_key(state_hash: str, cells: np.ndarray, var_joinids: np.ndarray) -> str:
    """Folder name of a projection: sha256 of the store state, the cell joinids and the gene axis.

    Parameters
    ----------
    state_hash : str
        :meth:`atlasmix.store.Store.identity` ``state_hash``.
    cells : numpy.ndarray of int64, shape (n_obs,)
        Cell soma_joinids, ascending (the rows).
    var_joinids : numpy.ndarray of int64, shape (n_vars,)
        Gene axis as var soma_joinids, in column order.

    Returns
    -------
    str
        ``x-`` followed by 24 hex digits.
    """
    h = hashlib.sha256()
    h.update(state_hash.encode())
    h.update(np.ascontiguousarray(cells, dtype=np.int64).tobytes())
    h.update(b"|")
    h.update(np.ascontiguousarray(var_joinids, dtype=np.int64).tobytes())
    return "x-" + h.hexdigest()[:24]


def ensure_x_cache(store, cells: np.ndarray, var_joinids: np.ndarray, cache_dir: str | Path, *,
                   chunk_cells: int = 16384, progress: bool = False) -> tuple[str, dict]:
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
    chunk_cells : int
        Cells per read while building (memory: ~ chunk_cells x nonzeros per cell x 20 bytes).
    progress : bool
        Print one line per chunk while building.

    Returns
    -------
    (str, dict)
        URI of the projection's ``SparseNDArray`` (float32, shape (n_obs, n_vars), int64 coords)
        and its metadata: ``state_hash``, ``n_obs``, ``n_vars``, ``nnz``, ``build_s``, ``built``
        (True when this call built it).

    Raises
    ------
    AtlasmixError
        No cells or genes, ``cells`` not ascending and unique, an object-store ``cache_dir``, or a projection whose
        metadata disagrees with its name (left as is; delete it to rebuild).
    """
    import tiledbsoma as soma

    from atlasmix.training.loader import read_csr

    cells = np.asarray(cells, dtype=np.int64)
    var_joinids = np.asarray(var_joinids, dtype=np.int64)
    if len(cells) == 0 or len(var_joinids) == 0:
        raise AtlasmixError("x cache: no cells or no genes")
    if np.any(np.diff(cells) <= 0):
        raise AtlasmixError("x cache: cells must be ascending and unique")
    if "://" in str(cache_dir):
        raise AtlasmixError(f"x cache: {cache_dir} is not a local folder")
    state = store.identity()["state_hash"]
    root = Path(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / x_cache_key(state, cells, var_joinids)
    if (final / META).exists():
        meta = json.loads((final / META).read_text())
        if meta.get("state_hash") != state or meta.get("n_obs") != len(cells) or meta.get("n_vars") != len(var_joinids):
            raise AtlasmixError(f"x cache {final} does not hold what its name says; delete it to rebuild")
        return str(final / "X"), {**meta, "built": False}

    t0 = time.perf_counter()
    tmp = root / f"{final.name}.tmp-{os.getpid()}-{time.time_ns()}"
    var_index = store.var().index
    n_store_var = int(var_index.max()) + 1 if len(var_index) else 0
    col_of = np.full(max(n_store_var, int(var_joinids.max()) + 1), -1, dtype=np.int32)
    col_of[var_joinids] = np.arange(len(var_joinids), dtype=np.int32)
    nnz = 0
    try:
        tmp.mkdir()
        with soma.SparseNDArray.create(str(tmp / "X"), type=pa.float32(), shape=(len(cells), len(var_joinids)),
                                       platform_config=S.X_CREATE_OPTIONS, context=store.context) as out, \
                soma.open(f"{store.uri}/ms/{S.MEASUREMENT}/X/{S.X_LAYER}", "r", context=store.context) as X:
            for s in range(0, len(cells), chunk_cells):
                ids = cells[s:s + chunk_cells]
                m = read_csr(X, ids, col_of, len(var_joinids))
                m.sort_indices()  # row-major global order, so TileDB needs no sort
                rows = np.repeat(np.arange(s, s + len(ids), dtype=np.int64), np.diff(m.indptr))
                out.write(pa.table({"soma_dim_0": rows, "soma_dim_1": m.indices.astype(np.int64), "soma_data": m.data}),
                          platform_config=soma.TileDBWriteOptions(sort_coords=False))
                nnz += int(m.nnz)
                if progress:
                    print(f"x cache: {min(s + chunk_cells, len(cells)):,}/{len(cells):,} cells, {nnz:,} nonzeros",
                          flush=True)
        meta = {"state_hash": state, "n_obs": int(len(cells)), "n_vars": int(len(var_joinids)), "nnz": nnz,
                "build_s": round(time.perf_counter() - t0, 3), "store_uri": store.uri}
        (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished the same projection first: use it
            if not (final / META).exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            meta = json.loads((final / META).read_text())
            return str(final / "X"), {**meta, "built": False}
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(final / "X"), {**meta, "built": True}
