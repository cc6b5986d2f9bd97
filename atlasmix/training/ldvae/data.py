"""The loader-to-scvi-tools bridge: a mixture's minibatches as scvi-tools trains and infers on them.

No AnnData of the mixture is ever built. The cells reach the model through
:class:`StoreDataModule`, a ``LightningDataModule`` that follows scvi-tools 1.4's custom-dataloader
contract for ``model.train(datamodule=...)``: minibatches are dicts keyed by scvi's
``REGISTRY_KEYS`` (``X`` counts float32 (B, G), ``batch`` int64 (B, 1), ``labels`` int64 (B, 1)),
and the datamodule exposes ``n_obs``, ``n_vars``, ``n_batch``, ``n_train``, ``n_val``.
:class:`ScviBatches` is the same view of one :class:`~atlasmix.training.loader.MixtureLoader` for
validation and inference (:func:`latent_representation`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from lightning.pytorch import LightningDataModule

from atlasmix.errors import AtlasmixError
from atlasmix.training.ldvae.distributed import all_gather_object
from atlasmix.training.loader import MixtureLoader


class ScviBatches:
    """An iterable view of a :class:`MixtureLoader` yielding scvi-keyed minibatches.

    Sets the loader's epoch to the trainer's current epoch at the start of each epoch (so the
    order is a function of (seed, epoch), also after a resume), unless it is mid-epoch.
    """

    def __init__(self, loader: MixtureLoader, batch_key: str | None, trainer_ref=None, record: bool = False,
                 restart: bool = False):
        self.loader, self.batch_key, self.trainer_ref, self.record = loader, batch_key, trainer_ref, record
        self.restart = restart  # every iteration is a full pass from the first batch (validation, inference)
        self.joinids: list[np.ndarray] = []

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        tr = self.trainer_ref() if self.trainer_ref else None
        if self.restart:  # e.g. after Lightning's sanity check stopped a validation pass after 2 batches
            self.loader.set_epoch(0)
            self.joinids = []
        elif tr is not None and self.loader.batches_done == 0 and self.loader.shuffle:
            self.loader.set_epoch(int(tr.current_epoch))
        for b in self.loader:
            X = b["X"]
            n = X.shape[0]
            if self.batch_key is None:
                batch = torch.zeros((n, 1), dtype=torch.int64, device=X.device)
            else:
                batch = b[self.batch_key].to(X.device).reshape(-1, 1)
            if self.record:
                self.joinids.append(b["soma_joinid"].numpy())
            yield {"X": X, "batch": batch, "labels": torch.zeros((n, 1), dtype=torch.int64, device=X.device)}


class StoreDataModule(LightningDataModule):
    """Train (and validation) minibatches of a mixture for ``model.train(datamodule=...)``.

    Parameters
    ----------
    train : MixtureLoader
        The training split's loader.
    validation : MixtureLoader, optional
        The validation split's loader (``shuffle=False``).
    batch_key : str or None
        obs column used as scvi's batch covariate (must be one of the loaders' ``obs_columns``).

    Notes
    -----
    The loaders are moved to the trainer's device at ``setup`` (CSR minibatches are densified on
    the GPU there). ``state_dict`` (saved in Lightning checkpoints) holds the training loader's
    position and the torch RNG states, restored by ``load_state_dict`` on resume.
    """

    def __init__(self, train: MixtureLoader, validation: MixtureLoader | None = None,
                 batch_key: str | None = "dataset_id"):
        super().__init__()
        if batch_key is not None and batch_key not in train.obs_columns:
            raise AtlasmixError(f"batch key {batch_key!r} is not among the loader's obs columns {train.obs_columns}")
        self.train_loader, self.val_loader, self.batch_key = train, validation, batch_key

    # attributes scvi-tools reads
    @property
    def n_obs(self) -> int:
        return self.train_loader.n_obs

    @property
    def n_train(self) -> int:
        return self.train_loader.n_obs

    @property
    def n_val(self) -> int:
        return self.val_loader.n_obs if self.val_loader is not None else 0

    @property
    def n_vars(self) -> int:
        return self.train_loader.n_vars

    @property
    def n_batch(self) -> int:
        return len(self.train_loader.categories[self.batch_key]) if self.batch_key else 1

    def setup(self, stage: str | None = None) -> None:
        dev = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        world = int(getattr(self.trainer, "world_size", 1) or 1) if self.trainer is not None else 1
        if world > 1:  # DDP: each rank serves its interleaved shard (equal batch counts, see loader)
            rank = int(self.trainer.global_rank)
            self.train_loader = self.train_loader.with_shard(rank, world)
            if self.val_loader is not None:
                self.val_loader = self.val_loader.with_shard(rank, world)
        for L in (self.train_loader, self.val_loader, *getattr(self, "extra_loaders", [])):
            if L is not None:
                L.device = dev

    def _trainer(self):
        return self.trainer

    def train_dataloader(self):
        return ScviBatches(self.train_loader, self.batch_key, self._trainer)

    def val_dataloader(self):
        if self.val_loader is None:
            return []
        return ScviBatches(self.val_loader, self.batch_key, restart=True)

    def state_dict(self) -> dict[str, Any]:
        """The training loader's position and the torch RNG states of every rank.

        Lightning calls this on every rank when it saves a checkpoint and writes rank 0's copy, so
        each rank's state is gathered here (``torch.distributed.all_gather_object``) into
        ``{"ranks": [state of rank 0, state of rank 1, ...]}``; :meth:`load_state_dict` gives each
        rank its own back.
        """
        st = {"loader": self.train_loader.state_dict(), "torch_rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            st["cuda_rng"] = torch.cuda.get_rng_state_all()
        return {"ranks": all_gather_object(st)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore this rank's :meth:`state_dict` entry.

        Raises
        ------
        AtlasmixError
            The checkpoint was saved by a run with another number of ranks.
        """
        ranks = state["ranks"] if "ranks" in state else [state]  # checkpoints written before per-rank states
        rank, world = self.train_loader.rank, self.train_loader.world_size
        if len(ranks) != world:
            raise AtlasmixError(f"the checkpoint was saved by a run on {len(ranks)} device(s); this run has {world} "
                                "(resume with the same --devices)")
        st = ranks[rank]
        self.train_loader.load_state_dict(st["loader"])
        torch.set_rng_state(st["torch_rng"])
        if "cuda_rng" in st and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(st["cuda_rng"])


def latent_representation(model, loader: MixtureLoader, batch_key: str | None = "dataset_id") -> pd.DataFrame:
    """Posterior means of the latent for a loader's cells, streamed (no AnnData).

    Parameters
    ----------
    model : scvi.model.LinearSCVI
        A trained model (e.g. from ``LinearSCVI.load(OUT/model)``).
    loader : MixtureLoader
        Any split, built with ``var_joinids`` = the model's genes and the training ``categories``
        (``shuffle=False`` gives store order).

    Returns
    -------
    pandas.DataFrame
        Index ``soma_joinid``; columns ``Z_0..``, float32.
    """
    view = ScviBatches(loader, batch_key, record=True, restart=True)
    dev = model.device
    loader.device = torch.device(dev)
    z = model.get_latent_representation(dataloader=view)
    ids = np.concatenate(view.joinids)
    return pd.DataFrame(z, index=pd.Index(ids, name="soma_joinid"), columns=[f"Z_{i}" for i in range(z.shape[1])])
