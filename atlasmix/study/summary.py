"""A study's answer: per-seed scores summarised over seeds with intervals, paired deltas, scaling.

:func:`summarise` (summary and deltas tables), :func:`scaling_tables` (subset-size curves and the
smallest sufficient fraction), both from the per-cell scores (:class:`ScoreCells`) with the two-level
bootstrap of :mod:`atlasmix.study.stats`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from atlasmix.study import stats
from atlasmix.study.tables import DELTAS, HEADLINE_METRIC, SCALING, SCALING_SMALLEST, SUMMARY

#: share of the best score that scFM-dataselection's "smallest sufficient subset" must reach
SCALING_THRESHOLD = 0.95


class ScoreCells:
    """Per-cell score matrices (n_seeds, n_cells) of one model kind by (mixture, budget, eval set), seeds
    sorted; ``column`` ``value`` (the score) or ``baseline_value``."""

    def __init__(self, per_cell: pd.DataFrame, model_kind: str = "ldvae", column: str = "value"):
        self.groups = {}
        pc = per_cell[per_cell["model_kind"] == model_kind]
        for key, g in pc.groupby(["mixture", "budget", "eval_set"], sort=False):
            piv = g.pivot_table(index="seed", columns="cell_index", values=column, dropna=False)
            self.groups[key] = piv.sort_index()

    def get(self, mixture: str, budget: str, eval_set: str, seeds: list[int] | None = None) -> np.ndarray | None:
        """The (n_seeds, n_cells) matrix of a (mixture, budget, eval set), rows ``seeds`` (default all);
        None when the group or one of the seeds is absent."""
        p = self.groups.get((mixture, budget, eval_set))
        if p is None:
            return None
        if seeds is not None:
            if not set(seeds) <= set(p.index):
                return None
            p = p.loc[seeds]
        return p.to_numpy(dtype=float)


#: headline metric of each model kind and the per-cell column its baseline lives in (None: no baseline)
KIND_METRIC = {"ldvae": (HEADLINE_METRIC, None), "geneformer": ("rank_pred_pearson_median", "baseline_value"),
               "scgpt": ("masked_pred_pearson_median", "baseline_value"),
               "scbert": ("masked_pred_pearson_median", "baseline_value")}


def summarise(results: pd.DataFrame, per_cell: pd.DataFrame, reference: str | None, n_bootstrap: int,
              seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """summary and deltas tables (:mod:`atlasmix.study.tables`) of the full-size mixtures.

    Per model kind: its headline metric (:data:`KIND_METRIC`) with a two-level bootstrap interval;
    where the kind has a per-cell baseline (Geneformer's mean-rank baseline), the baseline's mean and
    ``beats_baseline`` = the paired interval of score - baseline lies above 0. LDVAE's kNN macro F1
    is summarised over seeds beside its chance level. Paired deltas against ``reference``.
    """
    full = results[results["strategy"].isna() | (results["strategy"] == "")]
    pc = per_cell[per_cell["strategy"].isna() | (per_cell["strategy"] == "")]
    conv = full[full["metric"] == "converged"].groupby(["model_kind", "mixture", "budget"])["value"].min()

    def under(kind, mix, budget):
        c = conv.get((kind, mix, budget), np.nan)
        return bool(c == 0) if np.isfinite(c) else None

    summ, deltas = [], []
    for kind, (metric, base_col) in KIND_METRIC.items():
        cells = ScoreCells(pc, kind)
        bcells = ScoreCells(pc, kind, base_col) if base_col else None
        for (mix, budget, ev), _ in cells.groups.items():
            v = cells.get(mix, budget, ev)
            row = {"model_kind": kind, "mixture": mix, "budget": budget, "eval_set": ev, "metric": metric,
                   "n_seeds": v.shape[0], "mean": np.nan, "lo": np.nan, "hi": np.nan, "baseline": np.nan,
                   "beats_baseline": None, "undertrained": under(kind, mix, budget)}
            if np.isfinite(v).any():
                row.update({k: x for k, x in stats.mean_of_medians(v, n_bootstrap=n_bootstrap, seed=seed).items()
                            if k in ("mean", "lo", "hi", "n_seeds")})
                if bcells is not None:
                    b = bcells.get(mix, budget, ev)
                    if b is not None and np.isfinite(b).any():
                        row["baseline"] = float(np.mean(np.nanmedian(b, axis=1)))
                        row["beats_baseline"] = stats.paired_delta(v, b, n_bootstrap=n_bootstrap, seed=seed)["lo"] > 0
            summ.append(row)
        if reference is None:
            continue
        for (mix, budget, ev), _ in cells.groups.items():
            ref = cells.groups.get((reference, budget, ev))
            if mix == reference or ref is None:
                continue
            seeds = sorted(set(cells.groups[(mix, budget, ev)].index) & set(ref.index))
            a, b = cells.get(mix, budget, ev, seeds), cells.get(reference, budget, ev, seeds)
            if not seeds or a is None or b is None or not (np.isfinite(a).any() and np.isfinite(b).any()):
                continue
            if a.shape != b.shape:  # e.g. Geneformer cells without a vocabulary gene differ by model
                continue
            d = stats.paired_delta(a, b, n_bootstrap=n_bootstrap, seed=seed)
            deltas.append({"model_kind": kind, "mixture": mix, "reference": reference, "budget": budget,
                           "eval_set": ev, "metric": metric, "n_seeds": d["n_seeds"], "delta": d["delta"],
                           "lo": d["lo"], "hi": d["hi"], "excludes_zero": d["excludes_zero"]})
    # LDVAE kNN macro F1: mean over seeds, percentile interval of a seed bootstrap, chance level as baseline
    other = full[(full["eval_set"] != "-") & (full["model_kind"] == "ldvae") & (full["metric"] == "knn_macro_f1")]
    for (mix, budget, ev, met), g in other.groupby(["mixture", "budget", "eval_set", "metric"]):
        v = g.sort_values("seed")["value"].to_numpy(dtype=float)[:, None]
        r = stats.mean_of_medians(v, n_bootstrap=n_bootstrap, seed=seed)
        ch = full[(full["mixture"] == mix) & (full["eval_set"] == ev) & (full["metric"] == "knn_chance_macro_f1")]["value"]
        base = float(ch.mean()) if len(ch) else np.nan
        summ.append({"model_kind": "ldvae", "mixture": mix, "budget": budget, "eval_set": ev, "metric": met,
                     "n_seeds": r["n_seeds"], "mean": r["mean"], "lo": r["lo"], "hi": r["hi"], "baseline": base,
                     "beats_baseline": (bool(r["lo"] > base) if np.isfinite(base) else None),
                     "undertrained": under("ldvae", mix, budget)})
    return pd.DataFrame(summ, columns=SUMMARY), pd.DataFrame(deltas, columns=DELTAS)


def scaling_tables(per_cell: pd.DataFrame, base: str, n_bootstrap: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """scaling and scaling_smallest tables (:mod:`atlasmix.study.tables`) of the scaling runs."""
    sc = per_cell[per_cell["strategy"].notna() & (per_cell["strategy"] != "") & (per_cell["model_kind"] == "ldvae")]
    rows = []
    for (strategy, fraction, budget, ev), g in sc.groupby(["strategy", "fraction", "budget", "eval_set"]):
        v = g.pivot_table(index="seed", columns="cell_index", values="value", dropna=False).sort_index().to_numpy(float)
        r = stats.mean_of_medians(v, n_bootstrap=n_bootstrap, seed=seed) if np.isfinite(v).any() else \
            {"mean": np.nan, "lo": np.nan, "hi": np.nan, "n_seeds": v.shape[0]}
        rows.append({"model_kind": "ldvae", "base": base, "strategy": strategy, "fraction": float(fraction),
                     "budget": budget, "eval_set": ev, "metric": HEADLINE_METRIC, "n_seeds": r["n_seeds"], "mean": r["mean"],
                     "lo": r["lo"], "hi": r["hi"]})
    scaling = pd.DataFrame(rows, columns=SCALING)
    small = []
    for (strategy, budget, ev), g in scaling.groupby(["strategy", "budget", "eval_set"]):
        g = g.dropna(subset=["mean"]).sort_values("fraction")
        if g.empty:
            continue
        best = float(g["mean"].max())
        thr = SCALING_THRESHOLD * best if best >= 0 else best / SCALING_THRESHOLD
        ok = g[g["mean"] >= thr]
        small.append({"model_kind": "ldvae", "base": base, "strategy": strategy, "budget": budget, "eval_set": ev,
                      "metric": HEADLINE_METRIC, "best_mean": best, "threshold": thr,
                      "smallest_fraction": float(ok["fraction"].iloc[0]) if len(ok) else np.nan})
    return scaling, pd.DataFrame(small, columns=SCALING_SMALLEST)
