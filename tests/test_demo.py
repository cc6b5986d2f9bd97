"""The main job end to end: the whole study on the REAL shared datasets, and `atlasmix demo` itself."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from atlasmix.demo import datasets_without_copies, examples_dir, generated_specs, plan_for
from atlasmix.mixing.genes import choose_genes
from tests.conftest import SHARED, needs_shared, run_cli

pytestmark = pytest.mark.slow


@needs_shared
def test_real_data_study_base_and_added_sources(shared_store, tmp_path):
    """The study machinery on the REAL datasets (examples/studies/shared.toml, smaller): blood base vs
    whole base, base + pancreas and pancreas alone, 2 seeds -> tables with intervals, checks that say
    what they could and could not check, a report."""
    from atlasmix.study.runner import run_study

    store = shared_store[0]
    src = examples_dir() / "studies" / "shared.toml"
    text = src.read_text().replace('seeds = [0, 1, 2]', 'seeds = [0, 1]').replace('budgets = ["cells=60000"]',
                                                                              'budgets = ["cells=20000"]')
    text = text.replace('"../mixtures/shared', f'"{examples_dir() / "mixtures" / "shared"}').replace(
        "n_hvg = 500", "n_hvg = 300").replace("max_cells_per_set = 1000", "max_cells_per_set = 300")
    spec = tmp_path / "study.toml"
    spec.write_text(text)
    doc = run_study(spec, store, tmp_path / "out", log=lambda s: None)
    summ = pd.read_parquet(tmp_path / "out" / "summary.parquet")
    head = summ[summ["metric"] == "recon_pearson_median"]
    assert set(head["eval_set"]) == {"bone_marrow_balanced", "crispr_holdout", "ifnb_stimulated",
                                     "pancreas_heldout_donor", "pbmc5k_heldout"}
    assert len(head) == 4 * 5 and (head["n_seeds"] == 2).all()
    # human models on mouse paul15 cells share no gene: not scorable (NaN), never a made-up number
    assert head[head["eval_set"] == "bone_marrow_balanced"]["mean"].isna().all()
    pbmc = head[head["eval_set"] == "pbmc5k_heldout"].set_index("mixture")
    assert (pbmc["lo"] <= pbmc["mean"]).all() and (pbmc["mean"] <= pbmc["hi"]).all()
    # held-out PBMCs are reconstructed by the blood-trained models better than chance
    assert (pbmc.loc[["base_model", "base_full", "base_plus_pancreas"], "mean"] > 0.1).all(), pbmc
    deltas = pd.read_parquet(tmp_path / "out" / "deltas.parquet")
    assert set(deltas["mixture"]) == {"base_full", "base_plus_pancreas", "pancreas_only"}
    names = {c["name"]: c for c in doc["checks"]}
    assert set(names) == {"diagonal:pancreas", "adding_helps:pancreas"}
    # one *_only mixture: the diagonal check cannot apply and says so; adding pancreas is checked
    assert not names["diagonal:pancreas"]["applicable"] and names["adding_helps:pancreas"]["applicable"]
    assert Path(doc["report"]).is_file() and "<img" in Path(doc["report"]).read_text()


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
    """`atlasmix demo` (small): simulate -> store -> the packaged study spec (3 mixtures, 2 seeds) -> report."""
    wd = tmp_path / "demo"
    p = run_cli("demo", "--workdir", wd, "--cells", "6000", "--budget", "cells=2000", "--genes", "200",
                "--seed-replicate", "0", "--seed-replicate", "1", "--jobs", "1", "--no-check",
                "--mixture", "base_model", "--mixture", "base_plus_malignant", "--mixture", "malignant_only",
                "--accelerator", "cpu", env={"OMP_NUM_THREADS": "1"}, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((wd / "demo.json").read_text())
    assert set(summary["stages_s"]) >= {"corpus", "store + ingest", "study (resolve, train, evaluate, summarise, report)"}
    assert summary["n_runs"] == 6
    head = summary["headline"]["mean"]
    assert set(head) == {"base_model", "base_plus_malignant", "malignant_only"}
    assert all(len(v) == 5 and all(-1 <= x <= 1 for x in v.values()) for v in head.values())
    assert (wd / "study" / "report.html").is_file() and "demo finished" in p.stderr
    study = json.loads((wd / "study.json").read_text())  # the study actually run: the package's, overridden
    assert study["seeds"] == [0, 1] and study["budgets"] == ["cells=2000"] and study["genes"]["n_hvg"] == 200
    assert study["reference"] == "base_model" and study["checks"]["sources"]["malignant"] == "malignant_heldout_donor"
    # a bad data directory is one clear line and exit 2
    bad = run_cli("demo", "--workdir", tmp_path / "x", "--data-dir", tmp_path / "nope")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: --data-dir")
