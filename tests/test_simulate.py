"""Tests of ``atlasmix simulate``: determinism, chunking, composition, metadata, count realism,
signal (a classifier separates cell types), and the zarr / 10x MEX / plan.toml outputs."""

from __future__ import annotations

import gzip
import tomllib
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from atlasmix.errors import AtlasmixError
from atlasmix.simulate import (PRESET_NAMES, SourceSpec, iter_chunks, preset, simulate_atlas, split_cells)
from atlasmix.simulate import model

OBS_COLUMNS = ["dataset_id", "assay", "organism", "tissue", "tissue_general", "cell_type", "disease",
               "is_malignant", "perturbation", "development_stage", "donor_id"]
SMALL_GENES = 2000


def _read(path) -> ad.AnnData:
    p = Path(path)
    return ad.read_zarr(p) if p.suffix == ".zarr" else ad.read_h5ad(p)


def _assert_same(a: ad.AnnData, b: ad.AnnData) -> None:
    assert a.shape == b.shape
    assert (a.X != b.X).nnz == 0
    pd.testing.assert_frame_equal(a.obs, b.obs)
    pd.testing.assert_frame_equal(a.var, b.var)


def _cp10k_log1p(X: sp.csr_matrix) -> sp.csr_matrix:
    lib = np.asarray(X.sum(1)).ravel()
    Y = sp.diags(1e4 / lib) @ X
    Y.data = np.log1p(Y.data)
    return Y.tocsr()


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """All six presets, 3,000 cells, 2,000 genes, h5ad."""
    out = tmp_path_factory.mktemp("sim_small")
    info = simulate_atlas(out, 3000, seed=7, n_genes=SMALL_GENES, chunk_size=400)
    return out, info


@pytest.fixture(scope="module")
def full_genes_run(tmp_path_factory):
    """All six presets, 1,800 cells on the default gene space (all protein-coding genes)."""
    out = tmp_path_factory.mktemp("sim_full")
    info = simulate_atlas(out, 1800, seed=11)
    return out, info


# --- determinism and chunking ----------------------------------------------------------------


def test_same_seed_same_output_other_seed_differs(tmp_path):
    kw = dict(sources=["blood_a", "perturbation"], n_genes=SMALL_GENES)
    simulate_atlas(tmp_path / "a", 600, seed=1, **kw)
    simulate_atlas(tmp_path / "b", 600, seed=1, **kw)
    simulate_atlas(tmp_path / "c", 600, seed=2, **kw)
    for name in ("blood_a", "perturbation"):
        a, b, c = (_read(tmp_path / d / f"{name}.h5ad") for d in "abc")
        _assert_same(a, b)
        assert a.uns["simulation"]["seed"] == 1
        assert (a.X != c.X).nnz > 0  # another seed gives other counts


def test_chunked_output_equals_one_shot(tmp_path):
    # 2,600 cells cross two internal block boundaries; chunk sizes 1, 37 and 1000 cut blocks anywhere
    n = 2600
    simulate_atlas(tmp_path / "one", n, sources=["bone_marrow"], seed=5, n_genes=SMALL_GENES, chunk_size=10 * n)
    one = _read(tmp_path / "one" / "bone_marrow.h5ad")
    assert one.n_obs == n
    for cs in (37, 1000):
        simulate_atlas(tmp_path / f"c{cs}", n, sources=["bone_marrow"], seed=5, n_genes=SMALL_GENES, chunk_size=cs)
        _assert_same(one, _read(tmp_path / f"c{cs}" / "bone_marrow.h5ad"))
    # the chunk iterator itself: exact chunk sizes, rows identical to the one-shot matrix
    space = model.gene_space(SMALL_GENES, 5)
    src = model.compile_source(preset("bone_marrow"), space, 5, 0)
    chunks = list(iter_chunks(src, 1100, 1))
    assert [c.n for c in chunks] == [1] * 1100
    rows = sp.vstack([sp.csr_matrix((c.data, c.indices, c.indptr), shape=(1, space.n_genes)) for c in chunks])
    assert (rows != one.X[:1100]).nnz == 0


def test_thread_count_does_not_change_counts():
    import numba

    space = model.gene_space(SMALL_GENES, 3)
    src = model.compile_source(preset("blood_a"), space, 3, 0)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        a = model.generate_block(src, 0, 300)
        numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
        b = model.generate_block(src, 0, 300)
    finally:
        numba.set_num_threads(before)
    assert np.array_equal(a.indptr, b.indptr) and np.array_equal(a.indices, b.indices)
    assert np.array_equal(a.data, b.data)


# --- composition and metadata ------------------------------------------------------------------


def test_cells_split_by_weight_and_files_written(small_run):
    out, info = small_run
    specs = [preset(n) for n in PRESET_NAMES]
    expected = split_cells(3000, [s.weight for s in specs])
    assert sum(expected) == 3000
    got = {s["dataset_id"]: s["n_cells"] for s in info["sources"]}
    assert got == dict(zip(PRESET_NAMES, expected))
    w = np.array([s.weight for s in specs])
    assert np.allclose(np.array(expected) / 3000, w / w.sum(), atol=1 / 3000)
    for s in info["sources"]:
        a = _read(s["path"])
        assert a.n_obs == s["n_cells"] and a.n_vars == SMALL_GENES and a.X.nnz == s["nnz"]


def test_split_cells_weights_and_errors():
    assert split_cells(10, [1, 1, 2]) == [3, 2, 5]  # largest remainder, ties to the first source
    assert split_cells(3, [100, 1, 1]) == [1, 1, 1]
    assert split_cells(1000, [1, 3]) == [250, 750]
    with pytest.raises(AtlasmixError):
        split_cells(2, [1, 1, 1])


def test_obs_columns_and_constant_metadata(small_run):
    out, info = small_run
    for s in info["sources"]:
        a = _read(s["path"])
        spec = preset(s["dataset_id"])
        assert list(a.obs.columns) == OBS_COLUMNS
        assert a.obs.index.is_unique and a.obs.index.str.fullmatch(r"[ACGT]{16}-1").all()
        assert a.obs["is_malignant"].dtype == bool
        o = a.obs.astype({c: str for c in OBS_COLUMNS if c != "is_malignant"})
        assert (o["dataset_id"] == spec.name).all() and (o["organism"] == "Homo sapiens").all()
        assert (o["assay"] == spec.assay).all() and (o["tissue"] == spec.tissue).all()
        assert (o["tissue_general"] == spec.tissue_general).all() and (o["disease"] == spec.disease).all()
        assert set(o["donor_id"]) <= set(spec.donors()) and o["donor_id"].nunique() >= min(2, spec.n_donors)
        assert o["development_stage"].str.len().gt(0).all()
        # each donor has a single development stage
        assert (o.groupby("donor_id")["development_stage"].nunique() == 1).all()
        assert a.var.index.str.match(r"^ENSG\d{11}$").all() and list(a.var.columns) == ["feature_name"]
        assert a.uns["simulation"]["source"]["name"] == spec.name
        assert a.uns["simulation"]["n_cells"] == a.n_obs
    # barcodes are unique across the whole run too
    allbc = pd.Index(np.concatenate([_read(s["path"]).obs.index.to_numpy() for s in info["sources"]]))
    assert allbc.is_unique


def test_cell_type_composition_follows_spec(small_run):
    out, info = small_run
    for name in ("blood_a", "bone_marrow"):
        a = _read(out / f"{name}.h5ad")
        spec = preset(name)
        want = pd.Series(spec.cell_types, dtype=float)
        want = want[want > 0] / want[want > 0].sum()
        got = a.obs["cell_type"].astype(str).value_counts(normalize=True)
        assert set(got.index) <= set(want.index)
        n = a.n_obs
        for ct, p in want.items():  # within 4 binomial standard deviations
            assert abs(got.get(ct, 0.0) - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1e-9, (name, ct)
    # shared cell types between the two blood sources
    a = set(_read(out / "blood_a.h5ad").obs["cell_type"].astype(str))
    b = set(_read(out / "blood_b.h5ad").obs["cell_type"].astype(str))
    assert len(a & b) >= 8


def test_malignant_source(small_run):
    out, _ = small_run
    a = _read(out / "malignant.h5ad")
    spec = preset("malignant")
    mal = a.obs["is_malignant"].to_numpy()
    n = len(mal)
    assert abs(mal.mean() - spec.malignant_fraction) < 4 * np.sqrt(0.24 / n)
    assert (a.obs.loc[mal, "cell_type"].astype(str) == spec.malignant_lineage).all()
    assert (a.obs["perturbation"].astype(str) == "none").all()
    # tumour cells are shifted versions of their lineage: closer to normal B cells than to T cells,
    # yet clearly different from normal B cells
    Y = _cp10k_log1p(a.X)
    ct = a.obs["cell_type"].astype(str).to_numpy()
    centroid = lambda m: np.asarray(Y[m].mean(0)).ravel()  # noqa: E731
    tum, normal_b = centroid(mal), centroid(~mal & (ct == "B cell"))
    t_cells = centroid(ct == "CD4-positive, alpha-beta T cell")
    d_b, d_t = np.linalg.norm(tum - normal_b), np.linalg.norm(tum - t_cells)
    assert d_b < d_t
    assert d_b > 0.2 * d_t
    for other in ("blood_a", "blood_b", "bone_marrow", "tf_atlas"):
        assert not _read(out / f"{other}.h5ad").obs["is_malignant"].any()


def test_perturbation_source_knocks_down_its_target(small_run):
    out, _ = small_run
    a = _read(out / "perturbation.h5ad")
    pert = a.obs["perturbation"].astype(str)
    assert (a.obs["cell_type"].astype(str) == "K562 cell").all()
    assert a.obs["is_malignant"].all()  # K562 is a leukaemia line
    ctrl = (pert == "control").to_numpy()
    assert 0.04 < ctrl.mean() < 0.2
    targets = sorted(set(pert) - {"control"})
    assert len(targets) >= 50
    sym = a.var["feature_name"].to_numpy()
    assert set(targets) <= set(sym)
    Y = _cp10k_log1p(a.X).tocsc()
    lower = 0
    tested = 0
    for t in targets:
        cells = (pert == t).to_numpy()
        if cells.sum() < 5:
            continue
        j = int(np.flatnonzero(sym == t)[0])
        col = Y[:, j].toarray().ravel()
        tested += 1
        lower += col[cells].mean() < col[ctrl].mean()
    assert tested >= 20 and lower / tested > 0.9


def test_tf_atlas_source(small_run):
    out, _ = small_run
    a = _read(out / "tf_atlas.h5ad")
    pert = a.obs["perturbation"].astype(str).to_numpy()
    ct = a.obs["cell_type"].astype(str).to_numpy()
    assert (ct[pert == "control"] == "embryonic stem cell").all()
    assert {"neuron", "endodermal cell", "embryonic stem cell"} <= set(ct)
    # the over-expressed TF is much higher in its cells than in control cells
    sym = a.var["feature_name"].to_numpy()
    Y = _cp10k_log1p(a.X).tocsc()
    for tf in ("NEUROG2", "SOX17", "MYOD1"):
        j = int(np.flatnonzero(sym == tf)[0])
        col = Y[:, j].toarray().ravel()
        assert col[pert == tf].mean() > col[pert == "control"].mean() + 1.0


# --- counts -------------------------------------------------------------------------------------


def test_counts_are_nonnegative_integers_in_csr(small_run):
    out, info = small_run
    for s in info["sources"]:
        a = _read(s["path"])
        X = a.X
        assert sp.issparse(X) and X.format == "csr" and X.dtype == np.float32
        assert X.has_sorted_indices
        assert (X.data > 0).all() and np.array_equal(X.data, np.round(X.data))
        assert (np.diff(X.indptr) > 0).all()  # no empty cell


def test_full_gene_space_sparsity_library_and_mito(full_genes_run):
    """Documented ranges on the default ~20k-gene space (see README / module docs)."""
    out, info = full_genes_run
    for s in info["sources"]:
        a = _read(s["path"])
        assert a.n_vars == 19907
        X = a.X
        lib = np.asarray(X.sum(1)).ravel()
        genes = np.diff(X.indptr)
        mt = a.var["feature_name"].str.startswith("MT-").to_numpy()
        assert mt.sum() == 13
        mito = np.asarray(X[:, mt].sum(1)).ravel() / lib
        name = s["dataset_id"]
        assert 3000 <= np.median(lib) <= 10000, name
        assert np.percentile(lib, 5) >= 1000 and np.percentile(lib, 95) <= 20000, name
        assert 1000 <= np.median(genes) <= 2500, name
        assert np.percentile(genes, 5) >= 500 and np.percentile(genes, 95) <= 4000, name
        assert genes.max() < 0.3 * a.n_vars  # sparse: < 30% of genes detected in any cell
        assert 0.02 <= np.median(mito) <= 0.08, name
        assert (mito > 0).mean() > 0.99
        # more UMIs -> more detected genes (library size drives sparsity, as in real data)
        assert np.corrcoef(np.log(lib), np.log(genes))[0, 1] > 0.7
    # mean-variance: over-dispersed relative to Poisson for expressed genes in one cell type
    a = _read(out / "blood_a.h5ad")
    m = (a.obs["cell_type"].astype(str) == "classical monocyte").to_numpy()
    Xm = a.X[m]
    lib = np.asarray(Xm.sum(1)).ravel()
    Y = sp.diags(np.median(lib) / lib) @ Xm
    mean = np.asarray(Y.mean(0)).ravel()
    var = np.asarray(Y.multiply(Y).mean(0)).ravel() - mean ** 2
    sel = mean > 1
    assert sel.sum() > 50 and np.median(var[sel] / mean[sel]) > 1.2


def test_classifier_separates_cell_types(small_run):
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    out, _ = small_run
    for name in ("blood_a", "bone_marrow"):
        a = _read(out / f"{name}.h5ad")
        y = a.obs["cell_type"].astype(str).to_numpy()
        keep = pd.Series(y).map(pd.Series(y).value_counts()).to_numpy() >= 10  # cv needs >= 5 per class
        Z = PCA(30, random_state=0).fit_transform(_cp10k_log1p(a.X[keep]).toarray())
        acc = cross_val_score(LogisticRegression(max_iter=2000), Z, y[keep], cv=5).mean()
        chance = pd.Series(y[keep]).value_counts(normalize=True).max()
        assert acc > 0.85 and acc > chance + 0.4, (name, acc, chance)


def test_shared_cell_types_transfer_across_blood_sources(small_run):
    """A classifier trained on blood_a labels blood_b (batch effects do not erase biology)."""
    from sklearn.linear_model import LogisticRegression

    out, _ = small_run
    a, b = _read(out / "blood_a.h5ad"), _read(out / "blood_b.h5ad")
    ya, yb = a.obs["cell_type"].astype(str).to_numpy(), b.obs["cell_type"].astype(str).to_numpy()
    # marker-level features: log CP10k of the 300 most variable genes of blood_a
    Xa, Xb = _cp10k_log1p(a.X).toarray(), _cp10k_log1p(b.X).toarray()
    top = np.argsort(-Xa.var(0))[:300]
    clf = LogisticRegression(max_iter=3000).fit(Xa[:, top], ya)
    acc = (clf.predict(Xb[:, top]) == yb).mean()
    assert acc > 0.7, acc


def test_markers_are_expressed_in_their_cell_type(small_run):
    out, _ = small_run
    a = _read(out / "blood_a.h5ad")
    Y = _cp10k_log1p(a.X).tocsc()
    sym = a.var["feature_name"].to_numpy()
    ct = a.obs["cell_type"].astype(str).to_numpy()
    for gene, cell_type in (("CD3E", "CD4-positive, alpha-beta T cell"), ("CD14", "classical monocyte"),
                            ("MS4A1", "B cell"), ("NKG7", "natural killer cell")):
        col = Y[:, int(np.flatnonzero(sym == gene)[0])].toarray().ravel()
        inside, outside = col[ct == cell_type].mean(), col[ct != cell_type].mean()
        assert inside > 3 * outside + 0.1, (gene, inside, outside)


# --- formats and plan ------------------------------------------------------------------------------


def test_zarr_and_mex_equal_h5ad(tmp_path):
    kw = dict(sources=["blood_b", "tf_atlas"], seed=9, n_genes=SMALL_GENES, chunk_size=250)
    for fmt in ("h5ad", "zarr", "mex"):
        simulate_atlas(tmp_path / fmt, 900, fmt=fmt, **kw)
    for name in ("blood_b", "tf_atlas"):
        h = _read(tmp_path / "h5ad" / f"{name}.h5ad")
        _assert_same(h, _read(tmp_path / "zarr" / f"{name}.zarr"))
        d = tmp_path / "mex" / name
        m = scipy.io.mmread(str(d / "matrix.mtx.gz")).T.tocsr()  # genes x cells on disk
        assert m.shape == h.shape and (m != h.X).nnz == 0
        with gzip.open(d / "features.tsv.gz", "rt") as fh:
            feats = pd.read_csv(fh, sep="\t", header=None)
        assert list(feats[0]) == list(h.var.index) and list(feats[1]) == list(h.var["feature_name"])
        assert (feats[2] == "Gene Expression").all()
        with gzip.open(d / "barcodes.tsv.gz", "rt") as fh:
            assert fh.read().split() == list(h.obs.index)
        side = pd.read_csv(d / "obs.csv.gz", index_col=0)
        assert list(side.index) == list(h.obs.index)
        assert (side["cell_type"] == h.obs["cell_type"].astype(str).to_numpy()).all()
    plan = tomllib.loads((tmp_path / "mex" / "plan.toml").read_text())
    assert [d["obs_table"] for d in plan["dataset"]] == ["blood_b/obs.csv.gz", "tf_atlas/obs.csv.gz"]


def test_plan_toml(small_run):
    out, info = small_run
    plan = tomllib.loads((out / "plan.toml").read_text())
    entries = plan["dataset"]
    assert [e["dataset_id"] for e in entries] == list(PRESET_NAMES)
    for e in entries:
        assert set(e) == {"dataset_id", "source", "organism", "title", "set"}
        assert e["source"] == f"{e['dataset_id']}.h5ad" and (out / e["source"]).exists()
        assert e["organism"] == "human" and e["title"]
        spec = preset(e["dataset_id"])
        assert e["set"]["assay"] == spec.assay and e["set"]["tissue_general"] == spec.tissue_general
    try:  # the plan entries are valid ingest requests
        from atlasmix.ingest.ingest import DatasetRequest
    except ImportError:  # pragma: no cover - ingest not installed
        return
    for e in entries:
        DatasetRequest(**e)


# --- API, CLI and errors ---------------------------------------------------------------------------


def test_custom_source_spec_and_weights(tmp_path):
    spec = SourceSpec("my_nk", "healthy", "NK only", weight=3.0, cell_types={"natural killer cell": 1.0},
                      n_donors=2, library_median=4000)
    info = simulate_atlas(tmp_path, 400, sources=[spec, "blood_b"], n_genes=SMALL_GENES, seed=0)
    assert [s["n_cells"] for s in info["sources"]] == [300, 100]
    a = _read(tmp_path / "my_nk.h5ad")
    assert (a.obs["cell_type"].astype(str) == "natural killer cell").all()
    assert set(a.obs["donor_id"].astype(str)) <= {"my_nk_donor1", "my_nk_donor2"}


@pytest.mark.parametrize("kwargs, match", [
    (dict(sources="nope"), "unknown source"),
    (dict(sources="blood_a,blood_a"), "twice"),
    (dict(sources="blood_a:0"), "weight"),
    (dict(fmt="loom"), "format"),
    (dict(n_genes=10), "n_genes"),
    (dict(chunk_size=0), "chunk"),
    (dict(sources=[SourceSpec("x", "healthy", cell_types={"unicorn": 1.0})]), "unknown cell type"),
])
def test_bad_arguments_raise_atlasmix_error(tmp_path, kwargs, match):
    kw = dict(n_cells=10, n_genes=SMALL_GENES) | kwargs
    with pytest.raises(AtlasmixError, match=match):
        simulate_atlas(tmp_path, **kw)


def test_cli_simulate(tmp_path):
    import typer
    from typer.testing import CliRunner

    from atlasmix.simulate.cli import register

    app = typer.Typer()
    register(app)

    @app.command("noop")  # a second command so typer keeps the sub-command name
    def _noop() -> None:
        pass

    r = CliRunner().invoke(app, ["simulate", str(tmp_path), "--cells", "1_200", "--sources",
                                 "blood_a,malignant:2", "--seed", "4", "--genes", "1000", "--format", "zarr",
                                 "--quiet"])
    assert r.exit_code == 0, r.output
    plan = tomllib.loads((tmp_path / "plan.toml").read_text())
    assert [d["source"] for d in plan["dataset"]] == ["blood_a.zarr", "malignant.zarr"]
    assert _read(tmp_path / "malignant.zarr").n_obs == 800
    r = CliRunner().invoke(app, ["simulate", str(tmp_path), "--cells", "100", "--sources", "bogus"])
    assert isinstance(r.exception, AtlasmixError)
    r = CliRunner().invoke(app, ["simulate", str(tmp_path), "--cells", "lots"])
    assert isinstance(r.exception, AtlasmixError)


def test_dropout_removes_counts_and_keeps_the_rest(tmp_path):
    """Splatter's logistic dropout zeroes drawn counts (mostly of low-mean genes) and changes nothing else."""
    base = preset("blood_b")
    drop = preset("blood_b", dropout_mid=0.0, dropout_shape=-1.0)
    simulate_atlas(tmp_path / "a", 300, sources=[base], n_genes=SMALL_GENES, seed=2)
    simulate_atlas(tmp_path / "b", 300, sources=[drop], n_genes=SMALL_GENES, seed=2)
    a, b = _read(tmp_path / "a" / "blood_b.h5ad"), _read(tmp_path / "b" / "blood_b.h5ad")
    assert b.X.nnz < 0.9 * a.X.nnz
    kept = b.X.astype(bool)
    assert (a.X.multiply(kept) != b.X).nnz == 0  # surviving entries are unchanged
    removed = a.X - a.X.multiply(kept)
    assert removed.data.mean() < a.X.data.mean()  # low counts are dropped preferentially


def test_gene_space_beyond_protein_coding():
    space = model.gene_space(21000, 0)
    assert space.n_genes == 21000 and space.var.index.is_unique
    assert space.var["feature_name"].str.startswith("MT-").sum() == 13
    small = model.gene_space(600, 0)
    assert small.n_genes == 600 and (small.base_mean > 0).sum() == 600 - 13  # MT genes are drawn apart
    assert small.var["feature_name"].isin(["CD3E", "CD14", "MS4A1", "POU5F1", "MT-CO1"]).sum() == 5
