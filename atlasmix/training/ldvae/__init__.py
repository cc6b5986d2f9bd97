"""LDVAE: scvi-tools' LinearSCVI (Svensson et al. 2020) trained on a mixture streamed from the store.

No AnnData of the mixture is ever built: :func:`train_ldvae` (``atlasmix train ldvae``) feeds the
model from :class:`~atlasmix.training.loader.MixtureLoader` s. One module each:

- :mod:`atlasmix.training.ldvae.data` -- :class:`StoreDataModule`, the loaders as scvi-tools'
  custom data module, and :func:`latent_representation` (inference, streamed);
- :mod:`atlasmix.training.ldvae.template` -- the template AnnData ``LinearSCVI`` is built with and
  the library-size priors it is given (:func:`library_priors`, :func:`template_anndata`);
- :mod:`atlasmix.training.ldvae.callbacks` -- :class:`EpochCheckpoint` (resumable checkpoints) and
  :class:`BudgetCallback` (cells seen, validation cadence, early stopping);
- :mod:`atlasmix.training.ldvae.distributed` -- ranks and objects exchanged under DDP;
- :mod:`atlasmix.training.ldvae.train` -- :func:`train_ldvae` and its outputs.

The options are :class:`~atlasmix.training.options.LDVAEModelOptions`,
:class:`~atlasmix.training.options.LDVAETrainOptions` and
:class:`~atlasmix.training.options.LoaderOptions` (:mod:`atlasmix.training.options`, shared with the
CLI and the study spec).
"""

from __future__ import annotations

from atlasmix.training.ldvae.callbacks import BudgetCallback, EpochCheckpoint
from atlasmix.training.ldvae.data import ScviBatches, StoreDataModule, latent_representation
from atlasmix.training.ldvae.template import MIN_LIBRARY_LOG_VAR, library_priors, template_anndata
from atlasmix.training.ldvae.train import train_ldvae
from atlasmix.training.options import LDVAEModelOptions, LDVAETrainOptions, LoaderOptions

__all__ = ["train_ldvae", "latent_representation", "StoreDataModule", "ScviBatches", "EpochCheckpoint",
           "BudgetCallback", "library_priors", "template_anndata", "MIN_LIBRARY_LOG_VAR", "LDVAEModelOptions",
           "LDVAETrainOptions", "LoaderOptions"]
