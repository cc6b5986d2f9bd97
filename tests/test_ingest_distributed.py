"""Plan ingest on dask.distributed worker processes (``atlasmix ingest --workers N``): the same store
as a serial ingest, and a run whose workers die mid-write leaves nothing visible and reruns."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from atlasmix.store import Store
from tests.conftest import ingest_plan, run_cli

CATALOG_TIMES = ["ingest_time"]


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    from atlasmix.simulate import simulate_atlas

    d = tmp_path_factory.mktemp("dist")
    info = simulate_atlas(d / "sim", 2400, sources="blood_a,blood_b,malignant", seed=5, n_genes=800)
    serial = Store.create(str(d / "serial"))
    ingest_plan(serial, info["plan"], chunk_size=300)
    return info["plan"], serial


def _by_cell(store: Store) -> tuple[pd.DataFrame, sp.csr_matrix]:
    """obs (every column but soma_joinid) and X with genes as feature ids, rows in (dataset, obs_id) order."""
    obs = store.obs().to_pandas()
    obs = obs.sort_values(["dataset_id", "obs_id"]).reset_index(drop=True)
    ids = obs["soma_joinid"].to_numpy()
    order = np.argsort(ids)
    var = store.var()
    vj = var.sort_values("feature_id").index.to_numpy(dtype=np.int64)  # genes in feature-id order
    X = sp.vstack([m for _, m in store.iter_X(ids[order], vj)]).tocsr()
    X = X[np.argsort(order)]
    return obs.drop(columns=["soma_joinid"]), X


def _presence(store: Store) -> pd.DataFrame:
    cat = store.catalog()
    P = store.presence()
    var = store.var()
    rows = [(cat.loc[j, "dataset_id"], var.loc[g, "feature_id"]) for j, g in zip(*P.nonzero()) if j in cat.index]
    return pd.DataFrame(sorted(rows), columns=["dataset_id", "feature_id"])


def _assert_same_store(a: Store, b: Store) -> None:
    oa, Xa = _by_cell(a)
    ob, Xb = _by_cell(b)
    pd.testing.assert_frame_equal(oa, ob)
    assert Xa.shape == Xb.shape and (Xa != Xb).nnz == 0
    va = a.var().reset_index(drop=True).sort_values("feature_id").reset_index(drop=True)
    vb = b.var().reset_index(drop=True).sort_values("feature_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(va, vb)
    pd.testing.assert_frame_equal(_presence(a), _presence(b))
    keep = [c for c in a.catalog().columns if c not in CATALOG_TIMES + ["soma_joinid", "obs_joinid_start",
                                                                       "obs_joinid_end"]]
    ca = a.catalog().sort_values("dataset_id")[keep].reset_index(drop=True)
    cb = b.catalog().sort_values("dataset_id")[keep].reset_index(drop=True)
    pd.testing.assert_frame_equal(ca, cb)


def test_cluster_ingest_equals_serial_ingest(plan, tmp_path):
    """A running cluster (scheduler + 2 worker processes started here), reached with --scheduler."""
    from distributed import LocalCluster

    path, serial = plan
    uri = tmp_path / "dist"
    assert run_cli("store", "init", uri).returncode == 0
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        r = run_cli("ingest", uri, "--plan", path, "--chunk-size", "300", "--scheduler", cluster.scheduler_address)
        assert r.returncode == 0, r.stderr[-3000:]
        # the datasets were validated and written by the cluster's workers, not by the CLI process
        assert {"prepare_task", "write_X_task"} <= set(cluster.scheduler.task_prefixes)
    dist = Store(str(uri))
    _assert_same_store(serial, dist)
    from atlasmix.store import xlayout

    v = xlayout.verify(dist)  # the x layout the workers wrote equals TileDB X
    assert v["ok"], v


def test_workers_dying_mid_write_leave_nothing_visible_and_rerun_completes(plan, tmp_path):
    path, serial = plan
    uri = tmp_path / "dist"
    assert run_cli("store", "init", uri).returncode == 0
    # every X write task kills its worker process after its first chunk; with no retries allowed,
    # dask gives up on the task and the ingest must fail with one line and commit nothing
    r = run_cli("ingest", uri, "--plan", path, "--chunk-size", "300", "--workers", "2",
                env={"ATLASMIX_CRASH_AT": "x_chunk", "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"})
    assert r.returncode == 2, r.stderr[-3000:]
    assert "dask workers died" in r.stderr and "nothing was committed" in r.stderr
    s = Store(str(uri))
    assert s.info()["n_cells"] == 0 and len(s.obs(["dataset_id"]).to_pandas()) == 0
    assert not (s.catalog(include_all=True)["status"] == "complete").any()
    r = run_cli("ingest", uri, "--plan", path, "--chunk-size", "300", "--workers", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    s = Store(str(uri))
    obs = s.obs(["obs_id", "dataset_id"]).to_pandas()
    assert len(obs) == len(serial.obs(["obs_id"]).to_pandas()) and not obs.duplicated().any()  # no cell twice
    _assert_same_store(serial, s)


def test_scheduler_and_workers_are_exclusive_and_a_dead_address_is_one_line(plan, tmp_path):
    path, _ = plan
    uri = tmp_path / "s"
    assert run_cli("store", "init", uri).returncode == 0
    r = run_cli("ingest", uri, "--plan", path, "--workers", "2", "--scheduler", "tcp://127.0.0.1:1")
    assert r.returncode == 2 and "either --scheduler or --workers" in r.stderr
    r = run_cli("ingest", uri, "--plan", path, "--scheduler", "tcp://127.0.0.1:1")
    assert r.returncode == 2 and "no dask scheduler answers" in r.stderr
    assert r.stderr.count("\n") <= 2


def test_workers_ingest_into_an_s3_store(plan, s3_env):
    """Worker processes write X and its x layout to object storage (a local moto S3 server); the
    store equals the local serial one."""
    env, bucket = s3_env
    path, serial = plan
    uri = f"s3://{bucket}/lake"
    assert run_cli("store", "init", uri, env=env).returncode == 0
    r = run_cli("ingest", uri, "--plan", path, "--chunk-size", "300", "--workers", "2", env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    s3 = Store(uri)
    _assert_same_store(serial, s3)
    from atlasmix.store import xlayout

    assert xlayout.verify(s3)["ok"]
