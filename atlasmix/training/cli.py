"""``atlasmix train ...``: model training on mixtures streamed from the store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from atlasmix.errors import AtlasmixError
from atlasmix.training.options import LDVAE_LOADER, LDVAEModelOptions, LDVAETrainOptions

#: the defaults of ``train ldvae``: its option groups' (one source for the CLI, the study spec and the API)
_MODEL, _TRAIN, _LOADER = LDVAEModelOptions(), LDVAETrainOptions(), LDVAE_LOADER


def _bytes(value: float | None, flag: str, unit: float) -> int | None:
    """A size option given in GB (``unit`` 1e9) or MB (1e6) as bytes, or None when not given.

    Raises
    ------
    AtlasmixError
        A negative, NaN or infinite value (one line at the CLI, not a conversion error).
    """
    if value is None:
        return None
    if not 0 <= value < float("inf"):
        raise AtlasmixError(f"{flag} must be a finite number >= 0, got {value}")
    return int(value * unit)


def check_devices(devices: int, model: str) -> None:
    """Refuse ``--devices`` other than 1 with one line (Geneformer runs one device per process, under torchrun).

    Raises
    ------
    AtlasmixError
        ``devices`` is not 1.
    """
    if devices != 1:
        hint = " (Geneformer: run under torchrun --nproc_per_node N instead)" if model == "Geneformer" else ""
        raise AtlasmixError(f"--devices {devices}: {model} trains on one device per process{hint}")


def train_group(app: typer.Typer) -> typer.Typer:
    """The ``atlasmix train`` sub-app of ``app``, made by the first stage that adds a training command
    (:func:`register` here; Geneformer, scGPT and scBERT add theirs to it)."""
    for g in app.registered_groups:
        if g.name == "train" and g.typer_instance is not None:
            return g.typer_instance
    train = typer.Typer(help="Train models on a mixture, streamed from the store.", no_args_is_help=True)
    app.add_typer(train, name="train")
    return train


# The options that the pretraining (train geneformer|scgpt|scbert) and embedding commands share: one
# flag, one help text (each command gives its own default).
StoreOpt = Annotated[str, typer.Option("--store", help="Store path or URI.")]
TrainSplitOpt = Annotated[Path, typer.Option("--mixture", help="Resolved manifest (.parquet); its train split.")]
AcceleratorOpt = Annotated[str, typer.Option(help="auto (CUDA when present), cpu, gpu.")]
StepCellsOpt = Annotated[int, typer.Option(help="Cells per optimizer step.")]
MegabatchOpt = Annotated[int, typer.Option(help="Batches per length-grouping megabatch.")]
EpochsOpt = Annotated[int, typer.Option(help="Epochs.")]
MaxStepsOpt = Annotated[Optional[int], typer.Option(help="Stop after this many optimizer steps.")]
MaxLrOpt = Annotated[float, typer.Option(help="Maximal learning rate.")]
WarmupOpt = Annotated[int, typer.Option(help="Linear warmup steps (capped at 10% of all steps).")]
Bf16Opt = Annotated[bool, typer.Option(help="bf16 autocast on CUDA.")]
IoBatchOpt = Annotated[int, typer.Option(help="Cells per store read.")]
LogEveryOpt = Annotated[int, typer.Option(help="Steps per training-curve row.")]
CheckpointEveryOpt = Annotated[int, typer.Option(help="Steps between checkpoints (0: at the end only).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from OUT/checkpoints/last.pt.")]
ProgressOpt = Annotated[bool, typer.Option(help="Print a line per curve row.")]
EmbedOutOpt = Annotated[Path, typer.Option("--out", help="Output .parquet (soma_joinid, obs, n_tokens, emb_*).")]
EmbedBatchOpt = Annotated[int, typer.Option(help="Cells per forward pass.")]


def echo_run(run: dict, out: Path) -> None:
    """Print what a pretraining did (``run.json``'s speed and loss) and where its model is; nothing on
    DDP ranks other than 0 (their ``run`` is empty)."""
    if run:
        typer.echo(json.dumps({k: run.get(k) for k in ("steps", "cells_this_call", "wall_s", "train_cells_per_s",
                                                       "data_wait_fraction", "final_loss")}))
        typer.echo(f"model: {Path(out) / 'model'}", err=True)


def write_embeddings(embed_cells, model: Path, store: str, where: str, out: Path, batch_size: int,
                     device: str) -> None:
    """``atlasmix MODEL embed``: the cells matching ``where`` embedded by ``embed_cells`` (a model's
    ``embed_cells(model, store, joinids, batch_size=, device=)``), written to ``out`` (parquet), and a
    summary line printed.

    Raises
    ------
    AtlasmixError
        No cell matches ``where``.
    """
    from atlasmix.store import Store
    from atlasmix.store.query import select_joinids

    s = Store(store)
    ids = select_joinids(s, where)
    if len(ids) == 0:
        raise AtlasmixError(f"no cell matches --where {where!r}")
    df = embed_cells(model, s, ids, batch_size=batch_size, device=device)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.reset_index().to_parquet(out)
    typer.echo(json.dumps({"n_cells": int(len(df)), "n_without_tokens": int((df["n_tokens"] == 0).sum()),
                           "dim": int(df.filter(like="emb_").shape[1])}))


def register(app: typer.Typer) -> None:
    """Add the ``train`` sub-commands (``ldvae``) and ``x-cache`` (``list``, ``clean``) to ``app``."""
    train = train_group(app)

    # one typer option per line, long helps wrapped: neighbouring options look alike, each is its own flag
    @train.command("ldvae")
    def ldvae_cmd(
        store: Annotated[str, typer.Option("--store", help="Store path or URI.")],
        mixture: Annotated[Path, typer.Option("--mixture", help="Resolved manifest (.parquet) to train on "
                                                                "(its train split; validation split for losses).")],
        out: Annotated[Path, typer.Option("--out", help="Output directory (model/, loadings.parquet, "
                                                        "training_curve.csv/png, run.json, checkpoints/).")],
        accelerator: Annotated[str, typer.Option(help="Lightning accelerator: auto (CUDA when present), cpu, gpu.")] = _TRAIN.accelerator,
        devices: Annotated[int, typer.Option(help="Devices per node (Lightning's term); > 1 trains with DDP, one "
                                                  "process per device, each reading its shard of the mixture.")] = _TRAIN.devices,
        strategy: Annotated[str, typer.Option(help="auto (ddp_find_unused_parameters_true on several "
                                                   "devices), ddp or ddp_find_unused_parameters_true.")] = _TRAIN.strategy,
        num_nodes: Annotated[int, typer.Option(help="Nodes (start this command on each under torchrun; see the "
                                                    "README's multi-node recipe).")] = _TRAIN.num_nodes,
        batch_size: Annotated[int, typer.Option(help="Cells per minibatch.")] = _LOADER.batch_size,
        max_epochs: Annotated[int, typer.Option(help="Epochs.")] = _TRAIN.max_epochs,
        seed: Annotated[int, typer.Option(help="Seed of weights, dropout and the data order.")] = _TRAIN.seed,
        n_latent: Annotated[int, typer.Option(help="Latent dimensions.")] = _MODEL.n_latent,
        n_layers: Annotated[int, typer.Option(help="Encoder hidden layers.")] = _MODEL.n_layers,
        n_hidden: Annotated[int, typer.Option(help="Units per encoder hidden layer.")] = _MODEL.n_hidden,
        dropout_rate: Annotated[float, typer.Option(help="Encoder dropout.")] = _MODEL.dropout_rate,
        gene_likelihood: Annotated[str, typer.Option(help="nb, zinb or poisson.")] = _MODEL.gene_likelihood,
        dispersion: Annotated[str, typer.Option(help="gene, gene-batch, gene-label or gene-cell.")] = _MODEL.dispersion,
        lr: Annotated[float, typer.Option(help="Adam learning rate.")] = _TRAIN.lr,
        early_stopping: Annotated[bool, typer.Option(help="Stop when the validation loss stalls.")] = _TRAIN.early_stopping,
        budget: Annotated[Optional[str], typer.Option(help="Training budget instead of --max-epochs: cells=N (cells "
                                                           "seen), steps=N, epochs=N or converged:epochs=N[,patience=K]"
                                                           ".")] = None,
        batch_key: Annotated[str, typer.Option(help="obs column used as batch covariate; 'none' for no batch.")] = _MODEL.batch_key,
        genes: Annotated[Optional[str], typer.Option(help="Gene axis: all-shared (default: measured in every dataset "
                                                          "of the mixture), hvg:N[,min-datasets=F] (top N HVGs of the "
                                                          "training cells among genes measured in at least a fraction F "
                                                          "of its datasets, default 0.5) or a file with one gene "
                                                          "(feature_id or symbol) per line.")] = None,
        io_batch_size: Annotated[int, typer.Option(help="Cells per store read (memory ~ (prefetch+1) x this).")] = _LOADER.io_batch_size,
        io_batch_mb: Annotated[Optional[float], typer.Option(help="Bound each store read in MB (10^6 bytes) of "
                                                                  "decoded rows instead: cells per read follow the "
                                                                  "mixture's mean nonzeros per cell, at most "
                                                                  "--io-batch-size.")] = None,
        block_size: Annotated[int, typer.Option(help="Consecutive store cells kept together when shuffling.")] = _LOADER.block_size,
        prefetch: Annotated[int, typer.Option(help="IO batches read ahead.")] = _LOADER.prefetch_io,
        io_threads: Annotated[int, typer.Option(help="Threads reading the store.")] = _LOADER.io_threads,
        read_processes: Annotated[int, typer.Option(help="Spawned processes reading the store (0: threads of "
                                                         "this process, the faster choice measured so far).")] = _LOADER.read_processes,
        x_cache: Annotated[Optional[Path], typer.Option(help="Local folder for a projection of X onto the training cells "
                                                             "x gene axis, built once (about one epoch's read) and "
                                                             "reused: each epoch then reads only the gene axis's "
                                                             "nonzeros (e.g. 2,000 HVGs: 6-17 % of a transcriptome's).")] = None,
        x_cache_format: Annotated[str, typer.Option(help="x cache format: tiledb (compressed) or h5 (uncompressed "
                                                         "CSR, faster to read, ~4.7x the disk space).")] = _LOADER.x_cache_format,
        x_cache_max_gb: Annotated[Optional[float], typer.Option(help="Size cap of the x cache folder in GB (default "
                                                                     "64 GiB or ATLASMIX_X_CACHE_MAX_GB): least "
                                                                     "recently used projections not in use are "
                                                                     "deleted to fit it.")] = None,
        in_memory: Annotated[str, typer.Option(help="Hold the training and validation cells on the gene axis in "
                                                     "memory, read once before the first epoch: auto (when a split "
                                                     "fits --in-memory-max-gb), yes or no (stream every epoch).")] = "auto",
        in_memory_max_gb: Annotated[Optional[float], typer.Option(help="Cap of --in-memory auto per split in GB "
                                                                       "(default 2 GiB or ATLASMIX_IN_MEMORY_MAX_GB)."
                                                                       )] = None,
        validation: Annotated[bool, typer.Option(help="Validation losses each epoch.")] = _TRAIN.validation,
        checkpoint_every: Annotated[int, typer.Option(help="Checkpoint every N epochs (0: never).")] = _TRAIN.checkpoint_every,
        resume: Annotated[bool, typer.Option("--resume", help="Continue the run in OUT from checkpoints/last.ckpt.")] = False,
        progress: Annotated[bool, typer.Option(help="Progress bar.")] = True,
        rda: Annotated[bool, typer.Option("--rda", help="Read-depth-aware downsampling of training cells "
                                                        "(scFoundation's augmentation), drawn anew each epoch.")] = False,
        rda_p: Annotated[float, typer.Option(help="--rda: fraction of cells downsampled.")] = 0.5,
        rda_min_total: Annotated[float, typer.Option(help="--rda: cells with fewer counts on the gene axis stay "
                                                          "whole.")] = 1000.0,
    ):
        """Train scvi-tools LinearSCVI (LDVAE) on MIXTURE from STORE without building an AnnData of it."""
        from atlasmix.errors import AtlasmixError
        from atlasmix.mixing.genes import GeneAxis, resolve_gene_axis
        from atlasmix.store import Store
        from atlasmix.training.ldvae import train_ldvae

        held = {"auto": "auto", "yes": True, "no": False}.get(in_memory.lower())
        if held is None:
            raise AtlasmixError(f"--in-memory must be auto, yes or no, got {in_memory!r}")
        model = LDVAEModelOptions(n_latent=n_latent, n_layers=n_layers, n_hidden=n_hidden, dropout_rate=dropout_rate,
                                  gene_likelihood=gene_likelihood, dispersion=dispersion,
                                  batch_key=None if batch_key.lower() == "none" else batch_key)
        training = LDVAETrainOptions(max_epochs=max_epochs, early_stopping=early_stopping, budget=budget, lr=lr,
                                     seed=seed, accelerator=accelerator, devices=devices, strategy=strategy,
                                     num_nodes=num_nodes, validation=validation, checkpoint_every=checkpoint_every,
                                     rda={"p": rda_p, "min_total": rda_min_total} if rda else None)
        loader = _LOADER.replace(batch_size=batch_size, io_batch_size=io_batch_size,
                                 io_batch_bytes=_bytes(io_batch_mb, "--io-batch-mb", 1e6),
                                 block_size=block_size, prefetch_io=prefetch, io_threads=io_threads,
                                 read_processes=read_processes, x_cache=x_cache, x_cache_format=x_cache_format,
                                 x_cache_max_bytes=_bytes(x_cache_max_gb, "--x-cache-max-gb", 1e9),
                                 in_memory=held,
                                 in_memory_max_bytes=_bytes(in_memory_max_gb, "--in-memory-max-gb", 1e9))
        store_ = Store(store)
        gl = resolve_gene_axis(store_, [mixture], GeneAxis.parse(genes), seed=seed)
        run = train_ldvae(store_, mixture, out, model_options=model, train_options=training, loader_options=loader,
                          genes=gl, resume=resume, progress=progress)
        if run.get("global_rank", 0):  # a DDP rank other than 0: rank 0 reports
            return
        typer.echo(json.dumps({k: run[k] for k in ("n_cells", "n_genes", "budget", "training", "wall_s",
                                                   "train_cells_per_s")}))
        typer.echo(f"model: {Path(out) / 'model'}  loadings: {Path(out) / 'loadings.parquet'}", err=True)

    xc = typer.Typer(help="Inspect and clean an x cache folder (train ldvae --x-cache).", no_args_is_help=True)
    app.add_typer(xc, name="x-cache")

    @xc.command("list")
    def x_cache_list(cache_dir: Path, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False):
        """Projections in CACHE_DIR, most recently used first, with their size and whether a run holds them."""
        import time

        from rich.console import Console
        from rich.table import Table

        from atlasmix.training.xcache import cap_bytes, list_x_cache

        if not cache_dir.is_dir():
            raise AtlasmixError(f"{cache_dir} is not a folder")
        rows = list_x_cache(cache_dir)
        if as_json:
            typer.echo(json.dumps({"cache_dir": str(cache_dir), "cap_bytes": cap_bytes(), "entries": rows}, indent=1))
            return
        total = sum(r["bytes"] for r in rows)
        t = Table(title=f"{cache_dir}: {len(rows)} entries, {total / 1e9:.2f} GB (cap {cap_bytes() / 1e9:.3g} GB)")
        for c in ("name", "kind", "format", "cells", "genes", "GB", "last used", "in use", "store"):
            t.add_column(c)
        for r in rows:
            ago = time.time() - r["last_used"]
            t.add_row(r["name"], r["kind"], r.get("format") or "", f"{r['n_obs']:,}" if r.get("n_obs") else "",
                      f"{r['n_vars']:,}" if r.get("n_vars") else "", f"{r['bytes'] / 1e9:.3f}",
                      f"{ago / 3600:.1f} h ago" if ago >= 3600 else f"{ago / 60:.0f} min ago",
                      "yes" if r["in_use"] else "", r.get("store_uri") or "")
        Console().print(t)

    @xc.command("clean")
    def x_cache_clean(
        cache_dir: Path,
        store: Annotated[Optional[str], typer.Option(help="Delete this store's projections of an older state "
                                                          "(they are never read again).")] = None,
        max_gb: Annotated[Optional[float], typer.Option(help="Then delete least recently used projections until "
                                                             "the folder holds at most this many GB.")] = None,
        everything: Annotated[bool, typer.Option("--all", help="Delete every projection not in use.")] = False,
    ):
        """Delete what CACHE_DIR will not read again: unfinished builds of dead processes, stale projections
        (--store), the least recently used beyond --max-gb, or all (--all). Projections a running process
        holds are never deleted."""
        from atlasmix.errors import AtlasmixError
        from atlasmix.training.xcache import clean_x_cache

        if not cache_dir.is_dir():
            raise AtlasmixError(f"{cache_dir} is not a folder")
        max_bytes = _bytes(max_gb, "--max-gb", 1e9)
        st = None
        if store is not None:
            from atlasmix.store import Store

            st = Store(store)
        r = clean_x_cache(cache_dir, max_bytes=max_bytes, stale_for=st,
                          everything=everything)
        typer.echo(json.dumps(r))
        typer.echo(f"removed {len(r['removed'])} entries ({r['freed_bytes'] / 1e9:.3f} GB); "
                   f"{len(r['kept_in_use'])} kept in use; {r['bytes'] / 1e9:.3f} GB left", err=True)
