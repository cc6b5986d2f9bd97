"""LDVAE under Lightning DDP: which rank this process is, and objects exchanged between ranks.

Every rank runs :func:`atlasmix.training.ldvae.train_ldvae`; rank 0 writes the outputs and waits for
the ranks its launcher started. The Lightning strategy itself is chosen by
:func:`atlasmix.training.options.ddp_strategy`.
"""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist

from atlasmix.errors import AtlasmixError


def is_distributed() -> bool:
    """torch.distributed is initialised with more than one rank (a DDP run)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_object(obj: Any) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` outside a DDP run)."""
    if not is_distributed():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` outside a DDP run)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def launched_rank() -> int:
    """Global rank of this process as its launcher set it before training starts: 0 for the process
    the user started; Lightning's DDP launcher (``LOCAL_RANK``, ``NODE_RANK``), torchrun (``RANK``)
    and Slurm's ``srun`` (``SLURM_PROCID``) start the others with their rank in the environment."""
    for k in ("RANK", "SLURM_PROCID"):  # torchrun; srun (Lightning's SLURM environment)
        if os.environ.get(k):
            return int(os.environ[k])
    return int(os.environ.get("LOCAL_RANK") or 0) + int(os.environ.get("NODE_RANK") or 0)


def wait_for_ranks(trainer) -> None:
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
