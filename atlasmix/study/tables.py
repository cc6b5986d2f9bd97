"""The tables a study writes (``atlasmix study run``), shared by the runner and the report.

Every file lives in the study's output folder ``OUT``:

``results.parquet``
    one row per (grid cell, eval set, metric): the per-run numbers. :data:`RESULTS`
``per_cell.parquet``
    one row per (grid cell, eval set, eval cell): per-cell reconstruction r (LDVAE) or rank prediction r
    and its baseline (Geneformer). :data:`PER_CELL`
``summary.parquet``
    one row per (model kind, mixture, budget, eval set, metric): mean over seeds of the per-seed
    statistic, with a 95 % interval from a two-level bootstrap (seeds resampled, then eval cells within
    each seed's run). ``baseline`` is the score of the metric's baseline where one exists (NaN
    otherwise), ``beats_baseline`` is True / False / None (no baseline). :data:`SUMMARY`
``deltas.parquet``
    one row per (model kind, mixture != reference, budget, eval set, metric): paired delta mixture -
    reference (same seeds, same eval cells), mean over seeds and its 95 % bootstrap interval;
    ``excludes_zero`` marks intervals that do not contain 0. :data:`DELTAS`
``curves.parquet``
    training curves of every run: one row per validation point. :data:`CURVES`
``scaling.parquet``
    subset-size curves: one row per (model kind, base mixture, strategy, fraction, eval set, metric).
    :data:`SCALING`
``scaling_smallest.parquet``
    per (model kind, base, strategy, eval set, metric): the best mean, the 95 %-of-best threshold and
    the smallest fraction whose mean reaches it. :data:`SCALING_SMALLEST`
``checks.json``
    the sanity checks: a list of :data:`CHECK_KEYS` dicts.
``study.json``
    the spec, the grid (run keys, status, times), stage times, machine.
"""

from __future__ import annotations

#: the headline metric (scFM-datamix reconstruction accuracy: median over eval cells of the per-cell
#: Pearson r) and the model kind it belongs to
HEADLINE_METRIC = "recon_pearson_median"
HEADLINE_KIND = "ldvae"

RESULTS = ["run_key", "model_kind", "mixture", "seed", "budget", "fraction", "strategy", "eval_set", "metric", "value"]
PER_CELL = ["run_key", "model_kind", "mixture", "seed", "budget", "fraction", "strategy", "eval_set", "cell_index",
            "soma_joinid", "cell_type", "value", "baseline_value"]
SUMMARY = ["model_kind", "mixture", "budget", "eval_set", "metric", "n_seeds", "mean", "lo", "hi", "baseline",
           "beats_baseline", "undertrained"]
DELTAS = ["model_kind", "mixture", "reference", "budget", "eval_set", "metric", "n_seeds", "delta", "lo", "hi",
          "excludes_zero"]
CURVES = ["run_key", "model_kind", "mixture", "seed", "budget", "fraction", "strategy", "step", "cells_seen", "epoch",
          "train_loss", "validation_loss"]
SCALING = ["model_kind", "base", "strategy", "fraction", "budget", "eval_set", "metric", "n_seeds", "mean", "lo", "hi"]
SCALING_SMALLEST = ["model_kind", "base", "strategy", "budget", "eval_set", "metric", "best_mean", "threshold",
                    "smallest_fraction"]
CHECK_KEYS = ["name", "kind", "eval_set", "subject", "applicable", "passed", "detail"]
