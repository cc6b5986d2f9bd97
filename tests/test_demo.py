"""The main job end to end: the whole study on the REAL shared datasets, and `atlasmix demo` itself."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from atlasmix.demo import choose_genes, datasets_without_copies, examples_dir, generated_specs, plan_for, run_study
from tests.conftest import SHARED, needs_shared, run_cli

pytestmark = pytest.mark.slow

REAL_MIXTURES = ["base_model", "base_plus_perturbation", "base_plus_pancreas"]


@needs_shared
def test_real_data_study_base_and_added_sources(shared_store, tmp_path):
    """Ingested real data (session store) -> blood-only base and base + other-source mixtures ->
    LDVAE on each -> evaluation on held-out real cells -> a complete, sane results table and report."""
    store = shared_store[0]
    spec_dir = examples_dir() / "mixtures" / "shared"
    summary = run_study(store, spec_dir, tmp_path, REAL_MIXTURES + ["bone_marrow_only"], epochs=1, n_genes=400,
                        batch_size=256, geneformer=False, few_shot=False, log=lambda s: None)
    # mouse-only paul15 has no counts on the human HVG axis: skipped with the reason, not a broken model
    assert list(summary["skipped"]) == ["ldvae_bone_marrow_only"]
    assert "no counts on the gene axis" in summary["skipped"]["ldvae_bone_marrow_only"]
    assert not (tmp_path / "models" / "ldvae_bone_marrow_only").exists()
    res = pd.read_parquet(tmp_path / "results" / "results.parquet")
    pc = pd.read_parquet(tmp_path / "results" / "per_cell.parquet")
    sets = sorted(res["eval_set"].unique())
    assert sets == ["bone_marrow_balanced", "crispr_holdout", "ifnb_stimulated", "pancreas_heldout_donor", "pbmc5k_heldout"]
    recon = res[res["metric"] == "recon_pearson_median"]
    # every LDVAE on every held-out set, nothing missing, Pearson in range
    assert set(recon["mixture"]) == set(REAL_MIXTURES)
    assert len(recon) == len(REAL_MIXTURES) * len(sets)
    scored = recon.set_index(["mixture", "eval_set"])["value"]
    n_hvg = res[res["metric"] == "recon_n_hvg"].set_index(["mixture", "eval_set"])["value"].loc[scored.index]
    n_scored = res[res["metric"] == "recon_n_cells_scored"].set_index(["mixture", "eval_set"])["value"].loc[scored.index]
    ok = ((n_hvg > 0) & (n_scored > 0)).to_numpy()
    assert np.isfinite(scored[ok]).all() and scored[ok].between(-1, 1).all()
    # a set none of whose HVGs the human models know (mouse paul15), or whose cells have no counts on
    # the shared HVGs (the 28-gene CRISPR panel), is reported as not scorable (NaN), never a made-up number
    assert scored[~ok].isna().all()
    assert (n_hvg.xs("bone_marrow_balanced", level="eval_set") == 0).all()  # mouse genes vs human models
    for s in ("pbmc5k_heldout", "ifnb_stimulated", "pancreas_heldout_donor"):
        assert (n_hvg.xs(s, level="eval_set") > 0).all(), s
    # held-out real PBMCs are reconstructed by a PBMC-trained model better than chance (r > 0)
    pbmc = recon[recon["eval_set"] == "pbmc5k_heldout"].set_index("mixture")["value"]
    assert (pbmc > 0.1).all(), pbmc
    # per-cell table: one row per eval cell per model, cell types carried
    n_eval = pc[pc["model"] == "ldvae_base_model"].groupby("eval_set").size()
    for m in REAL_MIXTURES:
        assert pc[pc["model"] == f"ldvae_{m}"].groupby("eval_set").size().equals(n_eval)
    assert pc["cell_type"].notna().any()
    # the PCA baseline separates the labelled held-out cells (paul15's myeloid types) well above chance
    pca = res[(res["model"] == "pca") & (res["eval_set"] == "bone_marrow_balanced")].set_index("metric")["value"]
    assert pca["knn_macro_f1"] > 2 * pca["chance_macro_f1"]
    # no model was evaluated on its own training cells (the overlap check ran and found none)
    ev = json.loads((tmp_path / "results" / "evaluation.json").read_text())
    assert ev["overlap_checks"] and all(v["checked"] and v["n_overlap"] == 0 for v in ev["overlap_checks"].values())
    html = Path(summary["report"]).read_text()
    assert "<img" in html and (tmp_path / "report_heatmap.png").is_file()
    assert summary["median_reconstruction_r"]["base_model"]["pbmc5k_heldout"] == pytest.approx(pbmc["base_model"], abs=1e-4)


@needs_shared
def test_choose_genes_survives_small_panels(shared_store, tmp_path):
    """The zheng 200-gene panel empties the all-datasets intersection; the demo's gene axis does not."""
    from atlasmix.mixing import resolve, write_manifest

    store = shared_store[0]
    path = tmp_path / "base.parquet"
    write_manifest(resolve(examples_dir() / "mixtures" / "shared" / "base_model.toml", store), path)
    genes = choose_genes(store, [path], n_genes=300)
    assert len(genes) == 300 and len(set(genes)) == 300
    assert all(g.startswith("ENSG") for g in genes)
    var = store.var().set_index("feature_id")
    names = set(var.loc[genes, "feature_name"])
    # seurat-flavour HVGs of PBMCs: platelet, plasma-cell, NK and B-cell markers
    assert len({"PPBP", "PF4", "GNLY", "NKG7", "MS4A1", "CD79A", "JCHAIN", "IGLC2"} & names) >= 3, names


@needs_shared
def test_plan_for_real_directories(tmp_path):
    # the shared data directory itself: the project's plan, re-rooted, with the shared mixture specs
    plan, specs = plan_for(SHARED, tmp_path / "a")
    text = plan.read_text()
    assert str(SHARED.resolve() / "pbmc3k_hvg2000.h5ad") in text and specs.name == "shared"
    # any other folder: one dataset per file, generated specs
    d = tmp_path / "mine"
    d.mkdir()
    os.symlink(SHARED / "pbmc3k_hvg2000.h5ad", d / "pbmc3k_hvg2000.h5ad")
    os.symlink(SHARED / "pbmc3k_hvg2000_mex", d / "pbmc3k_mex")
    plan, specs = plan_for(d, tmp_path / "b")
    assert specs is None
    assert plan.read_text().count("[[dataset]]") == 2 and 'dataset_id = "pbmc3k_mex"' in plan.read_text()
    sd = generated_specs(["pbmc3k_hvg2000", "pbmc3k_mex"], tmp_path / "specs")
    assert sorted(p.name for p in sd.glob("*.toml")) == ["all.toml", "eval_sets.toml", "pbmc3k_hvg2000_only.toml",
                                                          "pbmc3k_mex_only.toml"]
    from atlasmix.errors import AtlasmixError

    with pytest.raises(AtlasmixError, match="no .h5ad"):
        plan_for(tmp_path / "specs", tmp_path / "c")


def test_generated_mixtures_leave_out_copies_of_other_datasets(shared_store):
    # the plan ingests pbmc3k and, later, the same cells as a 10x MEX folder: only the copy is left out
    _, _, reports = shared_store
    ids, copies = datasets_without_copies(list(reports.values()))
    assert copies == {"pbmc3k_mex": {"pbmc3k": 2638}}
    assert ids == sorted(set(reports) - {"pbmc3k_mex"})


def test_demo_command_simulated_corpus_to_report(tmp_path):
    """`atlasmix demo` (small): simulate -> store -> two mixtures -> LDVAE + tiny Geneformer -> eval -> report."""
    wd = tmp_path / "demo"
    p = run_cli("demo", "--workdir", wd, "--cells", "6000", "--epochs", "1", "--genes", "300",
                "--mixture", "base_model", "--mixture", "base_plus_malignant", "--accelerator", "cpu",
                env={"OMP_NUM_THREADS": "1"}, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((wd / "demo.json").read_text())
    assert set(summary["stages_s"]) >= {"corpus", "store + ingest", "gene axis", "train a tiny Geneformer", "evaluate",
                                        "report"}
    med = summary["median_reconstruction_r"]
    assert set(med) == {"base_model", "base_plus_malignant"}
    assert all(len(v) == 5 and all(-1 <= x <= 1 for x in v.values()) for v in med.values())
    res = pd.read_parquet(wd / "results" / "results.parquet")
    assert {"ldvae_base_model", "ldvae_base_plus_malignant", "geneformer_base_model", "pca"} <= set(res["model"])
    assert res[res["model"] == "geneformer_base_model"]["metric"].str.startswith("rank_pred").any()
    assert (wd / "report.html").is_file() and "demo finished" in p.stderr
    # a bad data directory is one clear line and exit 2
    bad = run_cli("demo", "--workdir", tmp_path / "x", "--data-dir", tmp_path / "nope")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: --data-dir")
