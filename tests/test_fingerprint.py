"""Cell count fingerprints: the same cells stored twice (another id / format) are found at ingest
and refused as held-out cells of a model that trained on their copies."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from atlasmix.store.fingerprint import MIN_GENES, cell_fingerprints, duplicates_within, gene_hashes

from conftest import needs_shared


def _fp(m: sp.csr_matrix, genes) -> np.ndarray:
    m = sp.csr_matrix(m)
    return cell_fingerprints(m.indptr, m.indices, m.data, gene_hashes(genes))


def test_fingerprints_depend_on_counts_per_gene_only():
    rng = np.random.default_rng(0)
    G = 300
    genes = [f"ENSG{i:011d}" for i in range(G)]
    X = sp.random(40, G, density=0.3, format="csr", random_state=rng,
                  data_rvs=lambda k: rng.integers(1, 50, k).astype(np.float32))
    f = _fp(X, genes)
    assert f.dtype == np.int64 and (f != 0).all() and len(np.unique(f)) == 40
    # the same cells over a permuted gene axis (another source's gene order), as float64: same
    perm = rng.permutation(G)
    assert np.array_equal(_fp(X[:, perm].astype(np.float64), [genes[p] for p in perm]), f)
    # explicit zeros and unsorted columns within a row change nothing
    Y = X.copy()
    Y.data[::5] = 0
    Yc = Y.copy()
    Yc.eliminate_zeros()
    assert np.array_equal(_fp(Y, genes), _fp(Yc, genes)) and not np.array_equal(_fp(Yc, genes), f)
    U = X.copy()
    a, b = U.indptr[2], U.indptr[3]
    U.indices[a:b], U.data[a:b] = U.indices[a:b][::-1].copy(), U.data[a:b][::-1].copy()
    assert np.array_equal(_fp(U, genes), f)
    # one count one higher, or the same counts on other genes: another fingerprint
    V = X.copy()
    V.data[X.indptr[7]] += 1
    g = _fp(V, genes)
    assert g[7] != f[7] and np.array_equal(np.delete(g, 7), np.delete(f, 7))
    assert not np.isin(_fp(X, genes[1:] + genes[:1]), f).any()
    # columns left out with keep (source genes mapping to no Ensembl id) count as absent
    keep = np.ones(G, bool)
    keep[::3] = False
    h = gene_hashes(genes)
    assert np.array_equal(cell_fingerprints(X.indptr, X.indices, X.data, h, keep=keep),
                          _fp(X[:, keep], [g for g, k in zip(genes, keep) if k]))
    # a repeated cell is a duplicate within the matrix
    assert duplicates_within(_fp(sp.vstack([X, X[[3, 9]]]), genes)) == 2
    # cells with fewer than MIN_GENES nonzero genes are not fingerprinted (0)
    W = sp.csr_matrix((np.ones(MIN_GENES - 1, np.float32), np.arange(MIN_GENES - 1), [0, MIN_GENES - 1]),
                      shape=(1, G))
    assert _fp(W, genes).tolist() == [0] and duplicates_within(np.zeros(5, np.int64)) == 0


@needs_shared
def test_stored_fingerprints_equal_a_recount_from_X_and_flag_only_the_mex_copy(shared_store):
    store, _, reports = shared_store
    # the plan ingests pbmc3k_mex (the same 10x cells as pbmc3k, another format): every cell flagged
    assert reports["pbmc3k_mex"]["duplicate_cells"]["by_dataset"] == {"pbmc3k": 2638}
    flagged = {d: r["duplicate_cells"]["by_dataset"] for d, r in reports.items() if r["duplicate_cells"]["by_dataset"]}
    assert flagged == {"pbmc3k_mex": {"pbmc3k": 2638}}, flagged  # 11 other real datasets: no false copies
    cat = store.catalog().set_index("dataset_id")
    prov = json.loads(cat.loc["pbmc3k_mex", "provenance"])
    assert prov["duplicate_cells"]["by_dataset"] == {"pbmc3k": 2638}
    # the stored fingerprints are those of the stored X over the store's gene ids, whether ingest
    # hashed the source's columns (no two genes mapping to one id) or summed them first (some do)
    summed = {d for d, r in reports.items() if r["gene_mapping"]["n_duplicates"]}
    assert {"kang_ifnb", "pisces_pbmc1k"} <= summed and not {"pbmc3k", "baron_mouse"} & summed
    var = store.var()
    h = gene_hashes(var["feature_id"].to_numpy())
    by_id = store.catalog()
    for did in ("kang_ifnb", "pisces_pbmc1k", "pbmc3k", "baron_mouse"):
        jid = int(by_id.index[by_id["dataset_id"] == did][0])
        s, e = int(cat.loc[did, "obs_joinid_start"]), int(cat.loc[did, "obs_joinid_end"])
        ids, X = next(store.iter_X(np.arange(s, e), None, chunk_size=e - s))
        want = cell_fingerprints(X.indptr, X.indices, X.data, h)
        got = store.x_fingerprints(jid)
        assert len(got) == e - s and np.array_equal(got, want), did
        assert (got != 0).mean() > 0.95


@needs_shared
def test_eval_set_of_copies_of_training_cells_is_refused(shared_store):
    from atlasmix.errors import AtlasmixError
    from atlasmix.evaluation.overlap import check_overlap

    store, _, _ = shared_store
    cat = store.catalog().set_index("dataset_id")

    def cells(did):
        return np.arange(int(cat.loc[did, "obs_joinid_start"]), int(cat.loc[did, "obs_joinid_end"]))

    ident = store.identity()
    train = np.concatenate([cells("pbmc3k")[:2000], cells("pisces_pbmc1k")])
    model = SimpleNamespace(name="m", training_cells=lambda: (train, {"store": ident, "manifest": "x.parquet"}))

    def evalset(name, ids):
        return SimpleNamespace(name=name, kind="store", store=store, joinids=ids, n_cells=len(ids),
                               obs=pd.DataFrame({"soma_joinid": ids}))

    # the mex copies of the 2,000 training cells of pbmc3k: different soma_joinids, same cells
    with pytest.raises(AtlasmixError, match=r"2,000 of its 2,638 cells have the same counts on every gene .*pbmc3k "):
        check_overlap(model, evalset("mex", cells("pbmc3k_mex")), store)
    # the 638 held-out pbmc3k cells, through either copy, are fine; so is another dataset
    held = check_overlap(model, evalset("mex_rest", cells("pbmc3k_mex")[2000:]), store)
    assert held["checked"] and "fingerprints" in held["how"] and "not checked" not in held["how"]
    assert check_overlap(model, evalset("kang", cells("kang_ifnb")), store)["checked"]


@needs_shared
def test_stores_and_datasets_from_before_fingerprints_keep_working(tmp_path):
    import anndata as ad
    import tiledbsoma as soma

    from atlasmix.ingest import DatasetRequest, ingest
    from atlasmix.store import Store
    from atlasmix.store.fingerprint import shared_cells

    from conftest import SHARED

    a = ad.read_h5ad(SHARED / "pbmc3k_hvg2000.h5ad")[:300].copy()
    a.write_h5ad(tmp_path / "a.h5ad")
    st = Store.create(str(tmp_path / "s"))
    with soma.open(f"{st.uri}/atlasmix", "w") as am:  # a store made before fingerprints existed
        del am["x_fingerprints"]
    shutil.rmtree(tmp_path / "s" / "atlasmix" / "x_fingerprints")
    ingest(st, [DatasetRequest(dataset_id="a", source=str(tmp_path / "a.h5ad"))])
    assert (st.x_fingerprints(0) != 0).all()  # the collection is made on the first write
    with soma.open(f"{st.uri}/atlasmix/x_fingerprints", "w") as coll:  # a dataset ingested before
        del coll["d0"]
    shutil.rmtree(tmp_path / "s" / "atlasmix" / "x_fingerprints" / "d0")
    assert st.x_fingerprints(0) is None
    dup = ingest(st, [DatasetRequest(dataset_id="b", source=str(tmp_path / "a.h5ad"))])[0]["duplicate_cells"]
    assert dup["by_dataset"] == {} and dup["unchecked_datasets"] == ["a"]
    out = shared_cells(st, np.arange(300, 600), np.arange(300))
    assert out["n_shared"] == 0 and out["unchecked"] == ["a"]
    # with both fingerprinted, the copy is found
    st.write_x_fingerprints(0, 0, st.x_fingerprints(1))
    assert shared_cells(st, np.arange(300, 600), np.arange(150))["n_shared"] == 150


@needs_shared
def test_mixture_resolution_reports_copies_in_training_and_of_eval_cells(shared_store):
    from atlasmix.mixing import loads_spec, resolve

    store, _, _ = shared_store
    both = resolve(loads_spec('name = "both"\nseed = 1\n[[components]]\nname = "pbmc"\n'
                              "where = \"dataset_id IN ('pbmc3k', 'pbmc3k_mex', 'kang_ifnb')\"\n"), store)
    cp = both.disjointness["copies"]
    assert cp["n_train_validation_repeats"] == 2638 and cp["n_eval_cells_copied_in_training"] == 0
    assert cp["unchecked_datasets"] == []
    assert "2,638 training / validation cells repeat" in both.disjointness["statement"]
    # eval cells from pbmc3k, training on its mex copy: every eval cell has its copy in training
    leak = resolve(loads_spec('name = "leak"\nseed = 1\n[[components]]\nname = "mex"\n'
                              "where = \"dataset_id = 'pbmc3k_mex'\"\n"
                              "[eval_sets.held]\nwhere = \"dataset_id = 'pbmc3k'\"\nn_cells = 300\n"), store)
    cp = leak.disjointness["copies"]
    assert cp["n_eval_cells_copied_in_training"] == 300 and cp["copied_from"] == {"pbmc3k_mex": 300}
    assert leak.disjointness["disjoint"] and "the evaluation will refuse them" in leak.disjointness["statement"]
    # no copies: nothing to say
    clean = resolve(loads_spec('name = "clean"\nseed = 1\n[[components]]\nname = "k"\n'
                               "where = \"dataset_id = 'kang_ifnb'\"\n"), store)
    assert clean.disjointness["copies"]["n_train_validation_repeats"] == 0 and "Warning" not in clean.disjointness["statement"]
