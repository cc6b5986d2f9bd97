"""scGPT value binning from the store's CSR batches: parity with scGPT's definition on real cells
(the ../shared/data store when present, else its simulated stand-in), determinism, vocabulary files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp

from atlasmix.errors import AtlasmixError
from atlasmix.training.scgpt.encoding import (CLS, PAD, ScGPTEncoder, bin_and_tokenize, bin_and_tokenize_reference,
                                              load_vocab, vocabulary_axis)


@pytest.fixture(scope="module")
def setup(lake, tmp_path_factory):
    """(store, cells, vocab file): 600 blood cells; a vocabulary file in scGPT's format (symbol -> id)
    over 70 % of the store's symbols in shuffled ids, plus symbols the store lacks."""
    store, names = lake
    obs = store.obs(["dataset_id"]).to_pandas()
    cells = np.sort(obs[obs["dataset_id"].isin(list(names[:3]))]["soma_joinid"].to_numpy())
    cells = np.sort(np.random.default_rng(0).choice(cells, min(600, len(cells)), replace=False))
    sym = sorted(set(store.var()["feature_name"].astype(str)))
    rng = np.random.default_rng(1)
    kept = [s for s in sym if rng.random() < 0.7] + ["NOT_A_GENE_1", "NOT_A_GENE_2"]
    ids = rng.permutation(len(kept)) + 5
    path = tmp_path_factory.mktemp("scgpt") / "vocab.json"
    path.write_text(json.dumps({s: int(i) for s, i in zip(kept, ids)}))
    return store, cells, path


def _batches(store, cells, axis, batch_size=128):
    from atlasmix.training.loader import MixtureLoader

    L = MixtureLoader(store, cells, var_joinids=axis["var_joinids"], batch_size=batch_size, io_batch_size=512,
                      shuffle=False, obs_columns=(), sparse=True)
    yield from L


def test_binning_matches_scgpt_definition_on_real_cells(setup):
    store, cells, vpath = setup
    vocab = load_vocab(vpath)
    assert {PAD, CLS, "<eoc>"} <= set(vocab) and len(set(vocab.values())) == len(vocab)
    axis = vocabulary_axis(store, vocab)
    var = store.var()
    assert (np.diff(axis["var_joinids"]) > 0).all()
    assert all(vocab[s] == t for s, t in zip(var.loc[axis["var_joinids"], "feature_name"], axis["token_ids"]))
    max_len = 200  # below the longest cells: the random gene subset is exercised too
    checked = ties = subsampled = 0
    for b in _batches(store, cells, axis):
        X = b["X"]
        csr = sp.csr_matrix((X.values().numpy(), X.col_indices().numpy(), X.crow_indices().numpy()),
                            shape=tuple(X.shape))
        out = bin_and_tokenize(csr.indptr, csr.indices, csr.data, axis["token_ids"], b["soma_joinid"].numpy(),
                               cls_id=vocab[CLS], pad_id=vocab[PAD], max_len=max_len, seed=4, threads=2,
                               return_edges=True)
        for i in range(csr.shape[0]):
            row = csr[i]
            x_all = row.data[row.data > 0].astype(np.float64)
            tok_all = axis["token_ids"][row.indices[row.data > 0]]
            L = int(out["lengths"][i])
            g, v = out["genes"][i, :L], out["values"][i, :L]
            assert g[0] == vocab[CLS] and v[0] == 0
            assert (out["genes"][i, L:] == vocab[PAD]).all() and (out["values"][i, L:] == -2).all()
            if len(x_all) == 0:
                assert L == 1
                continue
            edges = np.quantile(x_all, np.linspace(0, 1, 50))
            np.testing.assert_array_equal(out["edges"][i], edges)  # equal, not close
            pos = {t: k for k, t in enumerate(tok_all)}
            assert len(set(g[1:])) == L - 1 and set(g[1:]) <= set(tok_all)  # distinct nonzero vocabulary genes
            assert L - 1 == min(len(x_all), max_len - 1)
            subsampled += len(x_all) > max_len - 1
            x = x_all[[pos[t] for t in g[1:]]]
            lo, hi = np.digitize(x, edges, right=True), np.digitize(x, edges)
            assert ((v[1:] >= lo) & (v[1:] <= hi)).all() and (v[1:] >= 1).all() and (v[1:] <= 50).all()
            ties += int((hi - lo > 1).sum())
            checked += 1
    assert checked > 300 and subsampled > 0 and ties > 0


def test_same_key_same_tokens_and_the_epoch_changes_the_draws(setup):
    store, cells, vpath = setup
    vocab = load_vocab(vpath)
    axis = vocabulary_axis(store, vocab)
    b = next(_batches(store, cells, axis, batch_size=256))
    enc = ScGPTEncoder(axis, vocab, max_len=100, seed=1, threads=2)
    one, two = enc(b), ScGPTEncoder(axis, vocab, max_len=100, seed=1, threads=1)(b)
    assert all(np.array_equal(one[k].numpy(), two[k].numpy()) for k in ("genes", "values", "lengths"))
    enc.set_epoch(1)
    three = enc(b)
    assert not np.array_equal(one["genes"].numpy(), three["genes"].numpy())  # another gene subset
    # the same cells in another batch (order reversed) get the same tokens: draws are keyed by cell
    X = b["X"]
    csr = sp.csr_matrix((X.values().numpy(), X.col_indices().numpy(), X.crow_indices().numpy()), shape=tuple(X.shape))
    rev = csr[::-1]
    ids = b["soma_joinid"].numpy()
    r = bin_and_tokenize(rev.indptr, rev.indices, rev.data, axis["token_ids"], ids[::-1], cls_id=vocab[CLS],
                         pad_id=vocab[PAD], max_len=100, seed=1 * 1_000_003)
    L = r["genes"].shape[1]
    np.testing.assert_array_equal(r["genes"][::-1], one["genes"].numpy()[:, :L])
    np.testing.assert_array_equal(r["values"][::-1], one["values"].numpy()[:, :L])


def test_reference_and_kernel_agree_where_nothing_is_random():
    """Cells without ties or subsampling: the compiled pass equals the per-cell numpy version of
    scGPT's code token for token."""
    rng = np.random.default_rng(3)
    X = sp.random(50, 300, density=0.2, random_state=2, format="csr", data_rvs=lambda n: rng.permutation(n) + 1.0)
    tok = np.arange(300, dtype=np.int64) + 7
    out = bin_and_tokenize(X.indptr, X.indices, X.data, tok, np.arange(50), cls_id=1, pad_id=0, max_len=500)
    ref = bin_and_tokenize_reference(X, tok, cls_id=1, pad_id=0, max_len=500)
    for i in range(50):
        L = out["lengths"][i]
        np.testing.assert_array_equal(out["genes"][i, :L], ref["genes"][i])
        np.testing.assert_array_equal(out["values"][i, :L], ref["values"][i])


@pytest.mark.parametrize("text, msg", [("[1, 2]", "JSON object"), ('{"A": 1, "B": 1}', "one id"),
                                       ("{not json", "not readable JSON"), ('{"A": -1}', "ids >= 0")])
def test_bad_vocabulary_files_are_one_line_errors(tmp_path, text, msg):
    p = tmp_path / "v.json"
    p.write_text(text)
    with pytest.raises(AtlasmixError, match=msg):
        load_vocab(p)
    with pytest.raises(AtlasmixError, match="not found"):
        load_vocab(tmp_path / "missing.json")
