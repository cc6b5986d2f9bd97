"""study: a composition experiment (mixtures x seeds x budgets) run, checked and reported as one.

In the order a study runs:

- :mod:`atlasmix.study.spec` -- the study TOML (:func:`load_study`);
- :mod:`atlasmix.study.runner` -- :func:`run_study`: every stage below, resumably;
- :mod:`atlasmix.study.manifests` -- one manifest per (mixture, seed) and per scaling subset;
- :mod:`atlasmix.study.eval_cache` -- each eval set read from the store once;
- :mod:`atlasmix.study.grid` -- the grid cells as tasks, run serially, in processes or on dask;
- :mod:`atlasmix.study.grid_cell` -- one cell: train its model, score it on the eval cache;
- :mod:`atlasmix.study.summary` -- means over seeds with intervals, paired deltas, scaling curves
  (:mod:`atlasmix.study.stats`: the two-level bootstrap);
- :mod:`atlasmix.study.checks` -- the sanity checks, read before the answer;
- :mod:`atlasmix.study.tables` -- the tables a study writes (the contract of the runner and the report);
- :mod:`atlasmix.study.report` -- the HTML report (figures: :mod:`atlasmix.study.figures`,
  :mod:`atlasmix.study.curves`; tables: :mod:`atlasmix.study.html_tables`; numbers and labels:
  :mod:`atlasmix.study.report_format`);
- :mod:`atlasmix.study.keys` -- the keys and names of cached artefacts.

Exports (imported on first use): :class:`StudySpec`, :func:`load_study`, :func:`run_study`.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"StudySpec": "atlasmix.study.spec", "load_study": "atlasmix.study.spec", "run_study": "atlasmix.study.runner"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'atlasmix.study' has no attribute {name!r}")
