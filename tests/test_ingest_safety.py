"""Bad input is refused with one line and exit code 2, leaving the store byte-identical; killed and
concurrent ingests never corrupt the store."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from atlasmix.store import Store
from conftest import SHARED, needs_shared, run_cli, tree_digest

pytestmark = needs_shared

PBMC3K = SHARED / "pbmc3k_hvg2000.h5ad"
KANG = SHARED / "kang_pbmc_ifnb.h5ad"


@pytest.fixture(scope="module")
def base_store(tmp_path_factory):
    """A store with pbmc3k, ingested through the CLI."""
    uri = tmp_path_factory.mktemp("base") / "store"
    assert run_cli("store", "init", uri).returncode == 0
    r = run_cli("ingest", uri, PBMC3K, "--dataset-id", "pbmc3k", "--obs-map", "cell_type=classified")
    assert r.returncode == 0, r.stderr
    return uri


@pytest.fixture
def store_copy(base_store, tmp_path):
    dst = tmp_path / "store"
    shutil.copytree(base_store, dst)
    return dst


def _small(tmp_path, name, mutate):
    a = ad.read_h5ad(PBMC3K)[:60].copy()
    mutate(a)
    p = tmp_path / name
    a.write_h5ad(p)
    return p


def _bad_inputs(tmp_path):
    yield "not counts", SHARED / "tirosh_oligodendroglioma_infercnv.h5ad", "non-integer"
    yield "no gene ids", SHARED / "scdcc_human_kidney_top2000.h5ad", "no usable gene identifiers"

    def dup(a):
        a.obs_names = ["AAAC"] * 2 + list(a.obs_names[2:])
    yield "duplicate barcodes", _small(tmp_path, "dup.h5ad", dup), "duplicate barcodes"

    def nan(a):
        a.X = a.X.astype(np.float32)
        a.X.data[5] = np.nan
    yield "NaN", _small(tmp_path, "nan.h5ad", nan), "NaN"

    def neg(a):
        a.X.data[7] = -3
    yield "negative", _small(tmp_path, "neg.h5ad", neg), "negative"
    empty = tmp_path / "empty.h5ad"
    empty.write_bytes(b"")
    yield "empty file", empty, "empty file"
    trunc = tmp_path / "trunc.h5ad"
    trunc.write_bytes(PBMC3K.read_bytes()[: PBMC3K.stat().st_size // 2])
    yield "truncated file", trunc, "truncated"
    csv = tmp_path / "counts.csv"
    csv.write_text("gene,cell1\nCD3E,1\n")
    yield "unknown format", csv, "unknown format"
    yield "missing file", tmp_path / "nope.h5ad", "not found"
    yield "existing dataset id", KANG, "already exists"


def test_bad_input_is_refused_with_one_line_and_store_unchanged(store_copy, tmp_path):
    before = tree_digest(store_copy)
    for what, path, needle in _bad_inputs(tmp_path):
        did = "pbmc3k" if what == "existing dataset id" else "newdata"
        r = run_cli("ingest", store_copy, path, "--dataset-id", did)
        assert r.returncode == 2, (what, r.stderr)
        lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        assert lines[-1].startswith("error: ") and needle.lower() in lines[-1].lower(), (what, lines)
        assert "Traceback" not in r.stderr, what
        assert tree_digest(store_copy) == before, f"store changed after refused input: {what}"
    # refused input for the whole plan leaves the store unchanged too (one bad entry refuses all)
    plan = tmp_path / "plan.toml"
    plan.write_text(f'[[dataset]]\ndataset_id = "kang"\nsource = "{KANG}"\n\n'
                    f'[[dataset]]\ndataset_id = "tirosh"\nsource = "{SHARED / "tirosh_oligodendroglioma_infercnv.h5ad"}"\n')
    r = run_cli("ingest", store_copy, "--plan", plan)
    assert r.returncode == 2 and "non-integer" in r.stderr
    assert tree_digest(store_copy) == before
    # ... and --assume-counts is the explicit way in for a layer that does hold counts
    r = run_cli("ingest", store_copy, SHARED / "tirosh_oligodendroglioma_infercnv.h5ad", "--dataset-id", "tirosh",
                "--assume-counts", "--obs-map", "is_malignant=malignant", "--obs-map", "cell_type=cell_type")
    assert r.returncode == 0, r.stderr
    obs = Store(str(store_copy)).obs(["dataset_id", "is_malignant"]).to_pandas()
    assert obs[obs.dataset_id == "tirosh"]["is_malignant"].any()


def test_bad_plan_points_at_the_key(store_copy, tmp_path):
    plan = tmp_path / "plan.toml"
    plan.write_text(f'[[dataset]]\ndataset_id = "kang"\nsource = "{KANG}"\nobs_mapp = {{ cell_type = "x" }}\n')
    r = run_cli("ingest", store_copy, "--plan", plan)
    assert r.returncode == 2 and "dataset[0].obs_mapp" in r.stderr


@pytest.mark.parametrize("point", ["after_catalog", "x_chunk", "before_obs", "before_commit"])
def test_killed_ingest_is_invisible_and_rerun_completes(store_copy, point):
    args = ("ingest", store_copy, KANG, "--dataset-id", "kang", "--chunk-size", "500")
    r = run_cli(*args, env={"ATLASMIX_CRASH_AT": point})
    assert r.returncode == -signal.SIGKILL
    s = Store(str(store_copy))
    info = s.info()
    assert info["n_cells"] == 2638 and [d["dataset_id"] for d in info["datasets"] if d["status"] == "complete"] == ["pbmc3k"]
    assert set(s.obs(["dataset_id"]).to_pandas()["dataset_id"]) == {"pbmc3k"}
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    s = Store(str(store_copy))
    obs = s.obs(["obs_id", "dataset_id"]).to_pandas()
    assert len(obs) == 2638 + 2000 and obs["obs_id"].is_unique
    cat = s.catalog(include_all=True)
    assert list(cat["status"]) == ["complete", "failed", "complete"]
    # the crashed range is gone for raw tiledbsoma readers as well, and the new copy reads back exactly
    import tiledbsoma as soma

    with soma.Experiment.open(str(store_copy)) as exp:
        raw = exp.obs.read(column_names=["soma_joinid", "dataset_id"]).concat().to_pandas()
        assert len(raw) == len(obs)
    kang = ad.read_h5ad(KANG)
    row = cat[(cat.dataset_id == "kang") & (cat.status == "complete")].iloc[0]
    ids = np.arange(row.obs_joinid_start, row.obs_joinid_end)
    got = sp.vstack([m for _, m in s.iter_X(ids)])
    assert got.sum() == pytest.approx(s.obs(["total_counts", "dataset_id"]).to_pandas().query("dataset_id == 'kang'")
                                      ["total_counts"].sum() - 0, rel=0.01)
    assert got.shape[0] == kang.n_obs


def test_kill_at_random_times_then_rerun(store_copy):
    """SIGKILL an ingest of a 58k-gene dataset at several wall-clock points; the store always recovers."""
    cmd = [sys.executable, "-m", "atlasmix.cli", "ingest", str(store_copy), str(SHARED / "pisces_pbmc1k.h5ad"),
           "--dataset-id", "pisces", "--chunk-size", "100"]
    rng = np.random.default_rng(0)
    for delay in sorted(rng.uniform(1.5, 6.0, size=3)):
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        info = Store(str(store_copy)).info()
        done = [d["dataset_id"] for d in info["datasets"] if d["status"] == "complete"]
        assert info["n_cells"] == 2638 + (1000 if "pisces" in done else 0)
        if "pisces" in done:
            break
    r = subprocess.run(cmd + (["--replace"] if "pisces" in done else []), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    obs = Store(str(store_copy)).obs(["obs_id"]).to_pandas()
    assert len(obs) == 3638 and obs["obs_id"].is_unique


def test_two_concurrent_ingests_do_not_corrupt(store_copy):
    procs = [subprocess.Popen([sys.executable, "-m", "atlasmix.cli", "ingest", str(store_copy), str(src), "--dataset-id", did],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for src, did in [(KANG, "kang"), (SHARED / "zheng_pbmc8k_hvg200.h5ad", "zheng")]]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    s = Store(str(store_copy))
    obs = s.obs(["obs_id", "dataset_id"]).to_pandas()
    assert obs.groupby("dataset_id", observed=True).size().to_dict() == {"pbmc3k": 2638, "kang": 2000, "zheng": 7480}
    assert obs["obs_id"].is_unique and obs["soma_joinid"].is_unique
    cat = s.catalog()
    ranges = sorted(zip(cat.obs_joinid_start, cat.obs_joinid_end))
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))


def test_replace_swaps_the_dataset(store_copy):
    r = run_cli("ingest", store_copy, PBMC3K, "--dataset-id", "pbmc3k", "--replace", "--set", "assay=10x 3' v1",
                "--obs-filter", "classified = 'B'")
    assert r.returncode == 0, r.stderr
    s = Store(str(store_copy))
    obs = s.obs(["dataset_id", "assay", "cell_type"]).to_pandas()
    assert len(obs) == 344 and (obs.assay == "10x 3' v1").all()
    assert s.info()["n_cells"] == 344
    import tiledbsoma as soma

    with soma.Experiment.open(str(store_copy)) as exp:  # old cells deleted, not just hidden
        assert exp.obs.read(column_names=["soma_joinid"]).concat().num_rows == 344


def test_copies_of_stored_cells_are_reported_or_refused_and_refusal_changes_nothing(store_copy, tmp_path):
    """The same cells under another id / format (the 10x MEX of pbmc3k; a slice of the h5ad with one
    count changed): refused with ``--on-duplicate-cells refuse`` (store unchanged), else ingested
    with a warning and recorded in the catalog."""
    before = tree_digest(store_copy)
    mex = SHARED / "pbmc3k_hvg2000_mex"
    r = run_cli("ingest", store_copy, mex, "--dataset-id", "pbmc3k_mex", "--on-duplicate-cells", "refuse")
    assert r.returncode == 2, r.stderr
    last = [ln for ln in r.stderr.strip().splitlines() if ln.strip()][-1]
    assert last.startswith("error: ") and "2,638 equal cells of dataset 'pbmc3k'" in last, last
    assert "same count on every gene" in last and "Traceback" not in r.stderr
    assert tree_digest(store_copy) == before

    def bump(a):  # cell 5 gets one more count on one gene: no longer the same cell
        a.X = a.X.tocsr()
        a.X.data[a.X.indptr[5]] += 1
    part = _small(tmp_path, "part.h5ad", bump)
    r = run_cli("ingest", store_copy, part, "--dataset-id", "part", "--on-duplicate-cells", "refuse")
    assert r.returncode == 2 and "59 equal cells of dataset 'pbmc3k'" in r.stderr, r.stderr
    assert tree_digest(store_copy) == before

    r = run_cli("ingest", store_copy, mex, "--dataset-id", "pbmc3k_mex")
    assert r.returncode == 0, r.stderr
    said = " ".join(r.stderr.split())  # the console writes to stderr, wrapped
    assert "warning: 2,638 cells of pbmc3k_mex have the same counts on every gene as cells of pbmc3k" in said
    cat = Store(str(store_copy)).catalog().set_index("dataset_id")
    dup = json.loads(cat.loc["pbmc3k_mex", "provenance"])["duplicate_cells"]
    assert dup["by_dataset"] == {"pbmc3k": 2638} and dup["within_dataset"] == 0
    info = {d["dataset_id"]: d for d in json.loads(run_cli("store", "info", store_copy, "--json").stdout)["datasets"]}
    assert info["pbmc3k_mex"]["duplicate_cells"]["by_dataset"] == {"pbmc3k": 2638}
    assert info["pbmc3k"]["duplicate_cells"]["by_dataset"] == {}
    # replacing a dataset with the same file does not count its own retiring cells as copies
    r = run_cli("ingest", store_copy, PBMC3K, "--dataset-id", "pbmc3k", "--replace", "--on-duplicate-cells", "refuse")
    assert r.returncode == 2 and "'pbmc3k_mex'" in r.stderr and "of dataset 'pbmc3k' " not in r.stderr, r.stderr
