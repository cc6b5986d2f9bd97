"""Shared fixtures: the real datasets in ../shared/data and a store built from them."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import uuid
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
    from atlasmix.ingest import read_plan
    from atlasmix.ingest import QCPolicy, ingest
    from atlasmix.store import Store

    uri = tmp_path_factory.mktemp("lake") / "store"
    store = Store.create(str(uri))
    reqs = read_plan(PLAN, {"qc": QCPolicy()})
    reports = ingest(store, reqs, chunk_size=1000)
    return store, reqs, {r["dataset_id"]: r for r in reports}


#: Four blood datasets of the shared store, and their stand-ins in the simulated store.
SHARED_BLOOD = ("pisces_pbmc1k", "kang_ifnb", "pbmc3k", "pbmc10k_cite")
SIM_BLOOD = ("blood_a", "blood_b", "bone_marrow", "malignant")


@pytest.fixture(scope="session")
def lake(request, tmp_path_factory):
    """``(store, names)`` for the core tests: the ../shared/data store when present, else a small
    simulated store (4,000 cells of four datasets, 800 genes), so that the loader, LDVAE, Geneformer
    and evaluation tests never skip for want of data. ``names``: four dataset ids, the first three
    PBMC-like (the fourth is pbmc10k_cite or the simulated malignant cells)."""
    if (SHARED / "pbmc3k_hvg2000.h5ad").exists() and not os.environ.get("ATLASMIX_CORE_SIMULATED"):
        return request.getfixturevalue("shared_store")[0], SHARED_BLOOD
    store, _ = simulated_store(tmp_path_factory.mktemp("simlake"), 4000, sources=",".join(SIM_BLOOD), seed=11,
                               n_genes=800)
    return store, SIM_BLOOD


def ingest_plan(store, plan: str | Path, chunk_size: int = 1000) -> list[dict]:
    """Ingest a simulator's ``plan.toml`` into ``store`` as ``atlasmix ingest --plan`` would (default QC)."""
    from atlasmix.ingest import read_plan
    from atlasmix.ingest import QCPolicy, ingest

    return ingest(store, read_plan(Path(plan), {"qc": QCPolicy()}), chunk_size=chunk_size)


def simulated_store(d: Path, n_cells: int, **simulate_kw):
    """``(store, info)``: ``n_cells`` simulated into ``d/sim`` (:func:`atlasmix.simulate.simulate_atlas`
    keyword arguments) and ingested into a new store ``d/store``."""
    from atlasmix.simulate import simulate_atlas
    from atlasmix.store import Store

    info = simulate_atlas(d / "sim", n_cells, **simulate_kw)
    store = Store.create(str(d / "store"))
    ingest_plan(store, info["plan"])
    return store, info


def in_sql(names) -> str:
    """``dataset_id IN ('a', 'b')`` for a list of dataset ids."""
    return "dataset_id IN (" + ", ".join(f"'{n}'" for n in names) + ")"


@pytest.fixture
def s3_env(monkeypatch):
    """A local moto S3 server configured as a user would (AWS_* + ATLASMIX_TILEDB_CONFIG).

    Yields ``(env, bucket)``. moto keeps its buckets in process-global state shared by every server
    started in one pytest worker, so each test gets a bucket of its own.
    """
    moto_server = pytest.importorskip("moto.server")
    boto3 = pytest.importorskip("boto3")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "ATLASMIX_TILEDB_CONFIG": json.dumps({"vfs.s3.endpoint_override": f"127.0.0.1:{port}",
                                                 "vfs.s3.scheme": "http", "vfs.s3.region": "us-east-1",
                                                 "vfs.s3.use_virtual_addressing": "false"})}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    bucket = f"lake-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1").create_bucket(Bucket=bucket)
    try:
        yield env, bucket
    finally:
        server.stop()
