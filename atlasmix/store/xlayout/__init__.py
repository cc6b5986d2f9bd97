"""The store's read-optimised copy of X: per-dataset CSR in zarr v3, written by every ingest.

Why
---
TileDB's ``ms/RNA/X/raw`` is the canonical record (tiledbsoma, tiledbsoma-ml and CELLxGENE tools
read it), but decoding it costs ~40 ns per nonzero whatever the codec, so a loader reading straight
from it stalls at ~15-17k whole-transcriptome cells/s on 2 cores. The layout keeps the same counts a
second time, in the form a minibatch loader wants: each dataset's cells as one CSR matrix in cell
(``soma_joinid``) order, so a run of consecutive cells is one contiguous byte range of two arrays.

Modules, in data-flow order
---------------------------
* :mod:`~atlasmix.store.xlayout.roots`: where the layout lives (a local folder or ``s3://``
  objects) and which dataset groups are complete.
* :mod:`~atlasmix.store.xlayout.writer`: :class:`LayoutWriter`, one dataset's CSR; the on-disk
  format and the codecs (with their measurements).
* :mod:`~atlasmix.store.xlayout.reader`: :class:`LayoutReader`, cells as CSR by the zarr sharding
  specification (the loader's fast path), and the readers over a store's datasets.
* :mod:`~atlasmix.store.xlayout.maintenance`: ``atlasmix store optimize`` and ``store verify``.
"""

from atlasmix.store.xlayout.maintenance import optimize, verify, write_dataset_from_tiledb
from atlasmix.store.xlayout.reader import LayoutReader, datasets_for, project_columns, reader_for
from atlasmix.store.xlayout.roots import COMPLETE_ATTR, LAYOUT_DIR, dataset_ready, delete_dataset, layout_root
from atlasmix.store.xlayout.writer import INNER_CHUNK, SHARD_CHUNKS, LayoutWriter

__all__ = ["COMPLETE_ATTR", "INNER_CHUNK", "LAYOUT_DIR", "SHARD_CHUNKS", "LayoutReader", "LayoutWriter",
           "dataset_ready", "datasets_for", "delete_dataset", "layout_root", "optimize", "project_columns",
           "reader_for", "verify", "write_dataset_from_tiledb"]
