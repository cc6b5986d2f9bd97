"""The optimisation loop of the masked pretraining of foundation models streamed from the store.

Geneformer (:mod:`atlasmix.training.geneformer.pretrain`), scGPT
(:mod:`atlasmix.training.scgpt.pretrain`) and scBERT (:mod:`atlasmix.training.scbert.pretrain`)
differ in their model, encoding and masking; what they share is here: starting under ``torchrun`` (:func:`setup_distributed`), the loop over an
:class:`~atlasmix.training.stream.EncodedStream` with gradient clipping, a learning-rate schedule,
the training curve (loss, learning rate, cells/s, the fraction of wall time spent waiting for data),
and checkpoints that resume every DDP rank mid-epoch (:func:`run_pretraining`).

Why a loop of its own rather than ``transformers.Trainer`` or Lightning (issue 22 asked). The
libraries' parts are used: AdamW, Hugging Face's linear warmup/decay schedule, torch's gradient
clipping and DDP, Hugging Face's MLM collator for Geneformer. What remains here (~130 lines) is
what neither library does for these runs, which stream from the store (no gradient accumulation or
evaluation loop is needed: ``--batch-size`` sets the cells per step and evaluation is a stage of
its own):

- *Resume mid-epoch from a saved stream position.* A checkpoint holds every rank's stream position
  (loader epoch, megabatch, batch inside it) and RNG states, and the masking draws are keyed by
  ``(seed, step, rank)`` (:func:`step_generator`), so a stopped and resumed run equals an
  uninterrupted one bit for bit (tested for Geneformer, scGPT and scBERT). ``transformers.Trainer``
  resumes an ``IterableDataset`` by reading and discarding the batches already trained in the epoch
  (``accelerate.skip_first_batches``). Measured with ``benchmarks/bench_mlm_collator.py --store``
  (2-core CPU, Geneformer V1 stream of simulated whole-transcriptome cells, batch 12, two runs):
  skipping costs 1.8-3.1 ms per trained step, restoring the position 0.04-0.23 s in all (one
  megabatch read); half-way through a Genecorpus-30M epoch (1.25M steps of 12 cells) a skipping
  resume would re-read and re-encode for 37-65 minutes. Lightning's checkpoint holds rank 0's
  loader state only (every rank resumes from it) and no RNG state, so dropout after a resume
  differs from the uninterrupted run.
- *Each rank reads its own shard.* Under ``torchrun`` every rank streams its part of the store;
  accelerate (which ``transformers.Trainer`` needs, and which is not a dependency here) by default
  iterates an ``IterableDataset`` on rank 0 only and sends each rank its batches
  (``dispatch_batches``).
- *The curve the studies read*: cells/s and the fraction of time waiting for data per row.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import torch

from atlasmix.errors import AtlasmixError
from atlasmix.mixing.manifest import read_sidecar


def device_of(device: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; otherwise ``torch.device(device)``.

    Raises
    ------
    AtlasmixError
        CUDA asked for but not available.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AtlasmixError(f"--accelerator {device} requested but CUDA is not available")
    return torch.device(device)


def check_out(out: Path, resume: bool) -> Path:
    """The checkpoint path of a run folder ``out``.

    Raises
    ------
    AtlasmixError
        ``resume`` without a checkpoint, or a non-empty ``out`` without ``resume``.
    """
    ck = out / "checkpoints" / "last.pt"
    if resume and not ck.is_file():
        raise AtlasmixError(f"nothing to resume: {ck} does not exist")
    if not resume and out.exists() and any(out.iterdir()):
        raise AtlasmixError(f"{out} is not empty (pass --resume to continue a run there)")
    return ck


def check_run(out: str | Path, resume: bool, *, model: str, preset: str, presets, batch_size: int,
              group_batches: int, epochs: int, max_steps: int | None) -> Path:
    """The checks an scGPT or scBERT run starts with: :func:`check_out`, the preset, the sizes.

    Returns
    -------
    pathlib.Path
        ``out``.

    Raises
    ------
    AtlasmixError
        As :func:`check_out`; a preset not in ``presets``; a batch size, group batches, epochs or
        max steps below 1.
    """
    out = Path(out)
    check_out(out, resume)
    if preset not in presets:
        raise AtlasmixError(f"unknown {model} preset {preset!r} (one of {', '.join(presets)})")
    if batch_size < 1 or group_batches < 1 or epochs < 1 or (max_steps is not None and max_steps < 1):
        raise AtlasmixError("batch size, group batches, epochs and max steps must be >= 1")
    return out


def pin_run_config(out: Path, config: dict[str, Any], resume: bool, rank: int) -> None:
    """The settings that shape a run's model (sizes, encoding, gene axis), fixed at its start in
    ``out/run_config.json``: a resume with other settings is refused before any weight is loaded.

    Raises
    ------
    AtlasmixError
        ``resume`` with settings that differ from the saved ones.
    """
    import json

    path = out / "run_config.json"
    config = json.loads(json.dumps(config, default=str))  # as it reads back
    if resume and path.is_file():
        saved = json.loads(path.read_text())
        diff = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
        if diff:
            raise AtlasmixError(f"--resume with other settings than the run in {out} started with: "
                                + ", ".join(f"{k} {saved.get(k)!r} -> {config.get(k)!r}" for k in diff))
    elif rank == 0:
        path.write_text(json.dumps(config, indent=1) + "\n")


class Distributed(NamedTuple):
    """Where this process trains (:func:`setup_distributed`)."""

    #: A process group is up (``torchrun``).
    dist: bool
    rank: int
    world: int
    device: torch.device


def setup_distributed(device: str) -> Distributed:
    """``(distributed, rank, world_size, device)``; under ``torchrun`` (``WORLD_SIZE`` > 1) the process
    group is initialised here (NCCL on CUDA, gloo on CPU) and each rank takes its ``LOCAL_RANK`` GPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        cuda = device != "cpu" and torch.cuda.is_available()
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if dist else 0
    world = torch.distributed.get_world_size() if dist else 1
    if dist and device in ("auto", "cuda") and torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    dev = device_of(device)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
    return Distributed(dist, rank, world, dev)


def start_run(manifest: str | Path, out: Path, device: str, seed: int) -> tuple[dict[str, Any], Distributed]:
    """The start every pretraining shares once its options are checked: the manifest's sidecar
    (:func:`atlasmix.mixing.read_sidecar`), the run folder made, :func:`setup_distributed`, torch
    seeded with ``seed``.

    Raises
    ------
    AtlasmixError
        A manifest without its sidecar, a device that is not there.
    """
    side = read_sidecar(manifest)
    out.mkdir(parents=True, exist_ok=True)
    ctx = setup_distributed(device)
    torch.manual_seed(seed)
    return side, ctx


@dataclass(frozen=True)
class LoopOptions:
    """How :func:`run_pretraining` optimises and for how long: the keyword arguments of the same
    names of ``train_geneformer``, ``train_scgpt`` and ``train_scbert``.

    Attributes
    ----------
    lr, weight_decay : float
        AdamW's (maximal) learning rate and weight decay.
    warmup_steps : int
        Linear warmup (capped at 10 % of the steps, :func:`optimizer_and_schedule`).
    max_grad_norm : float
        Gradient clipping (0: none).
    epochs, max_steps : int
        Passes over the train split; ``max_steps`` stops earlier and sets the schedule length.
    stop_after : int, optional
        Stop after this step as if interrupted (the schedule still spans the whole run).
    log_every, checkpoint_every : int
        Optimizer steps between curve rows / checkpoints (0: checkpoint only at the end).
    resume : bool
        Continue from ``out/checkpoints/last.pt``.
    progress : bool
        Print a line per curve row (rank 0).
    """

    lr: float
    weight_decay: float
    warmup_steps: int
    max_grad_norm: float
    epochs: int = 1
    max_steps: int | None = None
    stop_after: int | None = None
    log_every: int = 10
    checkpoint_every: int = 500
    resume: bool = False
    progress: bool = False


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """A CPU generator keyed by ``(seed, step, rank)``: the masking draws of one optimizer step.

    Ranks draw independently, and a resumed run draws at each step what the uninterrupted run drew,
    whatever was drawn before (the global RNG, which dropout uses, is saved and restored by
    :func:`run_pretraining` instead).
    """
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step) + (int(rank) << 40))


def optimizer_and_schedule(model: torch.nn.Module, *, lr: float, weight_decay: float, warmup_steps: int,
                           total_steps: int, no_decay: Callable[[str], bool] = lambda name: False):
    """AdamW and a learning-rate schedule of linear warmup then linear decay to 0
    (``transformers.get_linear_schedule_with_warmup``), as the pretraining scripts use.

    Parameters
    ----------
    model : torch.nn.Module
        Its trainable parameters are optimised (frozen ones, e.g. fixed gene2vec positions, are not).
    lr, weight_decay : float
    warmup_steps : int
        Capped at 10 % of ``total_steps`` (at least 1).
    total_steps : int
        Optimizer steps of the whole run.
    no_decay : callable
        ``name -> bool``: parameters without weight decay (biases, norms).

    Returns
    -------
    (torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR, int)
        Optimizer, scheduler and the warmup steps used.
    """
    from transformers import get_linear_schedule_with_warmup

    warm = int(min(warmup_steps, max(1, total_steps // 10)))
    decay, plain = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (plain if no_decay(n) else decay).append(p)
    groups = [{"params": ps, "weight_decay": wd} for ps, wd in ((decay, weight_decay), (plain, 0.0)) if ps]
    opt = torch.optim.AdamW(groups, lr=lr)
    return opt, get_linear_schedule_with_warmup(opt, warm, total_steps), warm


def wrap_ddp(module: torch.nn.Module, ctx: Distributed) -> torch.nn.Module:
    """``module`` in DistributedDataParallel when the process group is up, else itself."""
    if not ctx.dist:
        return module
    dev = ctx.device
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=[dev.index] if dev.type == "cuda" else None)


def run_record(res: dict[str, Any], *, manifest: Path | str, side: dict, store, n_train: int,
               resume: bool) -> dict[str, Any]:
    """The ``run.json`` fields every pretraining run shares: the manifest and store it trained on and
    what :func:`run_pretraining` (``res``) did this call. ``cells_this_call`` is this rank's (times the
    world size for all ranks)."""
    wall = res["wall_s"]
    return {
        "manifest": {"path": str(Path(manifest).resolve()), "sha256": side["manifest"]["sha256"],
                     "name": side.get("name"), "spec_hash": side.get("spec_hash")},
        "store": store.identity(),
        "n_cells": {"train": n_train},
        "resumed": bool(resume),
        "steps": res["step"],
        "steps_per_epoch": res["steps_per_epoch"],
        "cells_this_call": res["cells"],
        "tokens_this_call": res["tokens"],
        "wall_s": round(wall, 3),
        "train_cells_per_s": round(res["cells"] / wall, 3) if wall > 0 else None,
        "data_wait_fraction": round(res["wait_s"] / wall, 4) if wall > 0 else None,
        "final_loss": res["rows"][-1]["loss"] if res["rows"] else None,
    }


def plot_curve(df: pd.DataFrame, path: Path, loss_label: str = "train loss") -> None:
    """Training loss and learning rate per logged step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(df["step"], df["loss"], label=loss_label)
    ax[0].set_xlabel("optimizer step")
    ax[0].set_ylabel(loss_label)
    ax[0].legend()
    ax[1].plot(df["step"], df["lr"])
    ax[1].set_xlabel("optimizer step")
    ax[1].set_ylabel("learning rate")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_pretraining(*, model: torch.nn.Module, net: torch.nn.Module, stream, out: Path,
                    step_loss: Callable[[dict, int], tuple[torch.Tensor, int, int]], loop: LoopOptions,
                    ctx: Distributed, no_decay: Callable[[str], bool] = lambda name: False,
                    loss_label: str = "train loss") -> dict[str, Any]:
    """Train ``net`` over ``stream`` until ``loop.epochs`` or ``loop.max_steps`` (module doc).

    Parameters
    ----------
    model : torch.nn.Module
        The module whose ``state_dict`` is checkpointed (inside ``net``) and whose trainable
        parameters AdamW optimises (:func:`optimizer_and_schedule`, stepped once per batch).
    net : torch.nn.Module
        What ``step_loss`` calls (:func:`wrap_ddp`).
    stream : atlasmix.training.stream.EncodedStream
    out : pathlib.Path
        Run folder: ``checkpoints/last.pt`` and ``training_curve.csv/png`` are written there.
    step_loss : callable
        ``(batch, step) -> (loss, cells, tokens)``: masking and forward pass of one batch (its draws
        should be a function of the seed, ``step`` and rank, :func:`step_generator`, so that a
        resumed run equals an uninterrupted one).
    loop : LoopOptions
        Optimisation and how long; ``loop.resume`` continues from ``out/checkpoints/last.pt``:
        weights, optimizer, schedule, every rank's stream position and RNG states.
    ctx : Distributed
        :func:`setup_distributed`.
    no_decay : callable
        ``name -> bool``: parameters without weight decay.
    loss_label : str
        The loss axis of ``training_curve.png``.

    Returns
    -------
    dict
        ``step``, ``epoch``, ``rows`` (the curve), ``cells`` and ``tokens`` (this rank, this call),
        ``wait_s``, ``wall_s``, ``steps_per_epoch`` and ``warmup_steps`` (as capped).

    Raises
    ------
    AtlasmixError
        A checkpoint saved by another number of ranks.
    """
    epochs, max_steps, stop_after = loop.epochs, loop.max_steps, loop.stop_after
    dist, rank, world = ctx.dist, ctx.rank, ctx.world
    per_epoch = len(stream)
    opt, sched, warm = optimizer_and_schedule(model, lr=loop.lr, weight_decay=loop.weight_decay,
                                              warmup_steps=loop.warmup_steps, no_decay=no_decay,
                                              total_steps=int(max_steps) if max_steps else per_epoch * epochs)
    loader = stream.loader
    ck = out / "checkpoints" / "last.pt"
    step, epoch, rows = 0, 0, []
    if loop.resume:
        st = torch.load(ck, map_location="cpu", weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        # each rank its own stream position and RNG states (one entry per rank, see save_checkpoint)
        mine = st["ranks"] if "ranks" in st else [{k: st[k] for k in ("stream", "torch_rng", "cuda_rng") if k in st}]
        if len(mine) != world:
            raise AtlasmixError(f"the checkpoint was saved by {len(mine)} rank(s); this run has {world} "
                                "(resume with the same torchrun --nproc_per_node / --nnodes)")
        mine = mine[rank]
        stream.load_state_dict(mine["stream"])
        step, epoch = int(st["step"]), int(st["epoch"])
        torch.set_rng_state(mine["torch_rng"])
        if "cuda_rng" in mine and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(mine["cuda_rng"])
        if "rows" in st:  # the curve up to the checkpoint travels inside it (see save_checkpoint)
            rows = list(st["rows"])
        elif (out / "training_curve.csv").is_file():  # checkpoints written before the curve moved in
            old = pd.read_csv(out / "training_curve.csv")
            rows = old[old["step"] <= step].to_dict("records")

    def save_checkpoint() -> None:
        # every rank reaches this at the same step (equal batch counts): its stream position and RNG
        # states are gathered so that rank 0's checkpoint resumes every rank
        own = {"stream": stream.state_dict(), "torch_rng": torch.get_rng_state()}
        if torch.cuda.is_available():
            own["cuda_rng"] = torch.cuda.get_rng_state_all()
        ranks = [own]
        if dist:
            ranks = [None] * world
            torch.distributed.all_gather_object(ranks, own)
        if rank != 0:
            return
        ck.parent.mkdir(parents=True, exist_ok=True)
        # the curve so far goes inside the checkpoint: a run killed between the checkpoint's rename and
        # the CSV's write (or during it) resumes from one file that is either whole or absent
        state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                 "ranks": ranks, "step": step, "epoch": epoch, "rows": list(rows)}
        tmp = ck.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(ck)
        tmp = out / "training_curve.csv.tmp"
        pd.DataFrame(rows).to_csv(tmp, index=False)
        tmp.replace(out / "training_curve.csv")

    def stopping() -> bool:
        return bool((max_steps and step >= max_steps) or (stop_after and step >= stop_after))

    net.train()
    t0 = time.perf_counter()
    cells = tokens = 0
    wait = 0.0
    acc_loss, acc_n, acc_cells, acc_wait, t_log = 0.0, 0, 0, 0.0, time.perf_counter()

    def log_row(now: float) -> dict:
        return {"step": step, "epoch": epoch, "loss": acc_loss / max(acc_n, 1), "lr": sched.get_last_lr()[0],
                "cells_per_s": acc_cells / max(now - t_log, 1e-9),
                "data_wait_fraction": acc_wait / max(now - t_log, 1e-9), "wall_s": now - t0}

    done = stopping()
    empty_passes = 0  # passes over the split that gave no training batch (one is possible right after a resume)
    while not done and (bool(max_steps) or epoch < epochs):
        if stream.sub_done == 0 and loader.batches_done == 0:
            loader.set_epoch(epoch)
        elif loader.epoch != epoch:  # resumed at an epoch boundary
            epoch = loader.epoch
        it = iter(stream)
        got = 0
        while True:
            tw = time.perf_counter()
            try:
                b = next(it)
            except StopIteration:
                break
            got += 1
            dt = time.perf_counter() - tw
            wait += dt
            acc_wait += dt
            loss, n, n_tok = step_loss(b, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if loop.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), loop.max_grad_norm)
            opt.step()
            sched.step()
            step += 1
            cells += n
            tokens += n_tok
            acc_loss += float(loss.detach()) * n
            acc_n += n
            acc_cells += n
            if step % loop.log_every == 0 or stopping():
                now = time.perf_counter()
                rows.append(log_row(now))
                if loop.progress and rank == 0:
                    r = rows[-1]
                    print(f"step {step} epoch {epoch} loss {r['loss']:.4f} lr {r['lr']:.2e} "
                          f"{r['cells_per_s']:.0f} cells/s wait {r['data_wait_fraction']:.0%}", flush=True)
                acc_loss, acc_n, acc_cells, acc_wait, t_log = 0.0, 0, 0, 0.0, now
            if loop.checkpoint_every and step % loop.checkpoint_every == 0:
                save_checkpoint()
            if stopping():
                done = True
                break
        empty_passes = 0 if got else empty_passes + 1
        if empty_passes >= 2:  # a step budget would loop forever, an epoch budget "train" 0 steps
            raise AtlasmixError("the training split gives no training batch: every cell is empty on the "
                                "model's gene axis (choose genes its datasets measure)")
        if not done:
            epoch += 1
    if acc_n:
        rows.append(log_row(time.perf_counter()))
    wall = time.perf_counter() - t0
    save_checkpoint()
    if dist:
        # every rank got here (a run that ended normally; after a failure, destroying could hang on
        # the other ranks) and no collective follows: shut the process group down now, while the
        # interpreter is whole. Left to interpreter exit, gloo's worker threads can abort a rank
        # (SIGABRT, "terminate called without an active exception": pytorch/pytorch#190489), which
        # failed a resumed 2-rank run once in CI.
        torch.distributed.destroy_process_group()
    if rank == 0:
        curve = pd.DataFrame(rows)
        curve.to_csv(out / "training_curve.csv", index=False)
        if len(curve):
            plot_curve(curve, out / "training_curve.png", loss_label)
    return {"step": step, "epoch": epoch, "rows": rows, "cells": cells, "tokens": tokens, "wait_s": wait,
            "wall_s": wall, "steps_per_epoch": per_epoch, "warmup_steps": warm}
