"""Files written by older tools ingest: anndata < 0.7 (structured-array obs/var, categories in uns,
raw.X, dense X, duplicate var names) as h5ad and zarr; Cell Ranger 2.x HDF5 (genome groups) and
multi-genome 10x HDF5 of both generations. Each file is generated here, small, in the layout those
tools wrote, and is checked to open in anndata / scanpy first."""

from __future__ import annotations

import warnings

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
import zarr

from atlasmix.ingest import DatasetRequest, ingest
from atlasmix.store import Store
from tests.conftest import run_cli, tree_digest

HUMAN = ["CD3E", "CD3E", "MS4A1", "LYZ", "NKG7", "GNLY", "ACTB", "MT-CO1"]  # CD3E twice: duplicate var names
SYMBOLS = ["--gene-id-column", "gene_symbols"]  # the generated files' gene ids are not real Ensembl ids
MOUSE = ["Cd3e", "Ms4a1", "Lyz2", "Nkg7", "Gzma", "Actb"]


def _counts(n: int, g: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).poisson(3.0, (n, g)).astype(np.float32)


def write_legacy_anndata(path, fmt: str, X: np.ndarray, genes: list[str]) -> None:
    """anndata < 0.7: obs/var as structured arrays (first field = index), a categorical stored as codes
    with ``uns/<col>_categories``, dense X, legacy ``raw.X``/``raw.var``."""
    n, g = X.shape
    obs = np.zeros(n, dtype=[("index", "S12"), ("louvain", "i1"), ("n_counts", "f4")])
    obs["index"] = [f"cell{i}".encode() for i in range(n)]
    obs["louvain"] = np.arange(n) % 3
    obs["n_counts"] = X.sum(1)
    var = np.zeros(g, dtype=[("index", "S16"), ("gene_ids", "S16")])
    var["index"] = [s.encode() for s in genes]
    var["gene_ids"] = var["index"]
    cats = np.array([b"B", b"T", b"NK"])
    if fmt == "h5ad":
        with h5py.File(path, "w") as f:
            f["X"], f["obs"], f["var"] = X, obs, var
            f["uns/louvain_categories"] = cats
            f["raw.X"], f["raw.var"] = X, var
    else:
        z = zarr.open_group(path, mode="w", zarr_format=2)
        for k, v in {"X": X, "obs": obs, "var": var, "raw.X": X, "raw.var": var}.items():
            z.create_array(k, data=v)
        z.create_group("uns").create_array("louvain_categories", data=cats)


def write_10x_cr2(path, groups: dict[str, tuple[np.ndarray, list[str]]]) -> None:
    """Cell Ranger 2.x: one group per genome with barcodes, data, indices, indptr, shape, genes, gene_names."""
    with h5py.File(path, "w") as f:
        for genome, (X, genes) in groups.items():
            m = sp.csc_matrix(sp.csr_matrix(X).T.astype(np.int32))
            g = f.create_group(genome)
            g["barcodes"] = np.array([f"AAAC{i:04d}-1" for i in range(X.shape[0])], dtype="S")
            g["data"], g["indices"], g["indptr"] = m.data, m.indices, m.indptr
            g["shape"] = np.array(m.shape, dtype=np.int32)
            g["genes"] = np.array([f"ENSG_{genome}_{s}" for s in genes], dtype="S")
            g["gene_names"] = np.array(genes, dtype="S")


def write_10x_cr3_multi(path, X: np.ndarray, genes: list[str], genomes: list[str]) -> None:
    """Cell Ranger 3+ barnyard file: one matrix, features tagged with their genome."""
    m = sp.csc_matrix(sp.csr_matrix(X).T.astype(np.int32))
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["barcodes"] = np.array([f"AAAC{i:04d}-1" for i in range(X.shape[0])], dtype="S")
        g["data"], g["indices"], g["indptr"] = m.data, m.indices, m.indptr
        g["shape"] = np.array(m.shape, dtype=np.int32)
        ft = g.create_group("features")
        ft["id"] = np.array([f"ID_{gn}_{s}" for s, gn in zip(genes, genomes)], dtype="S")
        ft["name"] = np.array(genes, dtype="S")
        ft["feature_type"] = np.array(["Gene Expression"] * len(genes), dtype="S")
        ft["genome"] = np.array(genomes, dtype="S")


def _by_symbol(store: Store, dataset_id: str) -> dict[str, np.ndarray]:
    """Counts of ``dataset_id`` per gene symbol (columns of the same symbol summed), cells in source order."""
    cat = store.catalog().set_index("dataset_id").loc[dataset_id]
    ids = np.arange(cat.obs_joinid_start, cat.obs_joinid_end)
    var = store.var()
    X = sp.vstack([m for _, m in store.iter_X(ids, var.index.to_numpy(), chunk_size=500)]).toarray()
    names = var["feature_name"].astype(str).to_numpy()
    return {s: X[:, names == s].sum(1) for s in np.unique(names) if X[:, names == s].any()}


def _source_by_symbol(X: np.ndarray, genes: list[str]) -> dict[str, np.ndarray]:
    return {s: X[:, [i for i, g in enumerate(genes) if g == s]].sum(1) for s in set(genes)}


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_pre_0_7_anndata_ingests_and_round_trips(tmp_path, fmt):
    X = _counts(40, len(HUMAN), 1)
    src = tmp_path / f"old.{fmt}"
    write_legacy_anndata(src, fmt, X, HUMAN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = ad.read_h5ad(src) if fmt == "h5ad" else ad.read_zarr(src)  # anndata itself reads it
    assert a.shape == X.shape and str(a.obs["louvain"].dtype) == "category"
    store = Store.create(str(tmp_path / "store"))
    for layer, did in [(None, "x"), ("raw", "raw")]:
        (rep,) = ingest(store, [DatasetRequest(dataset_id=did, source=str(src), layer=layer)])
        assert rep["n_cells"] == 40 and rep["gene_mapping"]["n_duplicates"] == 1  # CD3E twice, summed
        got, want = _by_symbol(store, did), _source_by_symbol(X, HUMAN)
        assert set(got) == set(want)
        for s in want:
            np.testing.assert_array_equal(got[s], want[s])
    obs = store.obs(["dataset_id", "obs_id"]).to_pandas()
    assert obs.loc[obs.dataset_id == "x", "obs_id"].tolist()[:2] == ["x:cell0", "x:cell1"]


def test_cell_ranger_2_single_genome_ingests(tmp_path):
    import scanpy as sc

    X = _counts(30, len(HUMAN), 2)
    src = tmp_path / "cr2.h5"
    write_10x_cr2(src, {"GRCh38": (X, HUMAN)})
    assert sc.read_10x_h5(src).shape == X.shape  # scanpy reads it
    store = Store.create(str(tmp_path / "store"))
    r = run_cli("ingest", store.uri, src, "--dataset-id", "cr2", *SYMBOLS)
    assert r.returncode == 0, r.stderr
    got, want = _by_symbol(store, "cr2"), _source_by_symbol(X, HUMAN)
    for s in want:
        np.testing.assert_array_equal(got[s], want[s])


def test_multi_genome_files_need_genome_and_list_them(tmp_path):
    import scanpy as sc

    store = Store.create(str(tmp_path / "store"))
    hx, mx = _counts(25, len(HUMAN), 3), _counts(25, len(MOUSE), 4)
    cr2 = tmp_path / "barnyard_cr2.h5"
    write_10x_cr2(cr2, {"hg19": (hx, HUMAN), "mm10": (mx, MOUSE)})
    cr3 = tmp_path / "barnyard_cr3.h5"
    write_10x_cr3_multi(cr3, np.hstack([hx, mx]), HUMAN + MOUSE, ["GRCh38"] * len(HUMAN) + ["mm10"] * len(MOUSE))
    assert sc.read_10x_h5(cr2, genome="mm10").shape == mx.shape
    assert sc.read_10x_h5(cr3, genome="GRCh38").shape == hx.shape
    before = tree_digest(tmp_path / "store")
    for src, genomes in [(cr2, "hg19, mm10"), (cr3, "GRCh38, mm10")]:
        r = run_cli("ingest", store.uri, src, "--dataset-id", "b")
        assert r.returncode == 2 and "Traceback" not in r.stderr
        assert r.stderr.strip().splitlines() == [r.stderr.strip().splitlines()[-1]]
        assert f"({genomes})" in r.stderr and "--genome" in r.stderr
        r = run_cli("ingest", store.uri, src, "--dataset-id", "b", "--genome", "nope")
        assert r.returncode == 2 and "no genome 'nope'" in r.stderr
    assert tree_digest(tmp_path / "store") == before  # refusals leave the store as it was
    for src, genome, organism, X, genes, did in [(cr2, "mm10", "mouse", mx, MOUSE, "cr2_mm10"),
                                                 (cr3, "GRCh38", "human", hx, HUMAN, "cr3_human")]:
        r = run_cli("ingest", store.uri, src, "--dataset-id", did, "--genome", genome, "--organism", organism, *SYMBOLS)
        assert r.returncode == 0, r.stderr
        got, want = _by_symbol(store, did), _source_by_symbol(X, genes)
        assert set(got) == set(want)
        for s in want:
            np.testing.assert_array_equal(got[s], want[s])
