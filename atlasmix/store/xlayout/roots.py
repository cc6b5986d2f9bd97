"""Where the x layout lives: ``STORE/x_layout`` on a local file system or ``s3://`` objects.

A root gives the reader and the writer bytes, byte ranges, sizes and zarr stores by path relative
to the layout; :func:`dataset_ready` tells a dataset's complete group (group attribute
``atlasmix_complete``, written last) from a missing or unfinished one.

Object stores: on ``s3://`` stores the layout is ``s3://bucket/prefix/x_layout``, written with zarr
over obstore (``zarr.storage.ObjectStore``) and read by byte ranges of the shard objects
(``obstore.get_range``); the configuration is TileDB's (``ATLASMIX_TILEDB_CONFIG``'s ``vfs.s3.*``
keys and the ``AWS_*`` variables). Other URI schemes have no layout: readers use TileDB X.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from atlasmix.store.context import is_local

LAYOUT_DIR = "x_layout"
COMPLETE_ATTR = "atlasmix_complete"


class _LocalRoot:
    """``STORE/x_layout`` on a local file system."""

    local = True

    def __init__(self, store_uri: str):
        self.base = Path(store_uri.removeprefix("file://")) / LAYOUT_DIR

    def read_bytes(self, rel: str) -> bytes | None:
        try:
            return (self.base / rel).read_bytes()
        except OSError:
            return None

    def delete(self, rel: str) -> None:
        if (self.base / rel).exists():
            shutil.rmtree(self.base / rel)

    def zarr_store(self, rel: str = ""):
        return str(self.base / rel) if rel else str(self.base)

    def children(self) -> list[str]:
        return [p.name for p in self.base.iterdir() if p.is_dir()] if self.base.exists() else []

    def nbytes(self, rel: str) -> int:
        return sum(f.stat().st_size for f in (self.base / rel).rglob("*") if f.is_file())


class _ObjectRoot:
    """``s3://bucket/prefix/x_layout`` through obstore (credentials from the ``AWS_*`` variables, the
    endpoint, scheme, region and addressing from ``ATLASMIX_TILEDB_CONFIG``'s ``vfs.s3.*`` keys, so
    one configuration serves TileDB and the layout)."""

    local = False

    def __init__(self, store_uri: str):
        bucket, _, prefix = store_uri.removeprefix("s3://").partition("/")
        self.bucket = bucket
        self.prefix = "/".join(x for x in (prefix.strip("/"), LAYOUT_DIR) if x)
        try:
            cfg = json.loads(os.environ.get("ATLASMIX_TILEDB_CONFIG") or "{}")
        except ValueError:
            cfg = {}
        self.kw: dict = {}
        scheme = cfg.get("vfs.s3.scheme", "https")
        if cfg.get("vfs.s3.endpoint_override"):
            self.kw["endpoint"] = f"{scheme}://{cfg['vfs.s3.endpoint_override']}"
        region = cfg.get("vfs.s3.region") or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            self.kw["region"] = region
        if str(cfg.get("vfs.s3.use_virtual_addressing", "true")).lower() == "false":
            self.kw["virtual_hosted_style_request"] = False
        self.client_options = {"allow_http": True} if scheme == "http" else None
        self.store = self._obstore(self.prefix)

    def _obstore(self, prefix: str):
        from obstore.store import S3Store

        return S3Store(self.bucket, prefix=prefix, client_options=self.client_options, **self.kw)

    def read_bytes(self, rel: str) -> bytes | None:
        import obstore

        try:
            return bytes(obstore.get(self.store, rel).bytes())
        except FileNotFoundError:
            return None

    def read_range(self, rel: str, start: int, length: int) -> bytes:
        import obstore

        return bytes(obstore.get_range(self.store, rel, start=start, length=length))

    def size(self, rel: str) -> int | None:
        import obstore

        try:
            return int(obstore.head(self.store, rel)["size"])
        except FileNotFoundError:
            return None

    def delete(self, rel: str) -> None:
        import obstore

        paths = [m["path"] for batch in obstore.list(self.store, prefix=rel.rstrip("/") + "/") for m in batch]
        if paths:
            obstore.delete(self.store, paths)

    def zarr_store(self, rel: str = ""):
        from zarr.storage import ObjectStore

        return ObjectStore(self._obstore("/".join(x for x in (self.prefix, rel) if x)))

    def children(self) -> list[str]:
        import obstore

        res = obstore.list_with_delimiter(self.store)
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in res["common_prefixes"]]

    def nbytes(self, rel: str) -> int:
        import obstore

        return sum(int(m["size"]) for batch in obstore.list(self.store, prefix=rel.rstrip("/") + "/") for m in batch)


def layout_root(store_uri: str) -> _LocalRoot | _ObjectRoot | None:
    """The layout's root (``STORE/x_layout``): local folders, ``s3://`` objects; None for other schemes."""
    if is_local(store_uri):
        return _LocalRoot(store_uri)
    if store_uri.startswith("s3://"):
        return _ObjectRoot(store_uri)
    return None


def _attrs(root, rel: str) -> dict | None:
    raw = root.read_bytes(f"{rel}/zarr.json")
    try:
        return json.loads(raw).get("attributes", {}) if raw is not None else None
    except ValueError:
        return None


def dataset_ready(store_uri: str, dataset_joinid: int) -> bool:
    """True when dataset ``dataset_joinid`` has a complete layout group."""
    root = layout_root(store_uri)
    a = _attrs(root, f"d{int(dataset_joinid)}") if root is not None else None
    return bool(a and a.get(COMPLETE_ATTR))


def delete_dataset(store_uri: str, dataset_joinid: int) -> None:
    """Remove one dataset's layout group (no error when absent)."""
    root = layout_root(store_uri)
    if root is not None:
        root.delete(f"d{int(dataset_joinid)}")

