"""The example mixtures of examples/mixtures resolve, as a user would run them, on the data they target."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from atlasmix.ingest import read_plan
from atlasmix.ingest import QCPolicy, ingest
from atlasmix.mixing import resolve
from atlasmix.simulate import simulate_atlas
from atlasmix.store import Store
from conftest import ROOT, needs_shared

EXAMPLES = ROOT / "examples" / "mixtures"
DEMO_MIXTURES = ROOT / "atlasmix" / "study" / "demo" / "mixtures"


def _check_design(results: dict, base_name: str = "base_model") -> None:
    """Every mixture resolves with train disjoint from eval; each '+source' mixture keeps the base draw."""
    for name, res in results.items():
        t = res.table.to_pandas()
        train = set(t.loc[t.split != "eval", "soma_joinid"])
        ev = set(t.loc[t.split == "eval", "soma_joinid"])
        assert train and ev and not (train & ev), name
    base = results[base_name].table.to_pandas()
    base_cells = set(base.loc[(base.component == "base") & (base.split != "eval"), "soma_joinid"])
    for name, res in results.items():
        t = res.table.to_pandas()
        if name.startswith("base_plus") and "balanced" not in name:
            assert base_cells <= set(t.loc[t.split != "eval", "soma_joinid"]), name


def test_demo_mixtures_on_a_simulated_corpus(tmp_path):
    info = simulate_atlas(tmp_path / "sim", 6000, seed=1, n_genes=800)
    store = Store.create(str(tmp_path / "store"))
    ingest(store, read_plan(Path(info["plan"]), {"qc": QCPolicy()}), chunk_size=1000)
    results = {}
    for f in sorted(DEMO_MIXTURES.glob("*.toml")):
        if f.name in {"eval_sets.toml", "base_sketch_fixed_budget.toml"}:  # the sketch one needs >= 100k cells
            continue
        results[f.stem] = resolve(f, store)
    _check_design(results)
    alone = results["malignant_only"].table.to_pandas()
    obs = store.obs(["dataset_id"]).to_pandas().set_index("soma_joinid")
    tr = alone.loc[alone.split != "eval", "soma_joinid"]
    assert set(obs.loc[tr, "dataset_id"]) == {"malignant"}


@needs_shared
def test_shared_mixtures_on_the_real_store(shared_store):
    store = shared_store[0]
    results = {f.stem: resolve(f, store) for f in sorted((EXAMPLES / "shared").glob("*.toml"))
               if f.name != "eval_sets.toml"}
    _check_design(results)
    obs = store.obs(["dataset_id"]).to_pandas().set_index("soma_joinid")
    t = results["base_model"].table.to_pandas()
    ds = set(obs.loc[t.loc[t.split == "train", "soma_joinid"], "dataset_id"])
    assert ds and ds <= {"zheng_pbmc8k", "pbmc3k", "pisces_pbmc1k", "pbmc10k_cite", "pbmc5k_cite", "kang_ifnb"}


@needs_shared
@pytest.mark.slow
def test_every_shared_example_trains_from_the_cli(shared_store, tmp_path):
    """Each example mixture resolves and trains (LDVAE, 2 steps) through the CLI on an HVG axis, including
    those whose datasets measure no gene in common (the default axis then refuses with a hint)."""
    from atlasmix.cli import main

    store = shared_store[0]
    refused_default = []
    for f in sorted((EXAMPLES / "shared").glob("*.toml")):
        if f.name == "eval_sets.toml":
            continue
        man = tmp_path / f"{f.stem}.parquet"
        main(["mix", "resolve", str(f), "--store", store.uri, "--out", str(man), "-q"])
        args = ["train", "ldvae", "--store", store.uri, "--mixture", str(man), "--budget", "steps=2",
                "--n-hidden", "16", "--n-layers", "1", "--no-validation", "--checkpoint-every", "0",
                "--no-progress", "--accelerator", "cpu"]
        try:
            main([*args, "--out", str(tmp_path / f"{f.stem}_default")])
        except SystemExit as e:  # the default all-shared axis is empty for this mixture
            assert e.code == 2
            refused_default.append(f.stem)
        main([*args, "--out", str(tmp_path / f.stem), "--genes", "hvg:200"])
        run = json.loads((tmp_path / f.stem / "run.json").read_text())
        assert run["n_genes"] == 200 and run["training"]["steps"] == 2, f.stem
    assert "base_full" in refused_default  # the case the issue reported: it now trains with --genes hvg
