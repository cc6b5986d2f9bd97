"""Uncertainty of a study's numbers: a two-level bootstrap over seeds and eval cells.

A study's headline number for (mixture, eval set) is the **mean over seeds of the per-run
statistic** (the median over eval cells of the per-cell Pearson r, scFM-datamix). Its 95 % interval
comes from a two-level (hierarchical) percentile bootstrap (Efron & Tibshirani 1993, ch. 13;
Davison & Hinkley 1997, section 3.8, resampling both stages of a nested design):

1. draw ``S`` seeds with replacement from the ``S`` seeds run;
2. draw the eval set's ``n`` cells with replacement, one draw per replicate shared by every run
   (every run scores the same eval cells, so runs stay paired);
3. the replicate's value is the mean over the drawn seeds of the statistic on the drawn cells.

The interval is the 2.5th and 97.5th percentiles of ``n_bootstrap`` replicates. A **paired delta**
(mixture - reference) uses the same drawn seeds and cells for both sides (seed ``s`` of the mixture
is paired with seed ``s`` of the reference: both drew their shared components from the same seed),
so what the two runs have in common cancels.
"""

from __future__ import annotations

import numpy as np


def _stat_on_draw(values: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Median over the drawn cells per (replicate, seed): values (S, n), cells (B, n) -> (B, S)."""
    S = values.shape[0]
    out = np.empty((cells.shape[0], S))
    for s in range(S):
        out[:, s] = np.nanmedian(values[s][cells], axis=1)
    return out


def draws(n_seeds: int, n_cells: int, n_bootstrap: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The bootstrap draws: seed indices (B, S) and cell indices (B, n), int64.

    Deterministic for ``seed``; the same draws serve a mixture and its reference (pairing).
    """
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_seeds, size=(n_bootstrap, n_seeds)), rng.integers(0, n_cells, size=(n_bootstrap, n_cells))


def mean_of_medians(values: np.ndarray, n_bootstrap: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean over seeds of the median over cells, with its two-level bootstrap interval.

    Parameters
    ----------
    values : numpy.ndarray, shape (n_seeds, n_cells), float
        Per-cell values of each seed's run on the same eval cells (NaN: a cell not scored).
    n_bootstrap : int
        Replicates.
    seed : int
        Seed of the draws (:func:`draws`).
    level : float
        Coverage of the interval.

    Returns
    -------
    dict
        ``mean`` (of the per-seed medians on all cells), ``lo``, ``hi``, ``n_seeds``, ``n_cells``.
    """
    v = np.atleast_2d(np.asarray(values, dtype=float))
    S, n = v.shape
    point = float(np.mean(np.nanmedian(v, axis=1)))
    si, ci = draws(S, n, n_bootstrap, seed)
    per = _stat_on_draw(v, ci)  # (B, S)
    rep = np.take_along_axis(per, si, axis=1).mean(axis=1)
    a = (1 - level) / 2
    return {"mean": point, "lo": float(np.nanquantile(rep, a)), "hi": float(np.nanquantile(rep, 1 - a)),
            "n_seeds": S, "n_cells": n}


def paired_delta(values: np.ndarray, reference: np.ndarray, n_bootstrap: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict:
    """Mean over seeds of (median of ``values`` - median of ``reference``), paired by seed and cell.

    Parameters
    ----------
    values, reference : numpy.ndarray, shape (n_seeds, n_cells)
        Per-cell values of the mixture's and the reference's runs; row ``s`` of both comes from the
        same seed, column ``j`` from the same eval cell.

    Returns
    -------
    dict
        ``delta``, ``lo``, ``hi``, ``n_seeds``, ``excludes_zero`` (the interval does not contain 0).

    Raises
    ------
    ValueError
        The two arrays differ in shape.
    """
    v = np.atleast_2d(np.asarray(values, dtype=float))
    r = np.atleast_2d(np.asarray(reference, dtype=float))
    if v.shape != r.shape:
        raise ValueError(f"paired arrays differ in shape: {v.shape} vs {r.shape}")
    S, n = v.shape
    point = float(np.mean(np.nanmedian(v, axis=1) - np.nanmedian(r, axis=1)))
    si, ci = draws(S, n, n_bootstrap, seed)
    d = _stat_on_draw(v, ci) - _stat_on_draw(r, ci)
    rep = np.take_along_axis(d, si, axis=1).mean(axis=1)
    a = (1 - level) / 2
    lo, hi = float(np.nanquantile(rep, a)), float(np.nanquantile(rep, 1 - a))
    return {"delta": point, "lo": lo, "hi": hi, "n_seeds": S, "excludes_zero": bool(lo > 0 or hi < 0)}
