"""x caches: local, gene-axis projections of X for training, so that a model reads only the nonzeros it uses.

X's space tiles span the whole gene axis (see :mod:`atlasmix.store.schema`), so a read of a cell
decodes all of its nonzeros, and TileDB's read costs ~40 ns of CPU per nonzero whatever the codec
(``benchmarks/bench_loader.py``). A model trained on a gene subset -- scvi-tools' usual 2,000-4,000
HVGs -- uses few of them: the top 2,000 seurat HVGs hold 6 % (pisces PBMC, 58,828 genes) to 17 %
(Kang PBMC, 9,015 genes) of the nonzeros of ``../shared/data``'s whole-transcriptome files. Every
epoch would decode the rest again for nothing.

:func:`~atlasmix.training.xcache.build.ensure_x_cache` writes, once, the loader's cells (rows in
soma_joinid order) x its gene axis (columns in axis order) under a local folder, in one of the two
formats below. Building costs about one epoch's read; every later epoch (and every later run on the
same mixture and genes) reads ``n_vars`` columns only. The loader's shuffle is unchanged: the
projection keeps store order, and the per-epoch permutation is drawn as before (no offline
pre-shuffle). The projection is a cache, not a second store: it can be deleted at any time.

Two formats. ``tiledb`` (default): a SOMA ``SparseNDArray`` with the store's X tiling, compressed
(~1.7 bytes per nonzero), read through TileDB (~40 ns of CPU per nonzero). ``h5``: the CSR arrays
``data`` (float32), ``indices`` (int32) and ``indptr`` (int64) uncompressed in an HDF5 file, the
layout of AnnData's on-disk CSR, read as one contiguous slice per run of consecutive rows: 8 bytes
per nonzero on disk, but a block of cells is a plain copy from the page cache or disk, so it also
speeds up whole-transcriptome axes. The loader, measured with ``benchmarks/bench_loader.py`` before
the h5 reads went through ``os.preadv`` (:mod:`~atlasmix.training.xcache.readers`) on 2 CPU cores
(dense minibatches of 1,024 on the CPU): 1M cells x 2,000 genes, 124k cells/s (h5) vs 58k (tiledb
cache), 11k (store) and 1.3k (tiledbsoma-ml); 400k cells x 19,907 genes, 28k (h5) vs 8k (store),
6.7k (tiledbsoma-ml) and 51k (scvi-tools on an in-memory AnnData, 13.9 GiB). With it: 119k and
~33k cells/s through the h5 cache (the bench's docstring).

Modules
-------
* :mod:`~atlasmix.training.xcache.folder`: the cache folder -- its size cap, the shared locks
  (leases) on projections in use, least-recently-used deletion, and what ``atlasmix x-cache list``
  and ``x-cache clean`` show and delete.
* :mod:`~atlasmix.training.xcache.readers`: reading a projection --
  :class:`~atlasmix.training.xcache.readers.H5CSR` (the ``h5`` format's rows, read with
  ``os.preadv``), :func:`~atlasmix.training.xcache.readers.open_x` and
  :class:`~atlasmix.training.xcache.readers.XCacheSource` (a loader's X source).
* :mod:`~atlasmix.training.xcache.build`: building one --
  :func:`~atlasmix.training.xcache.build.ensure_x_cache` (streamed from the store into a temporary
  folder, renamed into place when complete) and its folder name,
  :func:`~atlasmix.training.xcache.build.x_cache_key`.

The public names of the three modules are exported here (``from atlasmix.training.xcache import
ensure_x_cache``).
"""

from atlasmix.training.xcache.build import FORMATS, ensure_x_cache, x_cache_key
from atlasmix.training.xcache.folder import (META, X_CACHE_MAX_BYTES, cap_bytes, clean_x_cache, list_x_cache,
                                             release_leases)
from atlasmix.training.xcache.readers import H5CSR, XCacheSource, open_x

__all__ = ["FORMATS", "H5CSR", "META", "X_CACHE_MAX_BYTES", "XCacheSource", "cap_bytes", "clean_x_cache",
           "ensure_x_cache", "list_x_cache", "open_x", "release_leases", "x_cache_key"]
