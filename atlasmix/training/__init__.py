"""training: models trained on a mixture manifest, streamed from the store (no AnnData of the mixture).

Data flow, one module each:

- :mod:`atlasmix.training.split_cells` -- a manifest split's cells and their obs codes;
- :mod:`atlasmix.training.order` -- the epoch order (seeded block shuffle) and its shards for DDP
  ranks and DataLoader workers;
- :mod:`atlasmix.training.read` -- one IO batch of cells x the gene axis as CSR, from the store's x
  layout, TileDB X or an x cache, in threads or spawned read processes;
- :mod:`atlasmix.training.memory` -- a split held in memory (read once, served every epoch);
- :mod:`atlasmix.training.xcache` -- per-mixture gene-subset projections of X (opt-in, capped);
- :mod:`atlasmix.training.minibatches` -- minibatches cut out of an IO batch (dense on the CPU, CSR,
  or gathered on the GPU); :mod:`atlasmix.training._dense` -- their fused gather + densify;
- :mod:`atlasmix.training.loader` -- :class:`MixtureLoader`, the minibatch iterator the models use;
- :mod:`atlasmix.training.dataset` -- :class:`MixtureIterableDataset`, the loader for DataLoader
  worker processes;
- :mod:`atlasmix.training.budget` -- how long to train (:class:`Budget`) and convergence;
- :mod:`atlasmix.training.ldvae` -- scvi-tools LinearSCVI (LDVAE): :func:`train_ldvae`;
- :mod:`atlasmix.training.geneformer` -- Geneformer rank value encoding, medians, MLM pretraining.

Exports (imported on first use, so ``import atlasmix.training`` does not import torch):
:class:`MixtureLoader`, :class:`MixtureIterableDataset`, :class:`Budget`, :func:`train_ldvae`.
"""

from __future__ import annotations

import importlib

_EXPORTS = {"MixtureLoader": "atlasmix.training.loader", "MixtureIterableDataset": "atlasmix.training.dataset",
            "Budget": "atlasmix.training.budget", "train_ldvae": "atlasmix.training.ldvae"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'atlasmix.training' has no attribute {name!r}")
