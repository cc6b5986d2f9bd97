"""Lightning callbacks of LDVAE training: checkpoints that can resume a run, and the budget.

:class:`EpochCheckpoint` writes Lightning checkpoints (every ``checkpoint_every`` epochs and
``last.ckpt``) where scvi-tools would write model folders; :class:`BudgetCallback` counts the cells
seen, validates every ``val_every`` optimizer steps and applies the early-stopping rule of a
:class:`~atlasmix.training.budget.Budget`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import Callback
from scvi.train import SaveCheckpoint

from atlasmix.training.budget import Budget
from atlasmix.training.ldvae.distributed import all_gather_object, broadcast_object, is_distributed


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
    validation : ScviBatches, optional
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
        if is_distributed():  # cells and training loss of every rank (each rank trains on its own shard)
            t = torch.tensor([self._cells_new, self._loss_sum, self._loss_n], dtype=torch.float64,
                             device=pl_module.device)
            dist.all_reduce(t)
            self._cells_new, self._loss_sum, self._loss_n = int(t[0]), float(t[1]), int(t[2])
            # rank 0 validates the whole split and tells the others, so every rank takes the same
            # early-stopping decision (its weights are every rank's: DDP keeps them equal)
            val = self.validation_loss(pl_module) if self.validation is not None and trainer.global_rank == 0 \
                else float("nan")
            val = float(broadcast_object(val))
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
        local = all_gather_object({"loss": (self._loss_sum, self._loss_n), "cells_new": self._cells_new})
        return {"rows": self.rows, "cells": self.cells, "best": self.best, "bad": self.bad,
                "stopped_early": self.stopped_early, "ranks": local}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows, self.cells = list(state["rows"]), int(state["cells"])
        if "ranks" in state:
            own = state["ranks"][dist.get_rank() if is_distributed() else 0]
        else:  # checkpoints written before per-rank states
            own = {"loss": state["loss"], "cells_new": 0}
        self._loss_sum, self._loss_n = own["loss"]
        self._cells_new = int(own["cells_new"])
        self.best, self.bad, self.stopped_early = state["best"], state["bad"], state["stopped_early"]
