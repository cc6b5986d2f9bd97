"""Shared fixtures: the real datasets in ../shared/data and a store built from them."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ATLASMIX_SHARED_DATA", ROOT.parent / "shared" / "data"))
PLAN = ROOT / "examples" / "shared_data_plan.toml"

needs_shared = pytest.mark.skipif(not (SHARED / "pbmc3k_hvg2000.h5ad").exists(),
                                  reason="../shared/data is absent")


def run_cli(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``atlasmix ARGS`` in a subprocess (as a user would), capturing output."""
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "atlasmix.cli", *map(str, args)], capture_output=True,
                          text=True, env=e, timeout=timeout)


def tree_digest(path: Path) -> str:
    """sha256 over every file name and content under ``path`` (to prove a store is unchanged)."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="session")
def shared_store(tmp_path_factory):
    """A store holding every count dataset of ../shared/data, ingested through the plan file."""
    if not (SHARED / "pbmc3k_hvg2000.h5ad").exists():
        pytest.skip("../shared/data is absent")
    from atlasmix.cli import _plan_requests
    from atlasmix.ingest import QCPolicy, ingest
    from atlasmix.store import Store

    uri = tmp_path_factory.mktemp("lake") / "store"
    store = Store.create(str(uri))
    reqs = _plan_requests(PLAN, {"qc": QCPolicy()})
    reports = ingest(store, reqs, chunk_size=1000)
    return store, reqs, {r["dataset_id"]: r for r in reports}
