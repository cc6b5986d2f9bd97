"""Studies: budgets, seeds, intervals, resumable grids and sanity checks, on a simulated corpus."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from atlasmix.errors import AtlasmixError
from atlasmix.study import stats
from atlasmix.study.checks import run_checks
from atlasmix.training.budget import Budget, convergence
from tests.conftest import simulated_store

DEMO = Path(__file__).resolve().parents[1] / "atlasmix" / "study" / "demo"


# ---------------------------------------------------------------------------------------------- budgets
def test_budget_resolves_to_steps_in_every_unit():
    assert Budget.parse("steps=40").max_steps(n_train=1000, batch_size=128) == 40
    assert Budget.parse("epochs=3").max_steps(n_train=1000, batch_size=128) == 3 * 8
    # cells seen: 5 whole epochs of 1,000 cells (8 batches each) + 200 cells (2 batches of up to 128)
    assert Budget.parse("cells=5200").max_steps(n_train=1000, batch_size=128) == 5 * 8 + 2
    # compute matching: a tiny and a large corpus see the same cells
    for n in (90, 462, 20_000):
        b = Budget.parse("cells=40000")
        steps = b.max_steps(n_train=n, batch_size=128)
        bpe = -(-n // 128)
        full, rest = divmod(steps, bpe)
        seen = full * n + min(rest * 128, n)
        assert 40000 <= seen < 40000 + 128, (n, seen)
    c = Budget.parse("converged:epochs=100,patience=3")
    assert c.until_converged and c.patience == 3 and c.label == "converged:epochs=100,patience=3"
    assert Budget.parse(c.label) == c
    for bad in ("cells", "minutes=3", "cells=0", "converged:steps=10,speed=2"):
        with pytest.raises(AtlasmixError, match="bad budget"):
            Budget.parse(bad)
    with pytest.raises(AtlasmixError, match="empty"):
        Budget.parse("cells=10").max_steps(0, 128)
    # KL warm-up: a share of the steps for cells/steps budgets, scvi-tools' own for epochs budgets
    assert Budget.parse("cells=10000").kl_warmup_steps(400) == 100
    assert Budget.parse("epochs=10").kl_warmup_steps(400) is None


def test_convergence_rule_on_curves():
    flat = pd.DataFrame({"validation_loss": [500, 300, 200, 150, 140, 139.5, 139.4, 139.3], "train_loss": 1.0})
    falling = pd.DataFrame({"validation_loss": [500, 400, 300, 250, 200, 180, 160, 140], "train_loss": 1.0})
    assert convergence(flat)["converged"] is True
    f = convergence(falling)
    assert f["converged"] is False and f["improvement_last_quarter"] > 0.1
    # no validation split: the training loss is monitored
    t = convergence(pd.DataFrame({"validation_loss": np.nan, "train_loss": [9, 5, 3, 2.99, 2.99]}))
    assert t["monitor"] == "train_loss" and t["converged"] is True
    assert convergence(pd.DataFrame({"validation_loss": [1.0, 2.0], "train_loss": 1.0}))["converged"] is None


# ---------------------------------------------------------------------------------------------- intervals
def _direct_bootstrap(v, r, n_bootstrap, seed, paired):
    """The two-level bootstrap written out replicate by replicate (the reference for the vectorised one)."""
    si, ci = stats.draws(v.shape[0], v.shape[1], n_bootstrap, seed)
    reps = []
    for b in range(n_bootstrap):
        vals = []
        for s in si[b]:
            x = np.median(v[s][ci[b]])
            if paired:
                x -= np.median(r[s][ci[b]])
            vals.append(x)
        reps.append(np.mean(vals))
    return np.quantile(reps, 0.025), np.quantile(reps, 0.975)


def test_intervals_match_a_direct_computation():
    rng = np.random.default_rng(0)
    cell_effect = rng.normal(0.6, 0.1, size=300)  # eval cells differ; runs share them
    v = cell_effect + rng.normal(0, 0.02, size=(3, 300)) + np.array([[0.0], [0.01], [-0.01]])
    r = cell_effect + rng.normal(0, 0.02, size=(3, 300)) - 0.03
    m = stats.mean_of_medians(v, n_bootstrap=300, seed=5)
    lo, hi = _direct_bootstrap(v, None, 300, 5, paired=False)
    assert m["lo"] == pytest.approx(lo) and m["hi"] == pytest.approx(hi)
    assert m["mean"] == pytest.approx(np.mean(np.median(v, axis=1)))
    assert m["lo"] < m["mean"] < m["hi"]
    d = stats.paired_delta(v, r, n_bootstrap=300, seed=5)
    lo, hi = _direct_bootstrap(v, r, 300, 5, paired=True)
    assert d["lo"] == pytest.approx(lo) and d["hi"] == pytest.approx(hi)
    assert d["excludes_zero"] and 0 < d["lo"] < 0.03 < d["hi"]
    # pairing: the shared cell effect cancels, so the delta's interval is narrower than either mean's
    assert d["hi"] - d["lo"] < m["hi"] - m["lo"]
    # no difference -> the interval holds 0
    same = stats.paired_delta(v, v + rng.normal(0, 0.001, size=v.shape), n_bootstrap=300, seed=1)
    assert not same["excludes_zero"]
    with pytest.raises(ValueError):
        stats.paired_delta(v, r[:2])


def test_checks_pass_and_fail_on_known_scores():
    rng = np.random.default_rng(1)
    base = rng.normal(0.5, 0.05, size=(3, 200))
    scores = {("a_only", "a_set"): base + 0.2, ("b_only", "a_set"): base,
              ("a_only", "b_set"): base, ("b_only", "b_set"): base + rng.normal(0.001, 0.05, size=base.shape),  # not significant
              ("base_model", "a_set"): base, ("base_plus_a", "a_set"): base + 0.1}
    checks = run_checks({"a": "a_set", "b": "b_set"}, ["a_only", "b_only", "base_model", "base_plus_a"],
                        "base_model", lambda m, e: scores.get((m, e)), n_bootstrap=200)
    by = {c["name"]: c for c in checks}
    assert by["diagonal:a"]["passed"] is True
    assert by["diagonal:b"]["passed"] is False and "delta" in by["diagonal:b"]["detail"]
    assert by["adding_helps:a"]["passed"] is True
    assert by["adding_helps:b"]["applicable"] is False and by["adding_helps:b"]["passed"] is None
    worse = dict(scores)
    worse[("base_plus_a", "a_set")] = base - 0.05
    by = {c["name"]: c for c in run_checks({"a": "a_set"}, ["a_only", "b_only", "base_model", "base_plus_a"],
                                           "base_model", lambda m, e: worse.get((m, e)), n_bootstrap=200)}
    assert by["adding_helps:a"]["passed"] is False


# ---------------------------------------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def sim_store(tmp_path_factory):
    return simulated_store(tmp_path_factory.mktemp("sim"), 5000, seed=3, n_genes=1000)[0]


def _study(tmp_path: Path, mixtures: list[str], budget: str, seeds=(0, 1), extra: str = "") -> Path:
    p = tmp_path / "study.toml"
    p.write_text(f'''name = "t"
mixtures_dir = "{DEMO / 'mixtures'}"
eval_sets = "{DEMO / 'mixtures' / 'eval_sets.toml'}"
mixtures = {json.dumps(mixtures)}
reference = "base_model"
seeds = {json.dumps(list(seeds))}
budgets = ["{budget}"]
[genes]
n_hvg = 150
max_cells = 2000
[ldvae]
batch_size = 128
lr = 0.03
n_hidden = 32
[evaluation]
max_cells_per_set = 150
n_bootstrap = 200
knn = true
[checks.sources]
malignant = "malignant_heldout_donor"
perturbation = "perturbation_holdout"
{extra}''')
    return p


def test_budgets_are_met_and_recorded(sim_store, tmp_path):
    from atlasmix.mixing import resolve, write_manifest
    from atlasmix.training.ldvae import train_ldvae

    genes = sim_store.var()["feature_id"].astype(str).tolist()[:200]
    kw = dict(accelerator="cpu", batch_size=64, genes=genes, checkpoint_every=0, progress=False, prior_cells=500,
              io_batch_size=2048, n_hidden=16)
    runs = {}
    for m in ("tf_atlas_only", "base_model"):  # a few hundred vs a few thousand training cells
        man = tmp_path / f"{m}.parquet"
        write_manifest(resolve(DEMO / "mixtures" / f"{m}.toml", sim_store), man)
        runs[m] = train_ldvae(sim_store, man, tmp_path / m, budget="cells=3000", **kw)
    for m, r in runs.items():
        tr = r["training"]
        assert 3000 <= tr["cells_seen"] < 3000 + 64, m
        assert tr["steps"] == r["budget"]["max_steps"] and r["budget"]["label"] == "cells=3000"
        assert tr["epochs"] == pytest.approx(tr["cells_seen"] / r["n_cells"]["train"], rel=1e-3)
        assert np.isfinite(tr["final_train_loss"]) and np.isfinite(tr["final_validation_loss"])
        assert isinstance(tr["convergence"]["converged"], bool) and tr["convergence"]["monitor"] == "validation_loss"
        curve = pd.read_csv(tmp_path / m / "training_curve.csv")
        assert list(curve.columns) == ["step", "cells_seen", "epoch", "train_loss", "validation_loss"]
        assert curve["step"].iloc[-1] == tr["steps"] and curve["cells_seen"].is_monotonic_increasing
    # the small corpus is repeated many times, the large one is not: compute-matched, not epoch-matched
    assert runs["tf_atlas_only"]["training"]["epochs"] > 2 * runs["base_model"]["training"]["epochs"]
    man = tmp_path / "base_model.parquet"
    s = train_ldvae(sim_store, man, tmp_path / "steps", budget="steps=7", **kw)
    assert s["training"]["steps"] == 7
    # until converged: a patience of 1 validation point at a tiny learning rate stops early, and says so
    c = train_ldvae(sim_store, man, tmp_path / "conv", budget="converged:epochs=30,patience=1", lr=1e-7, **kw)
    assert c["training"]["stopped_early"] and c["training"]["steps"] < c["budget"]["max_steps"]
    assert c["training"]["convergence"]["converged"] is True and "patience" not in c["training"]["convergence"]["rule"] \
        or "did not improve" in c["training"]["convergence"]["rule"]


@pytest.mark.slow
def test_study_grid_seeds_resume_and_reproducibility(sim_store, tmp_path):
    from atlasmix.mixing import read_manifest
    from atlasmix.study.runner import run_study

    mixtures = ["base_model", "base_plus_malignant", "malignant_only", "perturbation_only"]
    spec = _study(tmp_path, mixtures, "cells=4000")
    out = tmp_path / "out"
    doc = run_study(spec, sim_store, out, log=lambda s: None, report=False)
    assert doc["n_runs"] == 8 and {g["status"] for g in doc["grid"]} == {"trained"}
    # the seed changes the manifest draw and the weights, and both are recorded
    t0, _ = read_manifest(out / "manifests" / "base_model__s0.parquet")
    t1, _ = read_manifest(out / "manifests" / "base_model__s1.parquet")
    assert set(t0["soma_joinid"].to_pylist()) != set(t1["soma_joinid"].to_pylist())
    run = json.loads(next((out / "runs").glob("base_model__*__s1__*/ldvae/run.json")).read_text())
    assert run["options"]["seed"] == 1 and run["manifest"]["path"].endswith("base_model__s1.parquet")
    res = pd.read_parquet(out / "results.parquet")
    summ = pd.read_parquet(out / "summary.parquet")
    deltas = pd.read_parquet(out / "deltas.parquet")
    head = summ[summ["metric"] == "recon_pearson_median"]
    assert len(head) == len(mixtures) * 5 and (head["n_seeds"] == 2).all()
    ok = head.dropna(subset=["mean"])
    assert len(ok) and (ok["lo"] <= ok["mean"]).all() and (ok["mean"] <= ok["hi"]).all()
    # the summary's mean is the mean over seeds of each run's median r
    per_run = res[res["metric"] == "recon_pearson_median"].groupby(["mixture", "eval_set"])["value"].mean()
    for _, row in ok.iterrows():
        assert row["mean"] == pytest.approx(per_run[(row["mixture"], row["eval_set"])], abs=1e-9)
    assert set(deltas["mixture"]) == set(mixtures) - {"base_model"} and (deltas["reference"] == "base_model").all()
    curves = pd.read_parquet(out / "curves.parquet")
    assert curves.groupby("run_key").size().min() >= 5
    checks = json.loads((out / "checks.json").read_text())
    assert {c["name"] for c in checks} == {"diagonal:malignant", "adding_helps:malignant", "diagonal:perturbation",
                                           "adding_helps:perturbation"}
    assert not next(c for c in checks if c["name"] == "adding_helps:perturbation")["applicable"]

    # a finished study recomputes nothing
    again = run_study(spec, sim_store, out, log=lambda s: None, report=False)
    assert {g["status"] for g in again["grid"]} == {"cached"}
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet"), res)
    # a half-finished one recomputes only what is missing: one run lost entirely, one lost its scores
    dirs = sorted((out / "runs").iterdir())
    shutil.rmtree(dirs[0])
    (dirs[1] / "done.json").unlink()
    (dirs[1] / "scores.parquet").unlink()
    part = run_study(spec, sim_store, out, log=lambda s: None, report=False)
    status = {g["run_dir"]: g["status"] for g in part["grid"]}
    assert status[dirs[0].name] == "trained" and status[dirs[1].name] == "scored"
    assert sum(s == "cached" for s in status.values()) == len(status) - 2
    pd.testing.assert_frame_equal(pd.read_parquet(out / "results.parquet").drop(columns="value"),
                                  res.drop(columns="value"))
    # ... and from scratch, its grid cells sent to 2 dask.distributed worker processes, the same
    # machine gives the same table (train_wall_s is a measurement). Each task runs torch with its
    # worker's thread count; torch's CPU kernels sum in an order that depends on it (with 1 thread
    # instead of 2 the values move in the 4th decimal), so the workers get the serial run's 2 threads
    import os

    from atlasmix.cluster import dask_client

    fresh = tmp_path / "fresh"
    with dask_client(None, 2, threads_per_worker=max(1, os.cpu_count() or 1)) as client:
        d = run_study(spec, sim_store, fresh, log=lambda s: None, report=False, client=client)
        assert d["dask_workers"] == 2
        assert "run_grid_cell" in client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.task_prefixes))
    a = pd.read_parquet(out / "results.parquet")
    b = pd.read_parquet(fresh / "results.parquet")
    keep = a["metric"] != "train_wall_s"
    pd.testing.assert_frame_equal(a[keep].reset_index(drop=True), b[keep].reset_index(drop=True))


@pytest.mark.slow
def test_a_one_step_budget_fails_the_sanity_checks(sim_store, tmp_path):
    from atlasmix.study.runner import run_study

    spec = _study(tmp_path, ["base_model", "base_plus_malignant", "malignant_only", "perturbation_only"], "steps=1",
                  seeds=(0, 1, 2))
    doc = run_study(spec, sim_store, tmp_path / "out", log=lambda s: None, report=False)
    assert doc["all_checks_passed"] is False
    diag = [c for c in doc["checks"] if c["kind"] == "diagonal" and c["applicable"]]
    assert diag and not all(c["passed"] for c in diag)
    summ = pd.read_parquet(tmp_path / "out" / "summary.parquet")
    assert summ["undertrained"].fillna(True).all()  # one step never passes the plateau rule


def test_bad_study_specs_are_refused(tmp_path):
    from atlasmix.study.spec import load_study

    for text, msg in (('name = "x"\nseeds = []\n', "seeds"), ('name = "x"\nbudgets = ["hours=2"]\n', "budget"),
                      ('name = "x"\nmixtures = ["a"]\nreference = "b"\n', "reference"),
                      ('name = "x"\nfoo = 1\n', "unknown key"),
                      ('name = "x"\n[scaling]\nbase = "a"\nfractions = [0, 0.5]\n', "fractions")):
        p = tmp_path / "s.toml"
        p.write_text(text)
        with pytest.raises(AtlasmixError, match=msg):
            load_study(p)


@pytest.mark.slow
def test_scaling_curves(sim_store, tmp_path):
    from atlasmix.study.runner import run_study

    spec = _study(tmp_path, ["malignant_only"], "cells=2000", seeds=(0, 1),
                  extra='[scaling]\nbase = "malignant_only"\nfractions = [0.2, 1.0]\nstrategies = ["random", "balanced"]\n')
    spec.write_text(spec.read_text().replace('reference = "base_model"\n', ""))
    out = tmp_path / "out"
    doc = run_study(spec, sim_store, out, log=lambda s: None, report=False)
    assert doc["n_runs"] == 2 + 2 * 2 * 2
    from atlasmix.mixing import read_sidecar

    n = {f: read_sidecar(out / "manifests" / f"malignant_only.random.f{f}__s0.parquet")["counts"]["train"]
         for f in ("0.2", "1")}
    assert n["0.2"] == pytest.approx(0.2 * n["1"], rel=0.1)
    sc = pd.read_parquet(out / "scaling.parquet")
    assert set(sc["strategy"]) == {"random", "balanced"} and set(sc["fraction"]) == {0.2, 1.0}
    assert (sc["n_seeds"] == 2).all()
    small = pd.read_parquet(out / "scaling_smallest.parquet")
    ok = small.dropna(subset=["best_mean"])
    assert len(ok) and ok["smallest_fraction"].isin([0.2, 1.0]).all()
    assert (ok["threshold"] <= ok["best_mean"]).all()


@pytest.mark.slow
def test_geneformer_runs_are_scored_against_their_baseline(sim_store, tmp_path):
    from atlasmix.study.runner import run_study

    spec = _study(tmp_path, ["base_model", "malignant_only"], "cells=2000", seeds=(0, 1),
                  extra='[geneformer]\nmixtures = ["base_model"]\npreset = "tiny"\nmax_len = 64\nbatch_size = 8\n'
                        'budget = "steps=4"\nmax_rank_cells = 30\n')
    out = tmp_path / "out"
    doc = run_study(spec, sim_store, out, log=lambda s: None)
    assert doc["n_runs"] == 2 * 2 + 2
    gf = [g for g in doc["grid"] if g["run_dir"].startswith("geneformer__")]
    assert len(gf) == 2 and {g["seed"] for g in gf} == {0, 1}
    run = json.loads(next((out / "runs").glob("geneformer__*__s1__*/geneformer/run.json")).read_text())
    assert run["training"]["steps"] == 4 and run["budget"]["label"] == "steps=4" and run["options"]["seed"] == 1
    summ = pd.read_parquet(out / "summary.parquet")
    g = summ[summ["model_kind"] == "geneformer"]
    assert set(g["metric"]) == {"rank_pred_pearson_median"} and set(g["mixture"]) == {"base_model"}
    scored = g.dropna(subset=["mean"])
    assert len(scored) and scored["baseline"].notna().all() and scored["beats_baseline"].isin([True, False]).all()
    # beats_baseline is the paired interval of score - baseline, recomputed here from the per-cell table
    from atlasmix.study import stats

    pc = pd.read_parquet(out / "per_cell.parquet")
    row = scored.iloc[0]
    cells = pc[(pc["model_kind"] == "geneformer") & (pc["eval_set"] == row["eval_set"])]
    v = cells.pivot_table(index="seed", columns="cell_index", values="value", dropna=False).sort_index().to_numpy()
    b = cells.pivot_table(index="seed", columns="cell_index", values="baseline_value",
                          dropna=False).sort_index().to_numpy()
    assert row["beats_baseline"] == (stats.paired_delta(v, b, n_bootstrap=200, seed=0)["lo"] > 0)
    assert (pd.read_parquet(out / "curves.parquet")["model_kind"] == "geneformer").any()
    html = Path(doc["report"]).read_text()
    if (~scored["beats_baseline"].astype(bool)).any():  # a 4-step model is labelled, never shown as a result
        assert "does not beat its baseline" in html


@pytest.mark.slow
def test_scgpt_and_scbert_runs_beside_ldvae_in_a_study(sim_store, tmp_path):
    """A study lists scGPT and scBERT next to LDVAE: each trains per seed on its mixture, is scored by
    masked prediction against the per-gene mean baseline, and the summary and report hold every kind."""
    from atlasmix.study.runner import run_study

    (tmp_path / "scbert_genes.txt").write_text("\n".join(sim_store.var()["feature_name"].astype(str)[:400]) + "\n")
    spec = _study(tmp_path, ["base_model"], "cells=2000", seeds=(0, 1),
                  extra='[scgpt]\npreset = "tiny"\nmax_len = 64\nbatch_size = 8\nbudget = "steps=4"\n'
                        'max_scored_cells = 30\n[scbert]\ngenes = "scbert_genes.txt"\nbatch_size = 4\n'
                        'budget = "steps=4"\nmax_scored_cells = 30\n')
    out = tmp_path / "out"
    doc = run_study(spec, sim_store, out, log=lambda s: None)
    assert doc["n_runs"] == 2 + 2 + 2
    for kind in ("scgpt", "scbert"):
        runs = [g for g in doc["grid"] if g["run_dir"].startswith(f"{kind}__")]
        assert len(runs) == 2 and {g["seed"] for g in runs} == {0, 1}
        run = json.loads(next((out / "runs").glob(f"{kind}__*__s1__*/{kind}/run.json")).read_text())
        assert run["training"]["steps"] == 4 and run["options"]["seed"] == 1
    summ = pd.read_parquet(out / "summary.parquet")
    assert {"ldvae", "scgpt", "scbert"} <= set(summ["model_kind"])
    for kind in ("scgpt", "scbert"):
        g = summ[summ["model_kind"] == kind]
        assert set(g["metric"]) == {"masked_pred_pearson_median"} and set(g["mixture"]) == {"base_model"}
        scored = g.dropna(subset=["mean"])
        assert len(scored) and scored["baseline"].notna().all()
    pc = pd.read_parquet(out / "per_cell.parquet")
    assert pc.loc[pc["model_kind"] == "scgpt", "baseline_value"].notna().mean() > 0.5
    assert {"scgpt", "scbert"} <= set(pd.read_parquet(out / "curves.parquet")["model_kind"])
    html = Path(doc["report"]).read_text()
    assert "scgpt" in html and "scbert" in html
    # rerun: every grid cell cached
    doc2 = run_study(spec, sim_store, out, log=lambda s: None)
    assert all(g["status"] == "cached" for g in doc2["grid"])
