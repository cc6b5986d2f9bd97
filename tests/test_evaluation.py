"""Evaluation: reconstruction metric, HVGs, rank prediction, kNN / few-shot on real data, overlap
refusal, LDVAE outputs vs scvi-tools, and the CLI run + report."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pytest

from atlasmix.evaluation import metrics as M
from tests.conftest import SHARED, in_sql, needs_shared, run_cli

PBMC3K = SHARED / "pbmc3k_hvg2000.h5ad"


# ---------------------------------------------------------------------------------------------- pure metrics
def test_reconstruction_accuracy_hand_checkable():
    counts = np.array([[1.0, 3.0, 0.0, 6.0],      # library 10 -> CP10k 1000, 3000, 0, 6000
                       [0.0, 0.0, 0.0, 0.0]])     # empty cell: undefined
    orig = np.log1p(np.array([1000.0, 3000.0, 0.0, 6000.0]))
    np.testing.assert_allclose(M.log1p_cp10k(counts)[0], orig)
    # a gene subset normalised by the whole cell's library (library=): 1 / 20 counts -> CP10k 500
    np.testing.assert_allclose(M.log1p_cp10k(counts[:, :1], library=np.array([20.0, 0.0]))[:, 0], [np.log1p(500.0), 0])
    from scipy.sparse import csr_matrix

    np.testing.assert_allclose(M.log1p_cp10k(csr_matrix(counts), library=np.array([20.0, 0.0])).toarray()[0],
                               np.log1p(counts[0] * 500.0))
    # the model reproduces CP10k exactly -> r = 1; rows of `normalized` are expression at library 10,000
    perfect = np.array([[1000.0, 3000.0, 0.0, 6000.0], [2500.0] * 4])
    r, r2 = M.reconstruction_accuracy(counts, perfect)
    assert r[0] == pytest.approx(1.0) and np.isnan(r[1])
    # a flat prediction on genes 0, 1, 3 only gives r(log1p([1000, 3000, 6000]), log1p([2000, 2000, 6000]))
    pred = np.array([[2000.0, 2000.0, 0.0, 6000.0], [2500.0] * 4])
    a, b = orig[[0, 1, 3]], np.log1p([2000.0, 2000.0, 6000.0])
    want = ((a - a.mean()) @ (b - b.mean())) / np.sqrt(((a - a.mean()) ** 2).sum() * ((b - b.mean()) ** 2).sum())
    r, r2 = M.reconstruction_accuracy(counts, pred, genes=np.array([0, 1, 3]))
    assert r[0] == pytest.approx(want) and r2[0] == pytest.approx(want ** 2) and 0.78 < want < 0.80
    # sparse input gives the same numbers
    import scipy.sparse as sp

    np.testing.assert_allclose(M.reconstruction_accuracy(sp.csr_matrix(counts), pred, np.array([0, 1, 3]))[0][:1], [want])
    s = M.summarize(np.array([0.1, 0.2, 0.3, 0.4, np.nan]))
    assert s["median"] == pytest.approx(0.25) and s["iqr"] == pytest.approx(0.15) and s["n"] == 4


@needs_shared
def test_streaming_hvgs_equal_scanpy_seurat():
    import anndata as ad
    import scanpy as sc
    import scipy.sparse as sp

    a = ad.read_h5ad(PBMC3K)
    X = sp.csr_matrix(a.X)
    h = M.HVGStats(X.shape[1])
    for s in range(0, X.shape[0], 700):  # streamed in batches
        h.update(X[s:s + 700])
    b = ad.AnnData(M.log1p_cp10k(X).astype(np.float32))
    sc.pp.highly_variable_genes(b, flavor="seurat", n_top_genes=1000)
    assert np.array_equal(h.top_genes(1000), np.flatnonzero(b.var["highly_variable"].to_numpy()))
    np.testing.assert_allclose(h.table()["dispersions_norm"], b.var["dispersions_norm"], rtol=1e-4, atol=1e-4)


def test_rank_prediction_score_with_tiny_bert():
    import torch
    from transformers import BertConfig, BertForMaskedLM

    V, L = 70, 12
    perm = np.random.default_rng(0).permutation(np.arange(4, V))  # pad = 0, mask = 1; genes 4..69
    ids = np.zeros((5, L), dtype=np.int64)
    for i in range(5):  # each gene in one cell only
        n = 12 if i < 4 else 8  # the last cell is padded
        ids[i, :n] = perm[12 * i:12 * i + n]
    mask = M.mask_positions(ids, fraction=0.5, seed=1)
    assert mask.sum(axis=1).tolist() == [6, 6, 6, 6, 4] and not mask[4, 8:].any()
    # an oracle whose logits put each gene at its true position scores 1; a reversed one about -1
    oracle = np.full((5, L, V), -10.0)
    for i in range(5):
        for j in range(L):
            oracle[i, j, ids[i, j]] = 10.0
    np.testing.assert_allclose(M.rank_prediction_scores(ids, mask, oracle), 1.0)
    rev = np.full((5, L, V), -10.0)
    for i in range(5):
        pos = np.flatnonzero(mask[i])
        for j, jj in zip(pos, pos[::-1]):
            rev[i, j, ids[i, jj]] = 10.0
    sr = M.rank_prediction_scores(ids, mask, rev)  # -1 exactly only for evenly spaced masked positions
    assert np.all(sr < -0.9)
    # mean-rank baseline: positions averaged over these cells
    s, c = M.mean_positions(ids, V)
    mean_pos = np.where(c > 0, s / np.maximum(c, 1), np.nan)
    base = M.mean_rank_baseline_scores(ids, mask, mean_pos)
    np.testing.assert_allclose(base, 1.0)  # every gene occurs once, so its mean position is its position
    # a real (random) BertForMaskedLM: finite scores in [-1, 1]
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=L, pad_token_id=0)
    bert = BertForMaskedLM(cfg).eval()
    masked = np.where(mask, 1, ids)
    with torch.no_grad():
        logits = bert(input_ids=torch.from_numpy(masked), attention_mask=torch.from_numpy((ids != 0).astype(np.int64))).logits
    sc = M.rank_prediction_scores(ids, mask, logits.numpy())
    assert sc.shape == (5,) and np.all(np.isfinite(sc)) and np.all(np.abs(sc) <= 1 + 1e-9)


def test_rank_encode_and_fidelity_on_two_types():
    counts = np.array([[0, 5, 1, 2], [3, 0, 3, 1]], dtype=float)
    R = M.rank_encode(counts)
    np.testing.assert_allclose(R, [[0, 3, 1, 2], [2.5, 0, 2.5, 1]])
    rng = np.random.default_rng(0)
    a = rng.poisson(np.r_[np.full(20, 8.0), np.full(20, 0.5)], size=(60, 40))  # type A: first genes high
    b = rng.poisson(np.r_[np.full(20, 0.5), np.full(20, 8.0)], size=(60, 40))
    f = M.rank_fidelity(np.vstack([a, b]).astype(float), ["A"] * 60 + ["B"] * 60)
    assert f["spearman_within"] > f["spearman_between"] + 0.3
    assert f["knn_agreement_rank"] > 0.95 and f["knn_agreement_log"] > 0.95


# ---------------------------------------------------------------------------------------------- real data
@needs_shared
def test_knn_and_few_shot_on_pbmc3k_pca_baseline():
    from atlasmix.evaluation.evalsets import file_eval_set
    from atlasmix.evaluation.models import PCABaseline
    from atlasmix.evaluation.run import embedding_metrics, hvg_columns

    e = file_eval_set(PBMC3K, cell_type_column="classified")
    assert e.n_cells == 2638 and e.obs["cell_type"].nunique() == 9 and len(e.feature_ids) > 1900
    genes = e.feature_ids[hvg_columns(e, e.feature_ids, 2000, 1000)]
    emb = PCABaseline(30).fit_transform(e, genes, batch_size=1000)
    assert emb.shape == (2638, 30) and np.isfinite(emb).all()
    met, fs = embedding_metrics(emb, e.obs["cell_type"].to_numpy(), fractions=(0.1, 1.0), seeds=(0,))
    # 9 types: chance macro F1 ~ 0.11; measured 0.88-0.92 (kNN) and 0.86-0.91 (few-shot)
    assert met["n_cell_types"] == 9 and met["chance_macro_f1"] == pytest.approx(1 / 9)
    assert met["knn_macro_f1"] > 0.75 and met["knn_accuracy"] > 0.8
    assert met["few_shot_macro_f1_f1"] > 0.75 and met["few_shot_macro_f1_f0.1"] > 0.5
    assert list(fs["fraction"]) == [0.1, 1.0] and fs["n_train"].iloc[0] < fs["n_train"].iloc[1]
    assert met["nmi"] > 0.5 and 0.5 < met["silhouette_label"] <= 1


def eval_toml(dataset_id: str) -> str:
    """30 % of one dataset's cells as the eval set ``pbmc3k_part`` (pbmc3k itself on the shared store)."""
    return f"""name = "test_eval"
seed = 3
[eval_sets.pbmc3k_part]
where = "dataset_id = '{dataset_id}'"
fraction = 0.3
"""


@pytest.fixture(scope="module")
def trained(lake, tmp_path_factory):
    """A tiny LDVAE trained on two datasets (kang_ifnb + pisces_pbmc1k on the shared store), with cells of
    a third (pbmc3k) held out as an eval set; the simulated stand-in store when ../shared/data is absent."""
    from atlasmix.mixing import loads_spec, resolve, write_manifest
    from atlasmix.training.ldvae import train_ldvae
    from atlasmix.mixing.genes import mixture_genes

    store, names = lake
    d = tmp_path_factory.mktemp("evaluation")
    (d / "eval_sets.toml").write_text(eval_toml(names[2]))
    spec = loads_spec('name = "pbmc_mix"\nseed = 1\nvalidation_fraction = 0.1\nexclude = ["eval_sets.toml"]\n'
                      f'[[components]]\nname = "pbmc"\nwhere = "{in_sql(names[:2])}"\n'
                      'n_cells = 600\n', "mix.toml")
    write_manifest(resolve(spec, store, base_dir=d), d / "mix.parquet")
    cells = pd.read_parquet(d / "mix.parquet")["soma_joinid"].to_numpy()
    var = store.var()
    genes = var.loc[mixture_genes(store, cells)[:120], "feature_id"].tolist()
    train_ldvae(store, d / "mix.parquet", d / "ldvae", max_epochs=1, n_hidden=16, n_layers=1, batch_size=128,
                io_batch_size=512, checkpoint_every=0, progress=False, accelerator="cpu", genes=genes, prior_cells=1000)
    return store, d, names


def test_ldvae_outputs_match_scvi(trained):
    """The LDVAE adapter is scvi-tools' public API: the latent is ``get_latent_representation``, the
    expression ``get_normalized_expression(library_size=1e4)`` with the same posterior samples of z as
    scvi-tools' own AnnData route draws from the same seed; ``reconstruction`` is seeded."""
    import scipy.sparse as sp
    import torch

    from atlasmix.evaluation.models import load_model

    _, d, names = trained
    m = load_model(d / "ldvae")
    assert m.kind == "ldvae" and m.mixture == "pbmc_mix" and len(m.feature_ids) == 120
    ad = m.model.adata[:48].copy()
    codes, seen = m.batch_codes(ad.obs.assign(dataset_id=ad.obs["batch"].astype(str)))
    assert seen.all()
    torch.manual_seed(5)
    z, expr = m.encode(ad.X.toarray(), codes)
    np.testing.assert_allclose(expr.sum(axis=1), 1e4, rtol=1e-4)
    np.testing.assert_allclose(z, m.model.get_latent_representation(ad), rtol=1e-5, atol=1e-6)
    # the same computation as scvi-tools' AnnData route (same cells, batch codes, library size): with the
    # posterior sample of z made a fixed function of q(z|x) (loc + scale / 2), both decode the same
    # expression (the random draws themselves differ: a torch DataLoader takes one from the generator)
    N = torch.distributions.Normal
    fixed = lambda self, shape=torch.Size(): (self.loc + 0.5 * self.scale).expand(torch.Size(shape) + self.loc.shape)  # noqa: E731
    with mock.patch.object(N, "sample", fixed), mock.patch.object(N, "rsample", fixed):
        ref = m.model.get_normalized_expression(ad, library_size=1e4, batch_size=16, return_numpy=True)
        ours = m.encode(ad.X.toarray(), codes)[1]
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-3)
    # one posterior sample of z per cell, drawn from torch's generator: the seed decides it
    torch.manual_seed(5)
    np.testing.assert_array_equal(m.encode(ad.X.toarray(), codes)[1], expr)
    torch.manual_seed(6)
    assert not np.allclose(m.encode(ad.X.toarray(), codes)[1], expr, rtol=1e-3)
    X = sp.csr_matrix(ad.X)
    batches = lambda: ((slice(s, s + 16), X[s:s + 16]) for s in range(0, 48, 16))  # noqa: E731
    r1, lat1 = m.reconstruction(batches(), 48, codes, np.arange(120), seed=2)
    r2, lat2 = m.reconstruction(batches(), 48, codes, np.arange(120), seed=2)
    np.testing.assert_array_equal(r1, r2)
    np.testing.assert_allclose(lat1, z, rtol=1e-5, atol=1e-6)
    ok = np.asarray(X.sum(axis=1)).ravel() > 0
    assert np.isfinite(r1[ok]).all() and np.nanmedian(r1) > 0
    # a dataset without training cells (pbmc3k: in the loader's categories only as eval cells) is unseen
    c2, s2 = m.batch_codes(pd.DataFrame({"dataset_id": [names[2], names[1], "elsewhere"]}))
    assert s2.tolist() == [False, True, False] and c2[0] == c2[2] == m.reference_code


def test_overlap_is_refused(trained, tmp_path):
    store, d, names = trained
    bad = tmp_path / "bad_eval.toml"
    bad.write_text(f'name = "bad"\n[eval_sets.kang_all]\nwhere = "dataset_id = \'{names[1]}\'"\n')
    r = run_cli("eval", "run", "--store", store.uri, "--eval-sets", bad, "--models", d / "ldvae", "--out", tmp_path / "r")
    assert r.returncode == 2 and "shares" in r.stderr and "kang_all" in r.stderr and "training" in r.stderr
    assert not (tmp_path / "r" / "results.parquet").exists()
    if names[1] != "kang_ifnb":
        return  # the external-file part needs the shared data's source files
    # the source file of a training dataset is refused as an external set too (in-process: faster)
    from atlasmix.errors import AtlasmixError
    from atlasmix.evaluation.evalsets import file_eval_set
    from atlasmix.evaluation.models import load_model
    from atlasmix.evaluation.overlap import check_overlap

    m = load_model(d / "ldvae")
    with pytest.raises(AtlasmixError, match="source file of dataset 'kang_ifnb'"):
        check_overlap(m, file_eval_set(SHARED / "kang_pbmc_ifnb.h5ad"), store)
    assert check_overlap(m, file_eval_set(PBMC3K, cell_type_column="classified"), store)["checked"]


def test_cli_run_and_report(trained, tmp_path):
    store, d, names = trained
    out = tmp_path / "res"
    r = run_cli("eval", "run", "--store", store.uri, "--eval-sets", d / "eval_sets.toml", "--models", d / "ldvae",
                "--out", out, "--few-shot-seeds", "1", "--few-shot-fractions", "0.5,1", "--batch-size", "256")
    assert r.returncode == 0, r.stderr[-3000:]
    res = pd.read_parquet(out / "results.parquet")
    assert list(res.columns) == ["model", "mixture", "eval_set", "metric", "value"]
    assert pd.read_csv(out / "results.csv").shape == res.shape
    assert set(res["model"]) == {"ldvae", "pca", "data"} and set(res["eval_set"]) == {"pbmc3k_part"}
    v = res.set_index(["model", "metric"])["value"]
    n = int(v[("data", "n_cells")])
    n_set = int((store.obs(["dataset_id"]).to_pandas()["dataset_id"] == names[2]).sum())
    assert abs(n - 0.3 * n_set) <= 0.05 * n_set  # 30 % of the set's dataset (pbmc3k: 2,638 cells)
    assert -1 < v[("ldvae", "recon_pearson_median")] < 1 and v[("ldvae", "recon_n_hvg")] >= 100
    assert v[("ldvae", "batch_unseen_fraction")] == 1.0
    assert v[("pca", "knn_macro_f1")] > 0.6 and v[("ldvae", "knn_macro_f1")] > 1 / 9
    assert v[("data", "rank_fidelity_spearman_within")] > v[("data", "rank_fidelity_spearman_between")]
    pc = pd.read_parquet(out / "per_cell.parquet")
    assert len(pc) == n and {"cell_type", "pearson_r", "r2", "soma_joinid", "batch_seen"} <= set(pc.columns)
    np.testing.assert_allclose(np.nanmedian(pc["pearson_r"]), v[("ldvae", "recon_pearson_median")])
    doc = json.loads((out / "evaluation.json").read_text())
    assert doc["overlap_checks"]["ldvae/pbmc3k_part"]["checked"]

    rep = tmp_path / "rep" / "report.html"
    r = run_cli("eval", "report", out, "--out", rep)
    assert r.returncode == 0, r.stderr[-3000:]
    page = rep.read_text()
    pngs = sorted(p.name for p in rep.parent.glob("*.png"))
    assert pngs == ["report_few_shot.png", "report_heatmap.png", "report_knn.png", "report_per_cell_0.png"]
    for p in pngs:
        assert f'src="{p}"' in page and (rep.parent / p).stat().st_size > 5000
    assert "<table" in page and "pbmc3k_part" in page and "pbmc_mix" in page


# ---------------------------------------------------------------------------------------------- Geneformer
@pytest.fixture(scope="module")
def gf_run(trained):
    """A tiny Geneformer (2 layers, hidden 32, 128 tokens, 15 steps) trained on the LDVAE's manifest."""
    import torch

    from atlasmix.training.geneformer.dictionaries import build_dictionaries, load_dictionaries, write_dictionaries
    from atlasmix.training.geneformer.pretrain import train_geneformer

    store, d, _ = trained
    torch.set_num_threads(1)
    gf = SHARED.parent / "geneformer"
    var = store.var()
    genes = var["feature_id"][var["feature_id"].str.startswith("ENSG")].tolist()
    if (gf / "token_dictionary.pkl").is_file():  # Geneformer's V1 medians of the store's human genes
        full = load_dictionaries(gf)
        med = {g: full.median[g] for g in genes if g in full.median}
    else:
        med = dict(zip(genes, np.random.default_rng(0).uniform(0.5, 3.0, len(genes))))
    write_dictionaries(build_dictionaries(med), d / "gf_dict")
    train_geneformer(store, d / "mix.parquet", d / "gf", dictionaries=d / "gf_dict", preset="tiny", max_len=128,
                     batch_size=16, group_batches=4, max_steps=15, warmup_steps=2, lr=5e-3, log_every=5,
                     checkpoint_every=0, device="cpu", io_batch_size=512)
    return d / "gf"


def test_geneformer_evaluation_and_report(trained, gf_run, tmp_path):
    import torch

    from atlasmix.evaluation.evalsets import store_eval_sets
    from atlasmix.evaluation.models import load_model
    from atlasmix.evaluation.pretrained import GeneformerAdapter
    from atlasmix.evaluation.pretrained_outputs import geneformer_outputs
    from atlasmix.evaluation.report import render_report
    from atlasmix.evaluation.run import evaluate
    from atlasmix.training.geneformer.embed import embed_cells

    torch.set_num_threads(1)
    store, d, _ = trained
    m = load_model(gf_run)
    assert isinstance(m, GeneformerAdapter) and m.name == "gf" and m.mixture == "pbmc_mix" and m.max_len == 128
    m2 = load_model(gf_run / "model")  # OUT/model: run.json found in the parent
    assert m2.name == "gf" and m2.mixture == "pbmc_mix" and m2.training_cells()[0] is not None
    (e,) = store_eval_sets(d / "eval_sets.toml", store)
    # the evaluation's embeddings are embed_cells' (same tokens, same layer, same pooling)
    g = geneformer_outputs(m, e, batch_size=300, max_rank_cells=0)
    ref = embed_cells(gf_run, store, e.joinids[:6], device="cpu")
    np.testing.assert_allclose(g["emb"][:6], ref.filter(like="emb_").to_numpy(), rtol=1e-4, atol=1e-5)
    assert (g["n_tokens"][:6] == ref["n_tokens"].to_numpy()).all() and (g["n_tokens"] > 0).all()

    out = tmp_path / "res"
    doc = evaluate([d / "ldvae", gf_run], [e], out, store=store, batch_size=400, few_shot_fractions=(0.5, 1.0),
                   few_shot_seeds=(0,), rank_fidelity=False, max_rank_cells=150, log=lambda s: None)
    assert [x["kind"] for x in doc["models"]] == ["ldvae", "geneformer"] and doc["overlap_checks"]["gf/pbmc3k_part"]["checked"]
    res = pd.read_parquet(out / "results.parquet")
    v = res.set_index(["model", "metric"])["value"]
    gfm = set(res.loc[res["model"] == "gf", "metric"])
    assert not any(k.startswith("recon_") for k in gfm)  # no reconstruction for Geneformer
    assert 0 <= v[("gf", "knn_macro_f1")] <= 1 and 0 <= v[("gf", "few_shot_macro_f1_f1")] <= 1
    assert 0 <= v[("gf", "knn_accuracy")] <= 1 and v[("gf", "n_cell_types")] == v[("pca", "n_cell_types")]
    for k in ("rank_pred_pearson_median", "rank_pred_baseline_pearson_median"):
        assert -1 <= v[("gf", k)] <= 1
    # the mean-rank baseline knows the order of highly expressed genes well; 15 steps of training do not
    assert v[("gf", "rank_pred_baseline_pearson_median")] > 0.3
    assert v[("gf", "rank_pred_n_cells_scored")] == 150 and v[("gf", "no_token_cells_fraction")] == 0
    assert 0 < v[("gf", "truncated_cells_fraction")] <= 1  # 128 tokens: most PBMCs express more genes
    pc = pd.read_parquet(out / "per_cell.parquet")
    pg, pl = pc[pc["model"] == "gf"], pc[pc["model"] == "ldvae"]
    assert len(pg) == len(pl) == e.n_cells and pg["pearson_r"].isna().all() and pl["rank_pred_pearson"].isna().all()
    assert pg["rank_pred_pearson"].notna().sum() == 150 and pg["rank_pred_pearson"].abs().max() <= 1
    np.testing.assert_allclose(pg["rank_pred_pearson"].median(), v[("gf", "rank_pred_pearson_median")])

    rep = render_report(out, tmp_path / "rep" / "report.html")
    names = sorted(Path(f).name for f in rep["figures"])
    assert names == ["report_few_shot.png", "report_heatmap.png", "report_knn.png", "report_per_cell_0.png",
                     "report_rank_prediction.png"]
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "Rank prediction" in page and "rank_pred_pearson_median" in page


@needs_shared
def test_geneformer_overlap_refusal_and_file_sets(trained, gf_run, tmp_path):
    import torch

    from atlasmix.errors import AtlasmixError
    from atlasmix.evaluation.evalsets import file_eval_set, store_eval_sets
    from atlasmix.evaluation.models import load_model
    from atlasmix.evaluation.overlap import check_overlap
    from atlasmix.evaluation.pretrained_outputs import geneformer_outputs
    from atlasmix.evaluation.run import evaluate

    torch.set_num_threads(1)
    store, d, _ = trained
    bad = tmp_path / "bad_eval.toml"
    bad.write_text('name = "bad"\n[eval_sets.kang_all]\nwhere = "dataset_id = \'kang_ifnb\'"\n')
    with pytest.raises(AtlasmixError, match="shares .* training manifest of model gf"):
        evaluate([gf_run], store_eval_sets(bad, store), tmp_path / "r", store=store, log=lambda s: None)
    assert not (tmp_path / "r" / "results.parquet").exists()
    m = load_model(gf_run)
    with pytest.raises(AtlasmixError, match="source file of dataset 'kang_ifnb'"):
        check_overlap(m, file_eval_set(SHARED / "kang_pbmc_ifnb.h5ad"), store)
    # an external file is tokenized on the vocabulary genes with its own totals: the pbmc3k cells of
    # the store come from this file, so their tokens and embeddings are the same
    f = file_eval_set(PBMC3K, cell_type_column="classified")
    assert check_overlap(m, f, store)["checked"]
    (e,) = store_eval_sets(d / "eval_sets.toml", store)
    gs = geneformer_outputs(m, e, max_rank_cells=0)
    gf = geneformer_outputs(m, f, max_rank_cells=40, seed=1)
    at = pd.Index("pbmc3k:" + f.obs["cell_id"]).get_indexer(e.obs["cell_id"])
    assert (at >= 0).all()
    assert (gs["n_tokens"] == gf["n_tokens"][at]).all()
    np.testing.assert_allclose(gs["emb"], gf["emb"][at], rtol=1e-4, atol=1e-5)
    ok = np.isfinite(gf["rank_pred"])
    assert ok.sum() == 40 and np.isfinite(gf["rank_baseline"][ok]).all()


def test_geneformer_adapter_batch_without_tokens_gives_nan_not_a_crash():
    """A batch of cells with no vocabulary gene (e.g. mouse cells, human vocabulary) embeds to NaN rows."""
    import numpy as np

    from atlasmix.evaluation.pretrained import GeneformerAdapter

    a = GeneformerAdapter.__new__(GeneformerAdapter)  # only n_latent is consulted before any forward pass
    a.n_latent = 8
    e = GeneformerAdapter.embed(a, np.zeros((4, 0), dtype=np.int64), np.zeros(4, dtype=np.int64))
    assert e.shape == (4, 8) and np.isnan(e).all()
    r = GeneformerAdapter.rank_scores(a, np.zeros((4, 0), dtype=np.int64), np.zeros(4, dtype=np.int64),
                                      np.zeros((4, 0), dtype=bool))
    assert r.shape == (4,) and np.isnan(r).all()


def test_scgpt_and_scbert_evaluated_beside_ldvae(trained, tmp_path):
    """scGPT and scBERT runs go through the same evaluation as LDVAE (embedding metrics, per-cell
    table, report); their evaluation embeddings are the ones `scgpt|scbert embed` gives."""
    import torch

    from atlasmix.evaluation.evalsets import store_eval_sets
    from atlasmix.evaluation.models import load_model
    from atlasmix.evaluation.pretrained import ScBERTAdapter, ScGPTAdapter
    from atlasmix.evaluation.report import render_report
    from atlasmix.evaluation.run import evaluate
    from atlasmix.training.scbert.pretrain import embed_cells as sb_embed
    from atlasmix.training.scbert.pretrain import train_scbert
    from atlasmix.training.scgpt.pretrain import embed_cells as sg_embed
    from atlasmix.training.scgpt.pretrain import train_scgpt

    torch.set_num_threads(1)
    store, d, _ = trained
    kw = dict(preset="tiny", batch_size=16, group_batches=4, max_steps=8, warmup_steps=2, lr=1e-2, log_every=4,
              checkpoint_every=0, device="cpu", io_batch_size=512)
    train_scgpt(store, d / "mix.parquet", tmp_path / "sg", max_len=128, **kw)
    (tmp_path / "genes.txt").write_text("\n".join(store.var()["feature_name"].astype(str).unique()[:800]) + "\n")
    train_scbert(store, d / "mix.parquet", tmp_path / "sb", genes=tmp_path / "genes.txt", **kw)
    sg, sb = load_model(tmp_path / "sg"), load_model(tmp_path / "sb" / "model")
    assert isinstance(sg, ScGPTAdapter) and isinstance(sb, ScBERTAdapter) and sb.name == "sb"
    assert sg.mixture == "pbmc_mix" and sg.training_cells()[0] is not None
    (e,) = store_eval_sets(d / "eval_sets.toml", store)
    out = tmp_path / "res"
    doc = evaluate([d / "ldvae", tmp_path / "sg", tmp_path / "sb"], [e], out, store=store, batch_size=400,
                   few_shot_fractions=(0.5, 1.0), few_shot_seeds=(0,), rank_fidelity=False, max_rank_cells=150,
                   log=lambda s: None)
    assert [x["kind"] for x in doc["models"]] == ["ldvae", "scgpt", "scbert"]
    assert doc["overlap_checks"]["sg/pbmc3k_part"]["checked"]
    res = pd.read_parquet(out / "results.parquet")
    v = res.set_index(["model", "metric"])["value"]
    for name in ("sg", "sb"):
        assert 0 <= v[(name, "knn_macro_f1")] <= 1 and 0 <= v[(name, "few_shot_macro_f1_f1")] <= 1
        assert v[(name, "no_token_cells_fraction")] < 0.05 and v[(name, "tokens_per_cell_median")] > 10
        assert v[(name, "n_cell_types")] == v[("ldvae", "n_cell_types")]
        assert not any(k.startswith("recon_") for k in res.loc[res["model"] == name, "metric"])
        # of max_rank_cells = 150; a cell whose masked values are all equal has no correlation (scBERT's
        # tokens of 800 genes are mostly 1: many cells)
        assert v[(name, "masked_pred_n_cells_scored")] >= (100 if name == "sg" else 20)
        assert -1 <= v[(name, "masked_pred_pearson_median")] <= 1
        assert 0.2 < v[(name, "masked_pred_baseline_pearson_median")] <= 1  # gene means know a lot
    pc = pd.read_parquet(out / "per_cell.parquet")
    assert (pc.groupby("model").size() == e.n_cells).all() and (pc.loc[pc["model"] == "sg", "n_tokens"] > 0).mean() > 0.95
    # the evaluation's embeddings == the embed commands' (same encoding, same draws, same pooling)
    ids = e.joinids[:5]
    ref_sg = sg_embed(tmp_path / "sg", store, ids, device="cpu").filter(like="emb_").to_numpy()
    ref_sb = sb_embed(tmp_path / "sb", store, ids, device="cpu").filter(like="emb_").to_numpy()
    cnt = next(e.iter_counts(sg.feature_ids, 5))[1]
    np.testing.assert_allclose(sg.embed_counts(cnt[:5], ids)[0], ref_sg, rtol=1e-4, atol=1e-5)
    cnt = next(e.iter_counts(sb.feature_ids, 5))[1]
    np.testing.assert_allclose(sb.embed_counts(cnt[:5], ids)[0], ref_sb, rtol=1e-4, atol=1e-5)
    render_report(out, tmp_path / "rep" / "report.html")
    page = (tmp_path / "rep" / "report.html").read_text()
    assert all(f"<th>{n}</th>" in page for n in ("ldvae", "sg", "sb"))  # side by side in the kNN table
