"""Every reader gives the same cells: h5ad, AnnData zarr, 10x HDF5, SOMA experiment; chunking is exact."""

from __future__ import annotations

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from atlasmix.errors import AtlasmixError
from atlasmix.ingest import DatasetRequest, ingest
from atlasmix.store import Store
from atlasmix.store.query import export_h5ad, select_joinids
from conftest import SHARED, needs_shared

pytestmark = needs_shared
PBMC3K = SHARED / "pbmc3k_hvg2000.h5ad"


def _write_10x_h5(a: ad.AnnData, path, gene_ids) -> None:
    """Write a Cell Ranger v3 feature-barcode HDF5 (layout from 10x Genomics' documentation)."""
    m = sp.csc_matrix(sp.csr_matrix(a.X).T.astype(np.int32))  # genes x cells, CSC = per-barcode columns
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["barcodes"] = np.array(a.obs_names, dtype="S")
        g["data"], g["indices"], g["indptr"] = m.data, m.indices, m.indptr
        g["shape"] = np.array(m.shape, dtype=np.int32)
        ft = g.create_group("features")
        ft["id"] = np.array(gene_ids, dtype="S")
        ft["name"] = np.array(a.var_names, dtype="S")
        ft["feature_type"] = np.array(["Gene Expression"] * a.n_vars, dtype="S")
        ft["genome"] = np.array(["GRCh38"] * a.n_vars, dtype="S")


def _dataset_X(store: Store, dataset_id: str) -> tuple[sp.csr_matrix, pd.Series]:
    cat = store.catalog().set_index("dataset_id").loc[dataset_id]
    ids = np.arange(cat.obs_joinid_start, cat.obs_joinid_end)
    var = store.var()
    X = sp.vstack([m for _, m in store.iter_X(ids, var.index.to_numpy(), chunk_size=500)]).tocsr()
    return X, var["feature_id"]


@pytest.fixture(scope="module")
def store_with_all_formats(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fmt")
    a = ad.read_h5ad(PBMC3K)
    a.write_zarr(tmp / "pbmc3k.zarr")
    # 10x h5 with Ensembl ids (as Cell Ranger writes them), mapped by a first ingest of the h5ad
    s0 = Store.create(str(tmp / "s0"))
    ingest(s0, [DatasetRequest(dataset_id="ref", source=str(PBMC3K))])
    from atlasmix.ingest.harmonize import harmonize_genes
    from atlasmix.store.genes import gene_table

    m = harmonize_genes(a.var_names, gene_table("human"))
    ids = [f if f is not None else f"UNMAPPED{i}" for i, f in enumerate(m.feature_id)]
    _write_10x_h5(a, tmp / "pbmc3k.h5", ids)
    store = Store.create(str(tmp / "store"))
    ingest(store, [
        DatasetRequest(dataset_id="h5ad", source=str(PBMC3K), obs_map={"cell_type": "classified"}),
        DatasetRequest(dataset_id="zarr", source=str(tmp / "pbmc3k.zarr"), obs_map={"cell_type": "classified"}),
        DatasetRequest(dataset_id="tenx", source=str(tmp / "pbmc3k.h5")),
        DatasetRequest(dataset_id="h5ad_tiny_chunks", source=str(PBMC3K)),
    ], chunk_size=4096)
    ingest(store, [DatasetRequest(dataset_id="h5ad_chunk97", source=str(PBMC3K))], chunk_size=97, parallel=False)
    return store, tmp


def test_formats_give_identical_cells(store_with_all_formats):
    store, _ = store_with_all_formats
    ref, fid = _dataset_X(store, "h5ad")
    assert ref.nnz > 400000
    for did in ["zarr", "tenx", "h5ad_chunk97"]:
        X, _ = _dataset_X(store, did)
        assert (X != ref).nnz == 0, did
    info = {d["dataset_id"]: d for d in store.info()["datasets"]}
    assert info["tenx"]["source_format"] == "10x_h5" and info["zarr"]["source_format"] == "zarr"
    assert info["tenx"]["gene_mapping"]["by_method"]["ensembl_id"] == info["tenx"]["gene_mapping"]["n_mapped"]


def test_soma_experiment_source_with_value_filter(store_with_all_formats, tmp_path):
    """A CELLxGENE-Census-like SOMA source: var.feature_id Ensembl ids, obs filtered by a value_filter."""
    import tiledbsoma.io as sio

    store, _ = store_with_all_formats
    out = tmp_path / "b.h5ad"
    export_h5ad(store, "dataset_id = 'h5ad'", out)
    a = ad.read_h5ad(out)
    a.var["feature_id"] = a.var_names
    a.obs["is_primary_data"] = True
    census_like = tmp_path / "census_like"
    sio.from_anndata(str(census_like), a, measurement_name="RNA", X_layer_name="raw")
    dst = Store.create(str(tmp_path / "dst"))
    rep = ingest(dst, [DatasetRequest(dataset_id="census_b", source=str(census_like),  # format detected
                                      obs_filter="cell_type == 'B' and is_primary_data == True",
                                      obs_map={"cell_type": "cell_type"})])
    assert rep[0]["n_cells"] == int((a.obs.cell_type == "B").sum()) == 344
    X, _ = _dataset_X(dst, "census_b")
    sel = a[a.obs.cell_type == "B"]
    var = dst.var()
    order = pd.Series(np.arange(sel.n_vars), index=sel.var_names).loc[var.feature_id].to_numpy()
    assert (X != sp.csr_matrix(sel.X)[:, order]).nnz == 0
    extra = dst.obs_extra("census_b")
    assert "is_primary_data" in extra.columns


def test_sql_is_read_only(store_with_all_formats):
    store, _ = store_with_all_formats
    assert len(select_joinids(store, "dataset_id = 'tenx' AND total_counts > 2000")) > 0
    for bad in ["1=1; DROP TABLE obs", "soma_joinid IN (SELECT * FROM read_csv('/etc/passwd'))",
                "1=1) UNION ALL (SELECT 1 FROM glob('/*')", "ATTACH 'x.db'", "COPY obs TO 'x.csv'"]:
        with pytest.raises(AtlasmixError, match="refused"):
            select_joinids(store, bad)
    # and even past the text check, duckdb itself has no file access
    from atlasmix.store.query import safe_connection

    con = safe_connection()
    with pytest.raises(Exception):
        con.execute("SELECT * FROM read_csv('/etc/hostname')").fetchall()
    with pytest.raises(Exception):
        con.execute("SET enable_external_access = true")
    with pytest.raises(AtlasmixError, match="bad --where"):
        select_joinids(store, "no_such_column = 1")


def test_store_init_refuses_existing_and_info_json(store_with_all_formats, tmp_path):
    from conftest import run_cli

    store, tmp = store_with_all_formats
    r = run_cli("store", "init", store.uri)
    assert r.returncode == 2 and "already exists" in r.stderr
    r = run_cli("store", "info", store.uri, "--json")
    import json

    info = json.loads(r.stdout)
    assert {"n_cells", "n_genes", "datasets"} <= set(info)
    assert info["n_cells"] == 5 * 2638
    assert {"dataset_id", "n_cells", "status"} <= set(info["datasets"][0])
    r = run_cli("store", "info", tmp / "missing")
    assert r.returncode == 2 and "no atlasmix store" in r.stderr
