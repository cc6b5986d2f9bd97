"""Train scvi-tools' LinearSCVI (LDVAE, Svensson et al. 2020) on a mixture streamed from the store.

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
import scvi
import torch
from lightning.pytorch import seed_everything

from atlasmix.errors import AtlasmixError
from atlasmix.mixing import read_sidecar
from atlasmix.training.budget import convergence
from atlasmix.training.ldvae.callbacks import BudgetCallback, EpochCheckpoint
from atlasmix.training.ldvae.data import ScviBatches, StoreDataModule
from atlasmix.training.ldvae.distributed import launched_rank, wait_for_ranks
from atlasmix.training.ldvae.template import library_priors, template_anndata
from atlasmix.training.loader import MixtureLoader
from atlasmix.training.options import (LDVAE_LOADER, LDVAEModelOptions, LDVAETrainOptions, LoaderOptions,
                                       route_options)
from atlasmix.training.rda import ReadDepthAugment


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
    rank0 = launched_rank() == 0  # ranks 1.. are started by a launcher while rank 0 already trains
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

    # library-size priors and the template AnnData (atlasmix.training.ldvae.template)
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
    val_view = ScviBatches(val, batch_key, restart=True) if val is not None else None
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
    wait_for_ranks(model.trainer)
    return run


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
