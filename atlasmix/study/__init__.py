"""study: a composition experiment (mixtures x seeds x budgets) run, checked and reported as one.

:mod:`atlasmix.study.spec` (the study TOML, :func:`load_study`), :mod:`atlasmix.study.runner`
(:func:`run_study`: resolve, train, evaluate and summarise each grid cell, resumably),
:mod:`atlasmix.study.stats` (two-level bootstrap over seeds and eval cells),
:mod:`atlasmix.study.checks` (sanity checks before the answer is read), :mod:`atlasmix.study.tables`
and :mod:`atlasmix.study.report` (the HTML report).

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
