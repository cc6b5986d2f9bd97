"""scBERT and scFoundation inputs and RDA downsampling from the store's CSR batches: equality with a
direct per-cell computation on real cells (the ../shared/data store when present, else its simulated
stand-in), published gene-list formats, and the statistics and determinism of RDA."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from atlasmix.errors import AtlasmixError
from atlasmix.training.gene_lists import model_axis, read_gene_list
from atlasmix.training.rda import ReadDepthAugment, downsample
from atlasmix.training.scbert.encoding import ScBERTEncoder, scbert_tokens, scbert_tokens_reference
from atlasmix.training.scfoundation.encoding import (ScFoundationEncoder, pad_packed, scfoundation_input,
                                                     scfoundation_input_reference)


@pytest.fixture(scope="module")
def setup(lake, tmp_path_factory):
    """(store, cells, gene list): 500 cells of the first three datasets; a model gene axis in the
    published formats' spirit: 80 % of the store's symbols in shuffled order, a few Ensembl ids, and
    genes the store lacks (zero positions)."""
    store, names = lake
    obs = store.obs(["dataset_id"]).to_pandas()
    cells = np.sort(obs[obs["dataset_id"].isin(list(names[:3]))]["soma_joinid"].to_numpy())
    cells = np.sort(np.random.default_rng(0).choice(cells, min(500, len(cells)), replace=False))
    var = store.var()
    sym = sorted(set(var["feature_name"].astype(str)))
    rng = np.random.default_rng(2)
    genes = [s for s in sym if rng.random() < 0.8]
    genes = list(rng.permutation(genes)) + ["NOT_A_GENE_1", "NOT_A_GENE_2"]
    chosen = set(genes)
    genes += [f for f, s in zip(var["feature_id"].astype(str), var["feature_name"].astype(str))
              if s not in chosen][:5]
    return store, cells, genes


def _csr_batches(store, cells, axis, batch_size=128):
    from atlasmix.training.loader import MixtureLoader

    L = MixtureLoader(store, cells, var_joinids=axis["var_joinids"], batch_size=batch_size, io_batch_size=512,
                      shuffle=False, obs_columns=(), sparse=True)
    for b in L:
        X = b["X"]
        yield b, sp.csr_matrix((X.values().numpy(), X.col_indices().numpy(), X.crow_indices().numpy()),
                               shape=tuple(X.shape))


def test_gene_list_files_in_the_published_formats(setup, tmp_path):
    _, _, genes = setup
    (tmp_path / "g.tsv").write_text("gene_name\tindex\n" + "".join(f"{g}\t{i}\n" for i, g in enumerate(genes)))
    (tmp_path / "g.txt").write_text("\n".join(genes) + "\n")
    (tmp_path / "g.csv").write_text("id,symbol\n" + "".join(f"{i},{g}\n" for i, g in enumerate(genes)))
    import anndata as ad

    ad.AnnData(X=sp.csr_matrix((2, len(genes)), dtype=np.float32), var=pd.DataFrame(index=genes)).write_h5ad(
        tmp_path / "g.h5ad")
    for f in ("g.tsv", "g.txt", "g.csv", "g.h5ad"):
        assert read_gene_list(tmp_path / f) == genes, f
    (tmp_path / "dup.txt").write_text("A\nB\nA\n")
    (tmp_path / "cols.tsv").write_text("a\tb\n1\t2\n")
    (tmp_path / "empty.txt").write_text("\n")
    for f, msg in (("dup.txt", "twice"), ("cols.tsv", "no gene column"), ("empty.txt", "empty|not readable"),
                   ("missing.tsv", "not found")):
        with pytest.raises(AtlasmixError, match=msg):
            read_gene_list(tmp_path / f)
    with pytest.raises(AtlasmixError, match="no column 'x'"):
        read_gene_list(tmp_path / "g.tsv", column="x")


def test_model_axis_maps_symbols_and_ensembl_ids(setup):
    store, _, genes = setup
    axis = model_axis(store, genes)
    var = store.var()
    assert axis["n_genes"] == len(genes) and (np.diff(axis["var_joinids"]) > 0).all()
    for j, p in zip(axis["var_joinids"], axis["position"]):
        g = genes[p]
        assert var.loc[j, "feature_id" if g.startswith("ENS") else "feature_name"] == g
    assert not {len(genes) - 7, len(genes) - 6} & set(axis["position"].tolist())  # NOT_A_GENE_*
    assert axis["matched"] >= 0.7 * len(genes)
    with pytest.raises(AtlasmixError, match="no gene"):
        model_axis(store, ["NOT_A_GENE"])


def test_scbert_tokens_equal_the_direct_computation_on_real_cells(setup):
    store, cells, genes = setup
    axis = model_axis(store, genes)
    n, seen = 0, np.zeros(6, dtype=np.int64)
    enc = ScBERTEncoder(axis, threads=2)
    for b, csr in _csr_batches(store, cells, axis):
        got = enc(b)["tokens"].numpy()
        want = scbert_tokens_reference(csr, axis["position"], len(genes))
        assert got.dtype == np.uint8 and got.shape == (csr.shape[0], len(genes) + 1)
        np.testing.assert_array_equal(got.astype(np.int64), want)
        np.testing.assert_array_equal(scbert_tokens(csr.indptr, csr.indices, csr.data, axis["position"], len(genes)),
                                      got)  # one thread == two threads
        # the definition once more, by hand, for one cell: log2(1 + CP10k over the axis), floor, cap 5
        row = csr[0].toarray().ravel().astype(np.float64)
        full = np.zeros(len(genes))
        full[axis["position"]] = row
        direct = np.minimum(np.floor(np.log2(1 + full / full.sum() * 1e4)), 5)
        assert np.abs(got[0, :-1] - direct).max() == 0 and got[0, -1] == 0
        seen += np.bincount(got[:, :-1].ravel(), minlength=6)[:6]
        n += csr.shape[0]
    assert n == len(cells) and (seen > 0).all()  # every token 0..5 occurs on real cells


@pytest.mark.parametrize("tgthighres", ["t4", "f1", "a0.5"])
def test_scfoundation_input_equals_the_direct_computation_on_real_cells(setup, tgthighres):
    store, cells, genes = setup
    axis = model_axis(store, genes)
    G = len(genes)
    enc = ScFoundationEncoder(axis, tgthighres=tgthighres, threads=2, dense=True)
    n = 0
    for b, csr in _csr_batches(store, cells, axis):
        got = enc(b)
        ref = scfoundation_input_reference(csr, axis["position"], G, tgthighres=tgthighres)
        dense = got["dense"].numpy()
        np.testing.assert_array_equal(dense, np.array(ref["dense"], dtype=np.float32))
        vals, ids, pad = got["values"].numpy(), got["gene_ids"].numpy(), got["padding"].numpy()
        assert vals.shape[1] == max(len(v) for v in ref["values"])
        for i in range(csr.shape[0]):
            k = int((~pad[i]).sum())
            assert k == len(ref["values"][i]) and not pad[i, :k].any() and (ids[i, k:] == G + 2).all()
            o = np.argsort(ids[i, :k])
            np.testing.assert_array_equal(ids[i, :k][o], ref["gene_ids"][i])
            np.testing.assert_array_equal(vals[i, :k][o], ref["values"][i].astype(np.float32))
            total = float(csr[i].sum(dtype=np.float64))
            assert vals[i, k - 1] == np.float32(np.log10(total))  # S, then T before it
            t = {"t4": 4.0, "f1": np.log10(total), "a0.5": np.log10(total) + 0.5}[tgthighres]
            assert vals[i, k - 2] == np.float32(t) and ids[i, k - 2] == G and ids[i, k - 1] == G + 1
        # the packed form holds the same tokens; padded on "the device" it is the padded form
        pk = scfoundation_input(csr.indptr, csr.indices, csr.data, axis["position"], G, tgthighres=tgthighres,
                                layout="packed")
        assert pk["offsets"][-1] == len(pk["values"]) == int((~pad).sum())
        back = pad_packed(*(torch.from_numpy(pk[k]) for k in ("values", "gene_ids", "offsets")), G)
        for k in ("values", "gene_ids", "padding"):
            np.testing.assert_array_equal(back[k].numpy(), got[k].numpy())
        n += csr.shape[0]
    assert n == len(cells)


def test_rda_downsamples_binomially_and_reproducibly_on_real_cells(setup):
    store, cells, genes = setup
    axis = model_axis(store, genes)
    ratios, whole = [], 0
    aug = ReadDepthAugment(p=0.5, min_total=500, seed=3)
    for b, csr in _csr_batches(store, cells, axis, batch_size=256):
        out = aug(b)
        X = out["X"]
        new = sp.csr_matrix((X.values().numpy(), X.col_indices().numpy(), X.crow_indices().numpy()),
                            shape=tuple(X.shape))
        orig = out["original_total"].numpy()
        tot = np.asarray(csr.sum(axis=1, dtype=np.float64)).ravel()
        ntot = np.asarray(new.sum(axis=1, dtype=np.float64)).ravel()
        assert (new.data > 0).all() and (new.data == np.rint(new.data)).all()
        assert ((new - csr).toarray() <= 0).all()  # a count never grows; zeros stay zero
        down = orig >= 0
        np.testing.assert_array_equal(ntot[~down], tot[~down])  # cells left whole are unchanged
        assert (tot[down] >= 500).all() and np.array_equal(orig[down], tot[down])
        assert (ntot[down] > 0).all()
        np.testing.assert_allclose(out["library_size"].numpy().ravel()[down],
                                   (b["library_size"].numpy().ravel() * ntot / tot)[down], rtol=1e-5)
        ratios += (ntot[down] / tot[down]).tolist()
        whole += int((~down).sum())
        again = ReadDepthAugment(p=0.5, min_total=500, seed=3)(b)  # same seed, epoch, cells -> same draws
        assert torch_equal_csr(again["X"], X)
        aug.set_epoch(1)
        assert not torch_equal_csr(aug(b)["X"], X)
        aug.set_epoch(0)
        enc = ScFoundationEncoder(axis)(out)  # T = the original depth, S = the downsampled one
        vals, pad = enc["values"].numpy(), enc["padding"].numpy()
        for i in np.flatnonzero(down)[:20]:
            k = int((~pad[i]).sum())
            assert vals[i, k - 2] == np.float32(np.log10(tot[i])) and vals[i, k - 1] == np.float32(np.log10(ntot[i]))
    r = np.array(ratios)
    # gamma ~ Beta(2, 2) (mean 1/2, sd 0.22): the kept fraction of a deep cell is gamma up to binomial noise
    assert len(r) > 100 and whole > 100 and abs(r.mean() - 0.5) < 0.06 and 0.15 < r.std() < 0.3


def torch_equal_csr(a, b) -> bool:
    return all(np.array_equal(x.numpy(), y.numpy()) for x, y in ((a.crow_indices(), b.crow_indices()),
                                                                 (a.col_indices(), b.col_indices()),
                                                                 (a.values(), b.values())))


def test_rda_edges_and_bad_input():
    indptr, indices = np.array([0, 2, 3, 3]), np.array([0, 1, 1])
    data = np.array([1.0, 1.0, 5000.0], dtype=np.float32)
    ip, ix, d, orig = downsample(indptr, indices, data, np.array([7, 8, 9]), p=0.0)
    assert np.array_equal(ip, indptr) and np.array_equal(d, data) and (orig == -1).all()
    ip, ix, d, orig = downsample(indptr, indices, data, np.array([7, 8, 9]), p=1.0, min_total=0)
    assert orig[1] == 5000 and 0 < d[-1] < 5000 and d.dtype == np.float32 and ip[-1] == ip[-2]
    with pytest.raises(AtlasmixError, match="whole numbers"):
        downsample(indptr, indices, data + 0.5, np.array([1, 2, 3]))
    with pytest.raises(AtlasmixError, match="Beta"):
        ReadDepthAugment(p=1.5)
