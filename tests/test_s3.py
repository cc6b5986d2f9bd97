"""``s3://`` stores work through tiledbsoma's own configuration (against a local moto S3 server)."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest

from conftest import SHARED, needs_shared, run_cli

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")
pytestmark = needs_shared


@pytest.fixture
def s3_env(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "ATLASMIX_TILEDB_CONFIG": json.dumps({"vfs.s3.endpoint_override": f"127.0.0.1:{port}",
                                                 "vfs.s3.scheme": "http", "vfs.s3.region": "us-east-1",
                                                 "vfs.s3.use_virtual_addressing": "false"})}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1").create_bucket(Bucket="lake")
    yield env
    server.stop()


def test_s3_store_init_ingest_info_export(s3_env, tmp_path):
    uri = "s3://lake/atlas"
    assert run_cli("store", "init", uri, env=s3_env).returncode == 0
    r = run_cli("ingest", uri, SHARED / "kang_pbmc_ifnb.h5ad", "--dataset-id", "kang", env=s3_env)
    assert r.returncode == 0, r.stderr
    r = run_cli("store", "info", uri, "--json", env=s3_env)
    info = json.loads(r.stdout)
    assert info["n_cells"] == 2000 and info["size_bytes"] is None
    out = tmp_path / "stim.h5ad"
    r = run_cli("store", "export", uri, out, "--where", "perturbation = 'none'", env=s3_env)
    assert r.returncode == 0, r.stderr
    import anndata as ad

    a = ad.read_h5ad(out)
    src = ad.read_h5ad(SHARED / "kang_pbmc_ifnb.h5ad")
    assert a.n_obs == 2000 and np.isclose(a.X.sum(), src.X.sum(), rtol=0.02)
