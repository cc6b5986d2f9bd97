"""Synthetic output folders for report tests: a study (``atlasmix study run``) and an evaluation.

The tables follow the contract of :mod:`atlasmix.study.tables` (study) and
:mod:`atlasmix.evaluation.run` (evaluation) column for column; the numbers are random but
internally consistent (intervals contain their means, ``excludes_zero`` agrees with ``lo``/``hi``,
``beats_baseline`` agrees with ``mean`` vs ``baseline``). Nothing here trains a model.

Use :func:`make_study` / :func:`make_evaluation` from a test::

    from study_fixtures import make_study
    info = make_study(tmp_path / "study")
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from atlasmix.study import tables as T

#: mixture names of the default synthetic study (the first is the reference)
MIXTURES = ["base_model", "base_plus_bone_marrow_balanced", "base_plus_tf_atlas", "base_plus_lung_fibroblasts_2x",
            "base_plus_kidney_organoids", "base_plus_all_non_blood_sources_balanced", "base_plus_pbmc_stimulated",
            "base_plus_bone_marrow_cd34_enriched", "blood_only_half", "base_plus_brain_organoids_balanced"]
#: eval-set names of the default synthetic study
EVAL_SETS = ["heldout_blood_donors", "bone_marrow_heldout_donors", "kang_ifnb_stimulated", "tf_atlas_heldout",
             "pbmc3k"]
STRATEGIES = ["uniform", "balanced_by_cell_type", "dataset_stratified"]
FRACTIONS = [0.01, 0.03, 0.1, 0.3, 0.6, 1.0]
HEADLINE = "recon_pearson_median"
GF_METRIC = "rank_pred_pearson_median"


def _interval(rng: np.random.Generator, mean: float, width: float) -> tuple[float, float]:
    lo = mean - width * rng.uniform(0.4, 1.0)
    hi = mean + width * rng.uniform(0.4, 1.0)
    return float(lo), float(hi)


def make_study(out: str | Path, *, mixtures: list[str] | None = None, eval_sets: list[str] | None = None,
               seeds: tuple[int, ...] = (0, 1, 2), budget: str = "cells=200000", n_points: int = 20,
               strategies: list[str] | None = None, fractions: list[float] | None = None,
               scaling: bool = True, seed: int = 0) -> dict:
    """Write a synthetic study folder (every table of :mod:`atlasmix.study.tables`) to ``out``.

    Parameters
    ----------
    out : path
        Folder to create (its parents too).
    mixtures, eval_sets : list of str, optional
        Default :data:`MIXTURES` (10, the first is the reference) and :data:`EVAL_SETS` (5).
    seeds : tuple of int
        Training seeds of every grid cell.
    budget : str
        The one budget label of the study.
    n_points : int
        Validation points per run in ``curves.parquet``.
    strategies, fractions : list, optional
        The subset-size grid of ``scaling.parquet`` (default 3 strategies x 6 fractions).
    scaling : bool
        Write ``scaling.parquet`` / ``scaling_smallest.parquet``.
    seed : int
        RNG seed of the numbers.

    Returns
    -------
    dict
        ``dir`` (Path), ``reference`` (str), ``mixtures``, ``eval_sets``, ``seeds``, ``n_runs`` (int),
        ``undertrained`` (mixture whose runs are undertrained), ``failed_check`` (its name),
        ``gf_not_beating`` (list of (mixture, eval set) of the Geneformer rows that do not beat
        their baseline), ``no_validation_run`` (run key whose curve has no validation loss).

    Design
    ------
    LDVAE runs for every mixture x seed (reconstruction r, and kNN macro F1 with the chance level as
    its baseline, always beaten), Geneformer runs for the first two mixtures (rank prediction with a
    mean-rank baseline: the reference beats it on no eval set, the other mixture on every eval set).
    Mixture index 2 is undertrained. One check failed, one not applicable.
    """
    rng = np.random.default_rng(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mixtures = list(mixtures or MIXTURES)
    eval_sets = list(eval_sets or EVAL_SETS)
    strategies = list(strategies or STRATEGIES)
    fractions = list(fractions or FRACTIONS)
    ref = mixtures[0]
    undertrained = mixtures[2] if len(mixtures) > 2 else None
    gf_mix = mixtures[:2]

    runs = []  # (run_key, kind, mixture, seed, fraction, strategy)
    for m in mixtures:
        for s in seeds:
            runs.append((f"ldvae/{m}/s{s}/{budget}", "ldvae", m, s, np.nan, None))
    for m in gf_mix:
        for s in seeds:
            runs.append((f"geneformer/{m}/s{s}/{budget}", "geneformer", m, s, np.nan, None))

    # per-run results
    level = {m: rng.uniform(0.35, 0.8) for m in mixtures}
    eff = {e: rng.normal(0, 0.05) for e in eval_sets}
    rows = []
    for key, kind, m, s, f, st in runs:
        for e in eval_sets:
            if kind == "ldvae":
                rows.append((key, kind, m, s, budget, f, st, e, HEADLINE, level[m] + eff[e] + rng.normal(0, 0.02)))
                rows.append((key, kind, m, s, budget, f, st, e, "knn_macro_f1", rng.uniform(0.4, 0.9)))
            else:
                rows.append((key, kind, m, s, budget, f, st, e, GF_METRIC, rng.uniform(0.2, 0.6)))
    res = pd.DataFrame(rows, columns=T.RESULTS)
    res.to_parquet(out / "results.parquet", index=False)

    # summary: mean over seeds with an interval
    srows = []
    gf_not_beating = []
    for (kind, m, e, metric), g in res.groupby(["model_kind", "mixture", "eval_set", "metric"], sort=False):
        mean = float(g["value"].mean())
        lo, hi = _interval(rng, mean, 0.03)
        baseline, beats = np.nan, None
        if metric == "knn_macro_f1":  # as the runner: chance level, beaten when the interval is above it
            baseline = 1 / 8
            beats = bool(lo > baseline)
        if metric == GF_METRIC:
            beats = m != ref
            baseline = mean - 0.1 if beats else mean + 0.1
            if not beats:
                gf_not_beating.append((m, e))
        srows.append((kind, m, budget, e, metric, len(g), mean, lo, hi, baseline, beats,
                      bool(kind == "ldvae" and m == undertrained)))
    summ = pd.DataFrame(srows, columns=T.SUMMARY)
    summ.to_parquet(out / "summary.parquet", index=False)

    # paired deltas vs the reference
    drows = []
    s_idx = summ.set_index(["model_kind", "mixture", "eval_set", "metric"])["mean"]
    keyed = summ.set_index(["model_kind", "mixture", "budget", "eval_set", "metric"])
    for (kind, m, b, e, metric), r in keyed.iterrows():
        if m == ref:
            continue
        d = float(r["mean"] - s_idx[(kind, ref, e, metric)])
        lo, hi = _interval(rng, d, 0.04)
        drows.append((kind, m, ref, b, e, metric, int(r["n_seeds"]), d, lo, hi, bool(lo > 0 or hi < 0)))
    dl = pd.DataFrame(drows, columns=T.DELTAS)
    dl.to_parquet(out / "deltas.parquet", index=False)

    # curves: n_points validation points per run; one run without a validation split
    crows = []
    no_val = runs[3][0] if len(runs) > 3 else runs[0][0]
    total = int(budget.split("=")[1]) if budget.startswith("cells=") else 200_000
    for key, kind, m, s, f, st in runs:
        start = 900.0 if kind == "ldvae" else 9.0
        floor = start * rng.uniform(0.3, 0.5)
        rate = rng.uniform(3, 8)
        for i in range(n_points):
            seen = int(total * (i + 1) / n_points)
            x = (i + 1) / n_points
            tr = floor + (start - floor) * np.exp(-rate * x) + rng.normal(0, start * 0.005)
            va = np.nan if key == no_val else tr * 1.03 + rng.normal(0, start * 0.005)
            crows.append((key, kind, m, s, budget, f, st, (i + 1) * 10, seen, x * 2, tr, va))
    pd.DataFrame(crows, columns=T.CURVES).to_parquet(out / "curves.parquet", index=False)

    # subset-size scaling of the reference
    if scaling:
        sc = []
        for st in strategies:
            top = rng.uniform(0.6, 0.75)
            k = rng.uniform(20, 60)
            for f in fractions:
                for e in eval_sets:
                    mean = top * (1 - np.exp(-k * f)) + eff[e]
                    lo, hi = _interval(rng, mean, 0.02 + 0.03 * (1 - f))
                    sc.append(("ldvae", ref, st, f, budget, e, HEADLINE, len(seeds), mean, lo, hi))
        scal = pd.DataFrame(sc, columns=T.SCALING)
        scal.to_parquet(out / "scaling.parquet", index=False)
        sm = []
        for (kind, base, st, b, e, metric), g in scal.groupby(["model_kind", "base", "strategy", "budget", "eval_set",
                                                               "metric"], sort=False):
            best = float(g["mean"].max())
            thr = 0.95 * best
            smallest = float(g.loc[g["mean"] >= thr, "fraction"].min())
            sm.append((kind, base, st, b, e, metric, best, thr, smallest))
        pd.DataFrame(sm, columns=T.SCALING_SMALLEST).to_parquet(out / "scaling_smallest.parquet", index=False)

    checks = [
        {"name": "no_train_eval_overlap", "kind": "overlap", "eval_set": e, "subject": "all runs",
         "applicable": True, "passed": True, "detail": "0 shared cells by soma_joinid and by count fingerprint"}
        for e in eval_sets]
    checks += [
        {"name": "seeds_differ", "kind": "determinism", "eval_set": None, "subject": ref, "applicable": True,
         "passed": True, "detail": "per-seed medians differ (sd 0.004)"},
        {"name": "reference_beats_mean_expression", "kind": "baseline", "eval_set": eval_sets[0], "subject": ref,
         "applicable": True, "passed": False,
         "detail": "reference LDVAE median r 0.412 <= mean-expression baseline 0.430 on " + eval_sets[0]},
        {"name": "geneformer_beats_mean_rank", "kind": "baseline", "eval_set": None, "subject": "geneformer",
         "applicable": False, "passed": None, "detail": "no Geneformer run in the scaling grid"},
    ]
    (out / "checks.json").write_text(json.dumps(checks, indent=1) + "\n")
    doc = {"spec": {"name": "synthetic_blood_composition", "reference": ref, "seeds": list(seeds),
                    "budgets": [budget]},
           "grid": [{"run_key": r[0], "model_kind": r[1], "mixture": r[2], "seed": r[3], "status": "done",
                     "seconds": 12.5} for r in runs],
           "stages": {"train": 100.0, "evaluate": 20.0}, "machine": {"cpus": 2}}
    (out / "study.json").write_text(json.dumps(doc, indent=1) + "\n")
    return {"dir": out, "reference": ref, "mixtures": mixtures, "eval_sets": eval_sets, "seeds": list(seeds),
            "n_runs": len(runs), "undertrained": undertrained, "failed_check": "reference_beats_mean_expression",
            "gf_not_beating": gf_not_beating, "no_validation_run": no_val}


def make_evaluation(out: str | Path, *, n_models: int = 8, eval_sets: list[str] | None = None,
                    n_cells: int = 300, seed: int = 0) -> Path:
    """Write a synthetic ``atlasmix eval run`` folder (results, per_cell, few_shot.csv, evaluation.json).

    ``n_models`` LDVAE models with long names (mixtures of :data:`MIXTURES`), a PCA baseline, the
    ``data`` pseudo-model, and one Geneformer model with rank prediction scores.

    Returns
    -------
    Path
        ``out``.
    """
    rng = np.random.default_rng(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    eval_sets = list(eval_sets or EVAL_SETS[:3])
    models = [(f"ldvae_{MIXTURES[i % len(MIXTURES)]}_s{i // len(MIXTURES)}", MIXTURES[i % len(MIXTURES)])
              for i in range(n_models)]
    rows, pcs, fs = [], [], []
    for e in eval_sets:
        n_types = int(rng.integers(4, 12))
        rows.append(("data", "", e, "n_cells", float(n_cells)))
        rows.append(("data", "", e, "chance_macro_f1", 1.0 / n_types))
        for name, mix in models + [("pca", "")]:
            for met in ("knn_macro_f1", "knn_accuracy", "nmi", "ari"):
                rows.append((name, mix, e, met, rng.uniform(0.3, 0.9)))
            for f in (0.1, 0.5, 1.0):
                for s in (0, 1):
                    fs.append((name, mix, e, f, s, int(f * n_cells / 2), 1.0, rng.uniform(0.3, 0.9),
                               rng.uniform(0.2, 0.8)))
        for name, mix in models:
            r = np.clip(rng.normal(rng.uniform(0.3, 0.7), 0.1, n_cells), -1, 1)
            rows += [(name, mix, e, "recon_pearson_median", float(np.median(r))),
                     (name, mix, e, "recon_pearson_iqr", float(np.subtract(*np.percentile(r, [75, 25])))),
                     (name, mix, e, "recon_r2_median", float(np.median(r) ** 2))]
            pcs.append(pd.DataFrame({"model": name, "mixture": mix, "eval_set": e, "cell_id": np.arange(n_cells),
                                     "soma_joinid": np.arange(n_cells), "dataset_id": "d", "cell_type": "t",
                                     "batch_seen": "False", "pearson_r": r, "r2": r ** 2}))
        gf = "geneformer_base_plus_bone_marrow_balanced"
        for met in ("knn_macro_f1", "knn_accuracy"):
            rows.append((gf, MIXTURES[1], e, met, rng.uniform(0.3, 0.9)))
        rows += [(gf, MIXTURES[1], e, "rank_pred_pearson_median", rng.uniform(0.1, 0.4)),
                 (gf, MIXTURES[1], e, "rank_pred_baseline_pearson_median", rng.uniform(0.4, 0.6))]
    pd.DataFrame(rows, columns=["model", "mixture", "eval_set", "metric", "value"]).to_parquet(
        out / "results.parquet", index=False)
    pd.concat(pcs, ignore_index=True).to_parquet(out / "per_cell.parquet", index=False)
    pd.DataFrame(fs, columns=["model", "mixture", "eval_set", "fraction", "seed", "n_train", "C", "accuracy",
                              "macro_f1"]).to_csv(out / "few_shot.csv", index=False)
    doc = {"eval_sets": [{"name": e, "kind": "store", "n_cells": n_cells,
                          "definition": {"where": "dataset_id = 'blood_atlas_2023_heldout_donors_" + "x" * 120 + "'"}}
                         for e in eval_sets]}
    (out / "evaluation.json").write_text(json.dumps(doc) + "\n")
    return out
