"""evaluation: every trained model on every held-out set, with uncertainty, in one results table.

- :mod:`atlasmix.evaluation.evalsets` -- held-out sets from the store or from files (:class:`EvalSet`);
- :mod:`atlasmix.evaluation.overlap` -- checks that no eval cell was trained on;
- :mod:`atlasmix.evaluation.models` -- trained models behind one interface (LDVAE, a PCA
  baseline): :func:`load_model`; :mod:`atlasmix.evaluation.pretrained` and
  :mod:`atlasmix.evaluation.pretrained_outputs` -- Geneformer, scGPT and scBERT behind the same
  interface, their embeddings and masked-prediction outputs;
- :mod:`atlasmix.evaluation.metrics` -- per-cell Pearson reconstruction on HVGs (scFM-datamix), kNN
  and few-shot classification, integration metrics, Geneformer rank prediction, with bootstrap
  summaries;
- :mod:`atlasmix.evaluation.run` -- :func:`evaluate`: models x eval sets -> ``results.parquet``;
- :mod:`atlasmix.evaluation.report` -- :func:`render_report`: the HTML report of a results table
  (figures through :mod:`atlasmix.evaluation.plotting`).

Exports (imported on first use): :class:`EvalSet`, :func:`load_eval_sets`, :func:`load_model`,
:func:`evaluate`, :func:`render_report`.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"EvalSet": "atlasmix.evaluation.evalsets", "load_eval_sets": "atlasmix.evaluation.evalsets",
            "load_model": "atlasmix.evaluation.models", "evaluate": "atlasmix.evaluation.run",
            "render_report": "atlasmix.evaluation.report"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'atlasmix.evaluation' has no attribute {name!r}")
