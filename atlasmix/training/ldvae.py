"""Train scvi-tools' LinearSCVI (LDVAE, Svensson et al. 2020) on a mixture streamed from the store.

No AnnData of the mixture is ever built. The cells reach the model through
:class:`StoreDataModule`, a ``LightningDataModule`` that follows scvi-tools 1.4's custom-dataloader
contract for ``model.train(datamodule=...)``: minibatches are dicts keyed by scvi's
``REGISTRY_KEYS`` (``X`` counts float32 (B, G), ``batch`` int64 (B, 1), ``labels`` int64 (B, 1)),
and the datamodule exposes ``n_obs``, ``n_vars``, ``n_batch``, ``n_train``, ``n_val``.

The template AnnData
--------------------
``LinearSCVI.__init__`` still wants an AnnData: it reads the gene axis, the number of batches and,
from the counts, the per-batch mean and variance of log library size (the prior of the library
latent ``l``, used because ``use_observed_lib_size=False`` is LDVAE's default). We give it a small
*template*: ``n_template`` real training cells (read from the store, <= 1,000 by default) whose
``var`` is the mixture's gene axis (index ``feature_id``, column ``feature_name``) and whose
``obs["batch"]`` is a categorical holding *every* batch category of the mixture (so ``n_batch`` is
right even when the template lacks a batch). The library-size priors computed by scvi-tools on the
template are then replaced by priors computed over a random sample of up to ``prior_cells`` training
cells (all of them when fewer) streamed from the store: per batch, mean and variance of
``log(sum of counts over the gene axis)``; a batch absent from the sample gets the pooled values.
The template is saved with the model so ``scvi.model.LinearSCVI.load(OUT/model)`` works as usual.

Outputs of :func:`train_ldvae` (directory ``out``)
--------------------------------------------------
``model/``
    ``LinearSCVI.save`` (model.pt + template adata.h5ad)
``loadings.parquet``
    ``get_loadings()``: genes x ``Z_0..Z_{n_latent-1}``, index ``feature_id``, plus ``feature_name``
``training_curve.csv/png``
    per-epoch losses from ``model.history`` (ELBO, reconstruction, KL, train and validation)
``run.json``
    options, manifest path / sha256 / spec hash, store identity, gene axis, cells, wall time, cells/s
``checkpoints/``
    Lightning checkpoints every ``checkpoint_every`` epochs and ``last.ckpt`` (``resume=True`` continues
    from it; the data order is a function of (seed, epoch) and the checkpoint carries the torch RNG
    state, so a resumed run matches an uninterrupted one)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from lightning.pytorch import Callback, LightningDataModule
from scvi.train import SaveCheckpoint

from atlasmix.errors import AtlasmixError
from atlasmix.training.budget import Budget, convergence
from atlasmix.training.loader import MixtureLoader
from atlasmix.training.options import (LDVAE_LOADER, LDVAEModelOptions, LDVAETrainOptions, LoaderOptions,
                                       route_options)
from atlasmix.training.rda import ReadDepthAugment


#: Floor of the per-batch variance of log library size (the library prior's scale must be > 0).
MIN_LIBRARY_LOG_VAR = 1e-2


class _ScviBatches:
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
        return _ScviBatches(self.train_loader, self.batch_key, self._trainer)

    def val_dataloader(self):
        if self.val_loader is None:
            return []
        return _ScviBatches(self.val_loader, self.batch_key, restart=True)

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
        return {"ranks": _all_gather_object(st)}

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


def _distributed() -> bool:
    """torch.distributed is initialised with more than one rank (a DDP run)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_gather_object(obj: Any) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` outside a DDP run)."""
    if not _distributed():
        return [obj]
    import torch.distributed as dist

    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` outside a DDP run)."""
    if not _distributed():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _launched_rank() -> int:
    """Global rank of this process as its launcher set it before training starts: 0 for the process
    the user started; Lightning's DDP launcher (``LOCAL_RANK``, ``NODE_RANK``), torchrun (``RANK``)
    and Slurm's ``srun`` (``SLURM_PROCID``) start the others with their rank in the environment."""
    import os

    for k in ("RANK", "SLURM_PROCID"):  # torchrun; srun (Lightning's SLURM environment)
        if os.environ.get(k):
            return int(os.environ[k])
    return int(os.environ.get("LOCAL_RANK") or 0) + int(os.environ.get("NODE_RANK") or 0)


class EpochCheckpoint(SaveCheckpoint):
    """Lightning's ``ModelCheckpoint`` (a checkpoint every ``every_n_epochs`` epochs, all kept, and
    ``last.ckpt``) as a scvi-tools ``SaveCheckpoint``.

    scvi-tools' Trainer adds its own monitor-based ``SaveCheckpoint`` unless one is among the
    callbacks, so this class is one; but ``SaveCheckpoint`` replaces Lightning checkpoints by model
    folders (which cannot resume a run), refuses ``save_last`` and reloads a "best" model at the end
    of training or on an exception. Each of those methods is overridden by Lightning's own
    (``super(SaveCheckpoint, self)`` skips scvi-tools' class in the method resolution order).

    Parameters
    ----------
    dirpath : path
        Folder of ``epochNNNN.ckpt`` and ``last.ckpt``.
    every_n_epochs : int
        Epochs between checkpoints (>= 1).
    """

    def __init__(self, dirpath: str | Path, every_n_epochs: int):
        super(SaveCheckpoint, self).__init__(dirpath=str(dirpath), filename="epoch{epoch:04d}",
                                             auto_insert_metric_name=False, every_n_epochs=every_n_epochs,
                                             save_top_k=-1, save_last=True, monitor=None)
        # SaveCheckpoint's attributes (read by scvi-tools' code that inspects its callbacks)
        self.load_best_on_end = False
        self.loss_is_nan = False
        self.check_nan_gradients = False

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        """Lightning's: only the checkpoint file (no scvi-tools model folder beside it)."""
        return super(SaveCheckpoint, self).on_save_checkpoint(trainer, pl_module, checkpoint)

    def _remove_checkpoint(self, trainer, filepath: str) -> None:
        super(SaveCheckpoint, self)._remove_checkpoint(trainer, filepath)

    def _update_best_and_save(self, current, trainer, monitor_candidates) -> None:
        # (scvi-tools' version deletes the .ckpt file it has just written)
        super(SaveCheckpoint, self)._update_best_and_save(current, trainer, monitor_candidates)

    def on_train_end(self, trainer, pl_module) -> None:
        """Lightning's: writes ``last.ckpt`` if the last epoch did not."""
        super(SaveCheckpoint, self).on_train_end(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super(SaveCheckpoint, self).on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_exception(self, trainer, pl_module, exception) -> None:
        """Lightning's (saves nothing unless asked): scvi-tools' reloads a "best" model that this
        callback never writes and masks the training error with an AttributeError."""
        super(SaveCheckpoint, self).on_exception(trainer, pl_module, exception)


class BudgetCallback(Callback):
    """Counts cells and steps, validates every ``val_every`` steps and applies the early-stopping rule.

    Validation is run here rather than by Lightning's validation loop so that its cadence is in
    optimizer steps, the same for every mixture under a ``cells`` or ``steps`` budget whatever the
    size of an epoch (scvi-tools' Trainer only validates every N epochs). The validation loss is the
    ELBO per cell (reconstruction + KL of z, KL weight 1) of the module in eval mode, averaged over
    the validation split; the training loss is the mean of scvi-tools' per-step training loss
    (KL-weighted during warm-up) since the previous point.

    Parameters
    ----------
    budget : Budget
    max_steps, val_every, n_train : int
    validation : _ScviBatches, optional
        The validation split (restarting view).

    Attributes
    ----------
    rows : list of dict
        One per validation point: ``step, cells_seen, epoch, train_loss, validation_loss``.
    cells : int
        Training cells seen by all ranks up to the last validation point.
    stopped_early : bool
        The early-stopping rule ended the run before ``max_steps``.

    Notes
    -----
    Under DDP, each validation point sums the cells and training losses of all ranks
    (``all_reduce``); rank 0 computes the validation loss on the whole validation split and
    broadcasts it, so that every rank takes the same early-stopping decision.
    """

    def __init__(self, budget: Budget, max_steps: int, val_every: int, n_train: int, validation=None):
        super().__init__()
        self.budget, self.max_steps, self.val_every, self.n_train = budget, max_steps, val_every, n_train
        self.validation = validation
        self.rows: list[dict] = []
        self.cells = 0  # every rank's cells, summed at each validation point
        self._cells_new = 0  # this rank's cells since the last point
        self._loss_sum, self._loss_n = 0.0, 0
        self.best, self.bad, self.stopped_early = float("inf"), 0, False

    def validation_loss(self, pl_module) -> float:
        """ELBO per validation cell (nats), module in eval mode, no gradients."""
        mod = pl_module.module
        was = mod.training
        mod.eval()
        tot, n = 0.0, 0
        with torch.no_grad():
            for b in self.validation:
                _, _, lo = mod(b, loss_kwargs={"kl_weight": 1.0})
                tot += float(lo.reconstruction_loss_sum) + float(lo.kl_local_sum)
                n += int(b["X"].shape[0])
        mod.train(was)
        return tot / n if n else float("nan")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        n = int(batch["X"].shape[0])
        self._cells_new += n
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self._loss_sum += float(loss) * n
        self._loss_n += n
        step = int(trainer.global_step)
        if step % self.val_every and step < self.max_steps:
            return
        if _distributed():  # cells and training loss of every rank (each rank trains on its own shard)
            import torch.distributed as dist

            t = torch.tensor([self._cells_new, self._loss_sum, self._loss_n], dtype=torch.float64,
                             device=pl_module.device)
            dist.all_reduce(t)
            self._cells_new, self._loss_sum, self._loss_n = int(t[0]), float(t[1]), int(t[2])
            # rank 0 validates the whole split and tells the others, so every rank takes the same
            # early-stopping decision (its weights are every rank's: DDP keeps them equal)
            val = self.validation_loss(pl_module) if self.validation is not None and trainer.global_rank == 0 \
                else float("nan")
            val = float(_broadcast_object(val))
        else:
            val = self.validation_loss(pl_module) if self.validation is not None else float("nan")
        self.cells += self._cells_new
        self._cells_new = 0
        self.rows.append({"step": step, "cells_seen": self.cells, "epoch": round(self.cells / self.n_train, 4),
                          "train_loss": self._loss_sum / max(self._loss_n, 1), "validation_loss": val})
        self._loss_sum, self._loss_n = 0.0, 0
        if self.budget.until_converged and np.isfinite(val):
            if val < self.best - self.budget.min_delta:
                self.best, self.bad = val, 0
            else:
                self.bad += 1
                if self.bad >= self.budget.patience and step < self.max_steps:
                    self.stopped_early = True
                    trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        # the counts since the last point are this rank's own: gathered from every rank (Lightning
        # writes rank 0's checkpoint), each rank gets its own back on resume
        local = _all_gather_object({"loss": (self._loss_sum, self._loss_n), "cells_new": self._cells_new})
        return {"rows": self.rows, "cells": self.cells, "best": self.best, "bad": self.bad,
                "stopped_early": self.stopped_early, "ranks": local}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows, self.cells = list(state["rows"]), int(state["cells"])
        if "ranks" in state:
            import torch.distributed as dist

            own = state["ranks"][dist.get_rank() if _distributed() else 0]
        else:  # checkpoints written before per-rank states
            own = {"loss": state["loss"], "cells_new": 0}
        self._loss_sum, self._loss_n = own["loss"]
        self._cells_new = int(own["cells_new"])
        self.best, self.bad, self.stopped_early = state["best"], state["bad"], state["stopped_early"]


def library_priors(loader: MixtureLoader, batch_key: str | None, max_cells: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Per-batch mean and variance of log library size from a random sample of training cells.

    Parameters
    ----------
    loader : MixtureLoader
        A shuffled loader over the training split (a copy: its position is consumed).
    batch_key : str or None
    max_cells : int
        Stop after this many cells (the loader's order is a uniform block permutation, so the first
        cells are a random sample).

    Returns
    -------
    (numpy.ndarray, numpy.ndarray, dict)
        ``library_log_means`` and ``library_log_vars``, float32, shape (1, n_batch) (scvi-tools'
        layout), and a sample: ``X`` (scipy CSR of the first cells), ``batch`` codes, ``soma_joinid``.
    """
    import scipy.sparse as sp

    n_batch = len(loader.categories[batch_key]) if batch_key else 1
    logs, codes, keep_X, keep_b, keep_id = [], [], [], [], []
    seen = 0
    for b in loader:
        lib = b["library_size"].cpu().numpy().ravel()
        c = b[batch_key].numpy() if batch_key else np.zeros(len(lib), dtype=np.int64)
        logs.append(np.log(np.maximum(lib, 1.0)))  # log(0) guarded as scvi-tools does (empty cells)
        codes.append(c)
        keep_X.append(sp.csr_matrix(b["X"].cpu().numpy()))
        keep_b.append(c)
        keep_id.append(b["soma_joinid"].numpy())
        seen += len(lib)
        if seen >= max_cells:
            break
    logs_a, codes_a = np.concatenate(logs)[:max_cells], np.concatenate(codes)[:max_cells]
    means = np.full(n_batch, logs_a.mean(), dtype=np.float64)
    var = np.full(n_batch, logs_a.var(), dtype=np.float64)
    for k in range(n_batch):
        sel = logs_a[codes_a == k]
        if len(sel):
            means[k] = sel.mean()
            var[k] = sel.var() if len(sel) > 1 else var[k]
    # a batch whose sampled cells all have the same library (e.g. a small gene panel that measures none
    # of the gene axis: every library is 0) has variance 0, and Normal(mean, 0) is invalid in scvi-tools
    var = np.maximum(var, MIN_LIBRARY_LOG_VAR)
    sample = {"X": sp.vstack(keep_X).tocsr(), "batch": np.concatenate(keep_b), "soma_joinid": np.concatenate(keep_id)}
    return means.reshape(1, -1).astype(np.float32), var.reshape(1, -1).astype(np.float32), sample


def template_anndata(store, loader: MixtureLoader, sample: dict, batch_key: str | None, n_template: int):
    """The small AnnData LinearSCVI is constructed with (see module doc): ``n_template`` sampled cells.

    Returns
    -------
    anndata.AnnData
        X CSR float32 (n_template, n_genes) counts; obs ``batch`` (categorical over every batch
        category), ``soma_joinid``; var index ``feature_id``, column ``feature_name``.
    """
    import anndata as ad

    var = store.var().loc[loader.var_joinids]
    n = min(n_template, sample["X"].shape[0])
    cats = loader.categories[batch_key] if batch_key else ["all"]
    obs = pd.DataFrame({"batch": pd.Categorical.from_codes(sample["batch"][:n], categories=cats),
                        "soma_joinid": sample["soma_joinid"][:n]},
                       index=[f"cell{j}" for j in sample["soma_joinid"][:n]])
    vdf = pd.DataFrame({"feature_name": var["feature_name"].to_numpy(),
                        "soma_joinid": loader.var_joinids}, index=pd.Index(var["feature_id"].to_numpy(), name="feature_id"))
    return ad.AnnData(X=sample["X"][:n].astype(np.float32), obs=obs, var=vdf)


def _history_frame(model) -> pd.DataFrame:
    hist = getattr(model, "history", None) or {}
    frames = [v for v in hist.values() if isinstance(v, pd.DataFrame) and len(v)]
    if not frames:
        return pd.DataFrame()
    df = pd.concat(frames, axis=1)
    df.index.name = "epoch"
    return df.reset_index()


def _plot_curve(df: pd.DataFrame, path: Path) -> None:
    """Training and validation loss (nats per cell) against cells seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for col, lab in (("train_loss", "train (KL-weighted)"), ("validation_loss", "validation ELBO")):
        if col in df and np.isfinite(df[col]).any():
            ax.plot(df["cells_seen"], df[col], marker=".", label=lab)
    ax.set_xlabel("cells seen")
    ax.set_ylabel("loss (nats per cell)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train_ldvae(store, manifest: str | Path, out: str | Path, *, model_options: LDVAEModelOptions | None = None,
                train_options: LDVAETrainOptions | None = None, loader_options: LoaderOptions | None = None,
                genes: list[str] | None = None, resume: bool = False, progress: bool = True,
                callbacks: list | None = None, **options: Any) -> dict[str, Any]:
    """Train LinearSCVI on a mixture manifest's train split, streamed from the store.

    Parameters
    ----------
    store : atlasmix.store.Store
    manifest : path
        Resolved manifest ``.parquet`` (its store and state are checked).
    out : path
        Output directory (see module doc). Must be empty unless ``resume``.
    model_options : LDVAEModelOptions, optional
        The model (:class:`atlasmix.training.options.LDVAEModelOptions`; scFM-datamix's defaults).
    train_options : LDVAETrainOptions, optional
        Budget, learning rate, seed, devices, validation and checkpoints
        (:class:`atlasmix.training.options.LDVAETrainOptions`).
    loader_options : LoaderOptions, optional
        How the loaders batch and read (:class:`atlasmix.training.options.LoaderOptions`; default
        :data:`atlasmix.training.options.LDVAE_LOADER`: minibatches of 128, the split held in memory
        when it fits). Their ``seed`` is the training seed and their ``obs_columns`` the batch key.
        ``io_batch_size`` was 65,536 before the x layout (2.2 GB of TileDB buffers per
        whole-transcriptome read in flight; from the layout 16,384 cells per read keep the same
        speed); ``read_processes`` > 0 was not faster than threads on one H100 machine (12.6k vs
        14.2k cells/s end to end; see ``benchmarks/bench_ldvae.py``). The validation loader serves
        store order and the library-size prior's sample is one read of about ``prior_cells``.
    genes : list of str, optional
        Explicit gene axis (feature_id or unique symbol); default genes measured in every dataset.
    resume : bool
        Continue from ``out/checkpoints/last.ckpt`` (or the newest ``epochNNNN.ckpt`` when a kill came
        between the two writes).
    progress : bool
        Progress bar and set-up lines (rank 0 only).
    callbacks : list of lightning.pytorch.Callback, optional
        Extra Lightning callbacks (e.g. timers in ``benchmarks/bench_ldvae.py``).
    **options
        Fields of the three option groups by name (``n_latent=20``, ``budget="cells=200000"``,
        ``batch_size=256``, ``x_cache=DIR``, ...), replacing those of the groups given; ``seed``
        sets the training and the loaders' seed.

    Returns
    -------
    dict
        The contents of ``run.json``.

    Raises
    ------
    AtlasmixError
        ``out`` not empty (without resume), nothing to resume, bad manifest or options, training cells
        with no counts on the gene axis.
    TypeError
        A keyword that is no option.
    """
    import scvi
    from lightning.pytorch import seed_everything

    from atlasmix.mixing import read_sidecar

    mo, to, lo = route_options(options, model_options or LDVAEModelOptions(), train_options or LDVAETrainOptions(),
                               loader_options or LDVAE_LOADER)
    seed, batch_key, batch_size = to.seed, mo.batch_key, lo.batch_size
    out = Path(out)
    ckdir = out / "checkpoints"
    last = ckdir / "last.ckpt"
    if resume and not last.is_file():
        # killed between Lightning's write of epochNNNN.ckpt and its copy to last.ckpt: the newest
        # epoch checkpoint is complete (each is written atomically) and is the same state
        epochs = sorted(ckdir.glob("epoch[0-9][0-9][0-9][0-9].ckpt")) if ckdir.is_dir() else []
        if not epochs:
            raise AtlasmixError(f"nothing to resume: {last} does not exist")
        last = epochs[-1]
    strat, world = to.lightning_strategy, to.world_size
    rank0 = _launched_rank() == 0  # ranks 1.. are started by a launcher while rank 0 already trains
    progress = progress and rank0
    if not resume and rank0 and out.exists() and any(out.iterdir()):
        raise AtlasmixError(f"{out} is not empty (pass --resume to continue a run there)")
    out.mkdir(parents=True, exist_ok=True)
    side = read_sidecar(manifest)
    seed_everything(seed, workers=True, verbose=False)
    scvi.settings.seed = seed

    lo = lo.replace(seed=seed, obs_columns=(batch_key,) if batch_key else ())
    augment = ReadDepthAugment(seed=seed, **to.rda) if to.rda is not None else None
    train = MixtureLoader(store, manifest, "train", lo, genes=genes, augment=augment)
    on_train_axis = dict(var_joinids=train.var_joinids, categories=train.categories)
    val = None
    if to.validation and side.get("counts", {}).get("validation", 0):
        # store order, read in threads; under DDP only rank 0 validates (BudgetCallback): the other
        # ranks never read this split, so they do not hold it in memory
        val = MixtureLoader(store, manifest, "validation", lo.replace(
            shuffle=False, seed=0, read_processes=0, in_memory=lo.in_memory if rank0 or world == 1 else False),
            **on_train_axis)
    x_cache_meta = {}
    if lo.x_cache is not None:  # built now rather than inside the first epoch
        for name, L in (("train", train), ("validation", val)):
            if L is not None:
                m = L.ensure_x_cache()
                x_cache_meta[name] = {k: m[k] for k in ("format", "n_obs", "n_vars", "nnz", "bytes", "build_s", "built")}
                if progress:
                    print(f"x cache ({name}): {m['n_obs']:,} cells x {m['n_vars']:,} genes, {m['nnz']:,} nonzeros, "
                          + (f"built in {m['build_s']:.1f} s" if m["built"] else "found"), flush=True)

    in_memory_meta = {}
    for name, L in (("train", train), ("validation", val)):  # read now rather than inside the first epoch
        if L is not None and L.in_memory is not False:
            t0 = time.perf_counter()
            ok = L.ensure_in_memory()
            in_memory_meta[name] = {"held": ok, "bytes": L.in_memory_bytes, "read_s": round(time.perf_counter() - t0, 3)}
            if progress and ok:
                print(f"in memory ({name}): {L.n_obs:,} cells x {L.n_vars:,} genes, {L.in_memory_bytes / 1e6:,.0f} MB, "
                      f"read in {in_memory_meta[name]['read_s']:.1f} s", flush=True)

    # library-size priors and the template AnnData (module doc)
    # only prior_cells cells are needed: one IO batch of about that size, one read at a time (with the
    # training loader's 65,536-cell IO batches and 4 read threads this sample peaked at 15.4 GiB of RSS
    # on whole-transcriptome cells, 5.5 GiB with one 20,480-cell read); through the x cache if any
    # (same cells and genes as the training loader, so the same projection)
    sampler = MixtureLoader(store, manifest, "train", lo.replace(
        seed=seed + 1, io_batch_size=min(lo.io_batch_size, max(int(mo.prior_cells), batch_size)), io_threads=1,
        prefetch_io=1, read_processes=0, in_memory=False, in_memory_max_bytes=None), **on_train_axis)
    means, variances, sample = library_priors(sampler, batch_key, mo.prior_cells)
    if sample["X"].nnz == 0:  # e.g. mouse cells on a human gene axis: nothing to learn, and scvi-tools
        # would take the all-zero template for a "minified" AnnData and refuse to load the saved model
        raise AtlasmixError(f"the mixture's training cells have no counts on the gene axis ({train.n_vars} genes); "
                            "choose genes its datasets measure (--genes)")
    adata = template_anndata(store, train, sample, batch_key, mo.n_template)
    scvi.model.LinearSCVI.setup_anndata(adata, batch_key="batch")
    model = scvi.model.LinearSCVI(adata, n_hidden=mo.n_hidden, n_latent=mo.n_latent, n_layers=mo.n_layers,
                                  dropout_rate=mo.dropout_rate, dispersion=mo.dispersion,
                                  gene_likelihood=mo.gene_likelihood)
    model.module.library_log_means.copy_(torch.from_numpy(means))
    model.module.library_log_vars.copy_(torch.from_numpy(variances))

    # the budget in optimizer steps; a last minibatch of 1-2 cells would break BatchNorm (and scvi-tools
    # drops such a batch too), so the epoch's tail is dropped then (the permutation changes every epoch)
    budget = to.resolved_budget()
    # under DDP the budget counts in each rank's steps: one step consumes batch_size cells on every rank
    shard = train.with_shard(0, world) if world > 1 else train
    if train.n_obs > batch_size and 0 < shard.shard_size % batch_size < 3:
        train.drop_last = shard.drop_last = True
    bpe = len(shard)
    if bpe == 0:
        raise AtlasmixError(f"the training split has {train.n_obs} cells: no minibatch of {batch_size}"
                            + (f" on each of {world} ranks ({shard.shard_size} cells per rank)" if world > 1 else ""))
    epoch_cells = shard.shard_size * world  # cells served per epoch, all ranks (DDP drops whole blocks)
    max_steps = budget.max_steps(epoch_cells, batch_size * world, bpe)
    val_every = budget.val_every(max_steps)
    kl_steps = budget.kl_warmup_steps(max_steps)
    plan_kwargs = {"lr": to.lr}
    if kl_steps is not None or budget.kl_warmup_fraction is not None or budget.unit != "epochs":
        plan_kwargs.update(n_epochs_kl_warmup=None, n_steps_kl_warmup=kl_steps)
    kl_desc = (f"{kl_steps} steps" if kl_steps else "none") if "n_steps_kl_warmup" in plan_kwargs \
        else "scvi-tools default (400 epochs)"
    val_view = _ScviBatches(val, batch_key, restart=True) if val is not None else None
    tracker = BudgetCallback(budget, max_steps, val_every, epoch_cells, val_view)
    dm = StoreDataModule(train, None, batch_key)
    dm.extra_loaders = [val] if val is not None else []
    ckpt = [EpochCheckpoint(ckdir, to.checkpoint_every)] if to.checkpoint_every > 0 else []
    callbacks = [tracker] + ckpt + list(callbacks or [])
    t0 = time.perf_counter()
    # max_steps ends the run; max_epochs is only an upper bound (a resumed run whose checkpoint ended an
    # epoch at max_steps restarts one epoch later, so an exact epoch limit would stop it at once)
    # under DDP scvi-tools' logger writes its history to disk: into the run folder, not the working directory
    ddp = {"strategy": strat, "num_nodes": to.num_nodes, "log_save_dir": str(out)} if world > 1 else {}
    model.train(max_epochs=max_steps, max_steps=max_steps, datamodule=dm, accelerator=to.accelerator,
                devices=to.devices, early_stopping=False, plan_kwargs=plan_kwargs, callbacks=callbacks,
                enable_checkpointing=bool(ckpt), enable_progress_bar=progress,
                ckpt_path=str(last) if resume else None, **ddp)
    wall = time.perf_counter() - t0
    steps = int(model.trainer.global_step) if getattr(model, "trainer", None) is not None else None

    train.close()  # read processes, if any
    if world > 1 and model.trainer.global_rank != 0:  # rank 0 writes the outputs
        return {"global_rank": int(model.trainer.global_rank), "world_size": world}
    model.save(str(out / "model"), save_anndata=True, overwrite=True)
    load = model.get_loadings()
    load.insert(0, "feature_name", adata.var["feature_name"].to_numpy())
    load.to_parquet(out / "loadings.parquet")
    curve = pd.DataFrame(tracker.rows, columns=["step", "cells_seen", "epoch", "train_loss", "validation_loss"])
    curve.to_csv(out / "training_curve.csv", index=False)
    if len(curve):
        _plot_curve(curve, out / "training_curve.png")
    conv = convergence(curve, rel_tol=budget.plateau_tol)
    if budget.until_converged:  # the early-stopping rule itself decides
        conv = {**conv, "converged": bool(tracker.stopped_early),
                "rule": f"validation ELBO did not improve by {budget.min_delta} for {budget.patience} validation points"}
    epochs_run = int(len(_history_frame(model)))
    last_row = tracker.rows[-1] if tracker.rows else {}
    run = {
        "model": "scvi.model.LinearSCVI",
        "scvi_tools_version": scvi.__version__,
        "options": {"batch_size": batch_size, "max_epochs": to.max_epochs, "seed": seed, "n_latent": mo.n_latent,
                    "n_layers": mo.n_layers, "n_hidden": mo.n_hidden, "dropout_rate": mo.dropout_rate,
                    "gene_likelihood": mo.gene_likelihood, "dispersion": mo.dispersion, "lr": to.lr,
                    "early_stopping": to.early_stopping, "batch_key": batch_key, "accelerator": to.accelerator,
                    "io_batch_size": train.io_batch_size, "io_batch_bytes": lo.io_batch_bytes,
                    "block_size": lo.block_size, "checkpoint_every": to.checkpoint_every,
                    "read_processes": lo.read_processes, "x_cache": str(lo.x_cache) if lo.x_cache is not None else None,
                    "in_memory": train.in_memory, "in_memory_max_bytes": lo.in_memory_max_bytes,
                    "devices": to.devices, "num_nodes": to.num_nodes, "strategy": strat,
                    "rda": ({"p": train.augment.p, "beta": list(train.augment.beta),
                             "min_total": train.augment.min_total} if to.rda is not None else None)},
        "budget": {**budget.model_dump(mode="json"), "label": budget.label, "max_steps": max_steps,
                   "val_every_steps": val_every, "kl_warmup": kl_desc, "batches_per_epoch": bpe,
                   "drop_last": bool(train.drop_last), "ranks": world, "cells_per_rank_per_epoch": shard.shard_size,
                   "cells_per_epoch": epoch_cells},
        "training": {"steps": steps, "cells_seen": int(tracker.cells), "epochs": round(tracker.cells / epoch_cells, 4),
                     "final_train_loss": last_row.get("train_loss"), "final_validation_loss":
                         (None if not np.isfinite(last_row.get("validation_loss", np.nan)) else last_row["validation_loss"]),
                     "stopped_early": bool(tracker.stopped_early), "convergence": conv},
        "x_cache": x_cache_meta,
        "in_memory": in_memory_meta,
        "manifest": {"path": str(Path(manifest).resolve()), "sha256": side["manifest"]["sha256"],
                     "name": side.get("name"), "spec_hash": side.get("spec_hash")},
        "store": store.identity(),
        "n_cells": {"train": train.n_obs, "validation": val.n_obs if val is not None else 0},
        "n_genes": train.n_vars,
        "batch_categories": train.categories.get(batch_key, []) if batch_key else [],
        "library_prior": {"n_cells_sampled": int(min(mo.prior_cells, len(sample["batch"]))),
                          "log_means": means.ravel().tolist(), "log_vars": variances.ravel().tolist()},
        "resumed": bool(resume),
        "epochs_run_this_call": epochs_run,
        "wall_s": round(wall, 3),
        "train_cells_per_s": round(tracker.cells / wall, 1) if wall > 0 else None,
    }
    (out / "run.json").write_text(json.dumps(run, indent=1) + "\n")
    _wait_for_ranks(model.trainer)
    return run


def _wait_for_ranks(trainer) -> None:
    """Wait for the rank processes Lightning's DDP launcher started from this one (ranks 1.. of this
    node) to end, so that the command returns when the whole run has.

    Raises
    ------
    AtlasmixError
        A rank ended with a non-zero exit status.
    """
    launcher = getattr(trainer.strategy, "launcher", None)
    for i, proc in enumerate(getattr(launcher, "procs", None) or [], start=1):
        rc = proc.wait()
        if rc != 0:
            raise AtlasmixError(f"local rank {i} ended with exit status {rc}")


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
    view = _ScviBatches(loader, batch_key, record=True, restart=True)
    dev = model.device
    loader.device = torch.device(dev)
    z = model.get_latent_representation(dataloader=view)
    ids = np.concatenate(view.joinids)
    return pd.DataFrame(z, index=pd.Index(ids, name="soma_joinid"), columns=[f"Z_{i}" for i in range(z.shape[1])])
