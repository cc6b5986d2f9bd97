"""TileDB contexts and store URIs: the settings every atlasmix store handle opens TileDB with.

Local paths and ``file://`` URIs are local stores (locks, x layouts, sizes on disk); any other
``scheme://`` URI (``s3://``) is an object store, configured through :func:`make_context`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import tiledbsoma as soma

from atlasmix.errors import StoreError


def is_local(uri: str) -> bool:
    """True when ``uri`` is a local path (no ``scheme://``) or a ``file://`` URI."""
    return "://" not in uri or uri.startswith("file://")


def local_path(uri: str) -> Path:
    """The local path of a local ``uri`` (``file://`` prefix removed)."""
    return Path(uri[len("file://"):] if uri.startswith("file://") else uri)


#: TileDB settings of every atlasmix context (overridable, see :func:`make_context`).
#: ``sm.query.sparse_global_order.preprocess_tile_merge = 0`` turns off the sparse global order
#: reader's "preprocess tile merge" (TileDB PR #5417), on by default in the TileDB core 2.30 that
#: tiledbsoma 2.3.0 ships. Its parallel merge of the fragments' tiles crashed reads of our
#: multi-fragment arrays (ingest and the x cache write a fragment per chunk) at random: SIGSEGV in
#: a TileDB thread-pool worker in ``tiledb::algorithm::MergeUnit::~MergeUnit``, called from
#: ``ParallelMerge::spawn_next_merge_unit`` (core dump of a crashed test worker, 2026-11-23). With
#: glibc's malloc checks, the loader / LDVAE / evaluation tests lost 4-5 workers per run with it
#: on and none in 3 runs with it off. Cost: loader reads of the store and of the tiledb x cache
#: 7-11% slower (benchmarks/bench_loader.py docstring); obs reads unchanged.
TILEDB_DEFAULTS: dict[str, str] = {"sm.query.sparse_global_order.preprocess_tile_merge": "0"}


def make_context(tiledb_config: dict[str, str] | None = None) -> soma.SOMATileDBContext:
    """A tiledbsoma context for local or object-store URIs.

    Parameters
    ----------
    tiledb_config : dict, optional
        TileDB settings (e.g. ``{"vfs.s3.region": "eu-west-1"}``), merged over the JSON object in the
        environment variable ``ATLASMIX_TILEDB_CONFIG`` (how the CLI is configured for ``s3://``:
        endpoint, region, scheme...). S3 credentials come from the usual AWS environment variables,
        read by TileDB itself. Both override :data:`TILEDB_DEFAULTS`.

    Raises
    ------
    StoreError
        ``ATLASMIX_TILEDB_CONFIG`` is not a JSON object.
    """
    cfg: dict[str, str] = dict(TILEDB_DEFAULTS)
    env = os.environ.get("ATLASMIX_TILEDB_CONFIG")
    if env:
        try:
            cfg.update({str(k): str(v) for k, v in json.loads(env).items()})
        except (ValueError, AttributeError) as e:
            raise StoreError(f"ATLASMIX_TILEDB_CONFIG must be a JSON object: {e}") from e
    cfg.update(tiledb_config or {})
    return soma.SOMATileDBContext(tiledb_config=cfg)


__all__ = ["TILEDB_DEFAULTS", "is_local", "local_path", "make_context"]
