"""``s3://`` stores work through tiledbsoma's own configuration (against a local moto S3 server)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import SHARED, needs_shared, run_cli

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")
pytestmark = needs_shared


def test_s3_store_init_ingest_info_export(s3_env, tmp_path):
    s3_env, bucket = s3_env
    uri = f"s3://{bucket}/atlas"
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
