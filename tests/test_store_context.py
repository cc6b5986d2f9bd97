"""The TileDB settings every atlasmix context carries (atlasmix.store.store.TILEDB_DEFAULTS)."""

from __future__ import annotations

import json

from atlasmix.store import Store
from atlasmix.store.store import TILEDB_DEFAULTS, make_context

MERGE = "sm.query.sparse_global_order.preprocess_tile_merge"


def _native(ctx) -> str:
    """The value TileDB itself was configured with (not just the dict atlasmix passed)."""
    return ctx.native_context.config()[MERGE]


def test_preprocess_tile_merge_is_off_in_store_contexts(tmp_path, monkeypatch):
    monkeypatch.delenv("ATLASMIX_TILEDB_CONFIG", raising=False)
    assert TILEDB_DEFAULTS[MERGE] == "0"
    assert _native(make_context()) == "0"
    store = Store.create(str(tmp_path / "store"))
    assert _native(Store(store.uri).context) == "0"


def test_defaults_are_overridable_by_env_and_argument(monkeypatch):
    monkeypatch.setenv("ATLASMIX_TILEDB_CONFIG", json.dumps({MERGE: "32768"}))
    assert _native(make_context()) == "32768"
    assert _native(make_context({MERGE: "128"})) == "128"


def test_env_settings_for_s3_keep_the_defaults(monkeypatch):
    """An s3 set-up (ATLASMIX_TILEDB_CONFIG with endpoint / region keys) merges over the defaults:
    the TileDB reader-crash workaround stays on (it used to be dropped)."""
    monkeypatch.setenv("ATLASMIX_TILEDB_CONFIG", json.dumps({"vfs.s3.region": "eu-west-1"}))
    ctx = make_context()
    assert _native(ctx) == "0"
    assert ctx.native_context.config()["vfs.s3.region"] == "eu-west-1"
