"""``atlasmix train scgpt|scbert`` and ``atlasmix scgpt|scbert embed``: the foundation models whose
inputs are encoded on the fly from the store (scGPT value binning, scBERT expression tokens)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from atlasmix.training.cli import (AcceleratorOpt, Bf16Opt, CheckpointEveryOpt, EmbedBatchOpt, EmbedOutOpt, EpochsOpt,
                                   IoBatchOpt, LogEveryOpt, MaxLrOpt, MaxStepsOpt, MegabatchOpt, ProgressOpt, ResumeOpt,
                                   StepCellsOpt, StoreOpt, TrainSplitOpt, WarmupOpt, echo_run, train_group,
                                   write_embeddings)
from atlasmix.training.defaults import torch_device_name

#: ``--out`` of ``train scgpt`` and ``train scbert``.
RunOutOpt = Annotated[Path, typer.Option("--out", help="Output folder (model/, run.json, training_curve.csv/png, "
                                                       "checkpoints/).")]


def _embed_command(app: typer.Typer, name: str, what: str, default_batch: int) -> None:
    """``atlasmix NAME embed``: cell embeddings of a trained model for the cells matching ``--where``."""
    group = typer.Typer(help=f"{name}: cell embeddings of a model trained by `atlasmix train {name.lower()}`.",
                        no_args_is_help=True)
    app.add_typer(group, name=name.lower())

    @group.command("embed", help=f"Cell embeddings: {what}.")
    def embed_cmd(
        model: Annotated[Path, typer.Option("--model", help="Run folder of `atlasmix train` (or its model/).")],
        store: StoreOpt,
        where: Annotated[str, typer.Option("--where", help="SQL predicate over obs (duckdb).")],
        out: EmbedOutOpt,
        batch_size: EmbedBatchOpt = default_batch,
        accelerator: AcceleratorOpt = "auto",
    ):
        import importlib

        embed_cells = importlib.import_module(f"atlasmix.training.{name.lower()}.pretrain").embed_cells
        write_embeddings(embed_cells, model, store, where, out, batch_size, torch_device_name(accelerator, None))


def _pretrain(train, store: str, mixture: Path, out: Path, accelerator: str, **options) -> None:
    """The body of ``train scgpt`` and ``train scbert``: ``train(Store(store), mixture, out, device=...,
    **options)`` on the device that ``--accelerator`` names, then what the run did (:func:`echo_run`)."""
    from atlasmix.store import Store

    run = train(Store(store), mixture, out, device=torch_device_name(accelerator, None), **options)
    echo_run(run, out)


def register(app: typer.Typer) -> None:
    """Add ``train scgpt``, ``train scbert``, ``scgpt embed`` and ``scbert embed`` to ``app``."""
    _embed_command(app, "scGPT", "the <cls> token's output", 64)
    _embed_command(app, "scBERT", "the output at the appended last position", 8)
    train = train_group(app)

    # The options that train geneformer, scgpt and scbert share are the aliases of atlasmix.training.cli
    # (one flag, one help text); typer reads a command's options from its signature, so each lists them
    # (and hands them on by name to _pretrain): the signatures repeat on purpose, the body is _pretrain.
    @train.command("scgpt")
    def train_cmd(
        store: StoreOpt,
        mixture: TrainSplitOpt,
        out: RunOutOpt,
        vocab: Annotated[Optional[Path], typer.Option(help="scGPT vocabulary JSON (symbol -> id), e.g. a published "
                                                           "model's vocab.json (default: the store's gene symbols).")] = None,
        preset: Annotated[str, typer.Option(help="Model size: tiny or scgpt (12 layers, 8 heads, 512).")] = "scgpt",
        n_layers: Annotated[Optional[int], typer.Option(help="Override the layers.")] = None,
        d_model: Annotated[Optional[int], typer.Option(help="Override the embedding size.")] = None,
        n_heads: Annotated[Optional[int], typer.Option(help="Override the attention heads.")] = None,
        n_bins: Annotated[int, typer.Option(help="Value bins (bin 0: zero).")] = 51,
        max_len: Annotated[int, typer.Option(help="Tokens per cell, <cls> included.")] = 1200,
        batch_size: StepCellsOpt = 32,
        group_batches: MegabatchOpt = 50,
        epochs: EpochsOpt = 1,
        max_steps: MaxStepsOpt = None,
        lr: MaxLrOpt = 1e-4,
        warmup_steps: WarmupOpt = 1000,
        mask_ratio: Annotated[float, typer.Option(help="Fraction of each cell's tokens masked.")] = 0.4,
        seed: Annotated[int, typer.Option(help="Seed of weights, masks, binning, dropout and data order.")] = 0,
        accelerator: AcceleratorOpt = "auto",
        bf16: Bf16Opt = True,
        io_batch_size: IoBatchOpt = 16384,
        log_every: LogEveryOpt = 10,
        checkpoint_every: CheckpointEveryOpt = 500,
        resume: ResumeOpt = False,
        encoder_threads: Annotated[int, typer.Option(help="Threads of the value binning.")] = 1,
        progress: ProgressOpt = False,
    ):
        """Pretrain scGPT (masked value prediction) on MIXTURE streamed from STORE; N GPUs: torchrun."""
        from atlasmix.training.scgpt.pretrain import train_scgpt

        ov = {"n_layers": n_layers, "d_model": d_model, "n_heads": n_heads}
        _pretrain(train_scgpt, store, mixture, out, accelerator, vocab=vocab, preset=preset, config_overrides=ov,
                  n_bins=n_bins, max_len=max_len, batch_size=batch_size, group_batches=group_batches, epochs=epochs,
                  max_steps=max_steps, lr=lr, warmup_steps=warmup_steps, mask_ratio=mask_ratio, seed=seed, bf16=bf16,
                  io_batch_size=io_batch_size, log_every=log_every, checkpoint_every=checkpoint_every, resume=resume,
                  encoder_threads=encoder_threads, progress=progress)

    @train.command("scbert")
    def train_scbert_cmd(
        store: StoreOpt,
        mixture: TrainSplitOpt,
        out: RunOutOpt,
        genes: Annotated[Path, typer.Option(help="scBERT's gene axis: the var_names of its panglao_human.h5ad, or "
                                                 "a gene list (txt / tsv / csv).")],
        gene2vec: Annotated[Optional[Path], typer.Option(help="gene2vec matrix (.npy, genes x dim, axis order) for "
                                                              "fixed position embeddings (default: learnable).")] = None,
        preset: Annotated[str, typer.Option(help="Model size: tiny or scbert (dim 200, depth 6, heads 10).")] = "scbert",
        depth: Annotated[Optional[int], typer.Option(help="Override the layers.")] = None,
        dim: Annotated[Optional[int], typer.Option(help="Override the embedding size.")] = None,
        heads: Annotated[Optional[int], typer.Option(help="Override the attention heads.")] = None,
        batch_size: StepCellsOpt = 3,
        group_batches: Annotated[int, typer.Option(help="Batches encoded together.")] = 50,
        epochs: EpochsOpt = 1,
        max_steps: MaxStepsOpt = None,
        lr: MaxLrOpt = 1e-4,
        warmup_steps: WarmupOpt = 1000,
        mask_prob: Annotated[float, typer.Option(help="Fraction of each cell's nonzero tokens predicted.")] = 0.15,
        seed: Annotated[int, typer.Option(help="Seed of weights, masks, dropout and data order.")] = 0,
        accelerator: AcceleratorOpt = "auto",
        bf16: Bf16Opt = True,
        io_batch_size: IoBatchOpt = 16384,
        log_every: LogEveryOpt = 10,
        checkpoint_every: CheckpointEveryOpt = 500,
        resume: ResumeOpt = False,
        encoder_threads: Annotated[int, typer.Option(help="Threads of the token encoding.")] = 1,
        progress: ProgressOpt = False,
    ):
        """Pretrain scBERT (Performer, masked expression tokens) on MIXTURE streamed from STORE."""
        from atlasmix.training.scbert.pretrain import train_scbert

        ov = {"depth": depth, "dim": dim, "heads": heads}
        _pretrain(train_scbert, store, mixture, out, accelerator, genes=genes, gene2vec=gene2vec, preset=preset,
                  config_overrides=ov, batch_size=batch_size, group_batches=group_batches, epochs=epochs,
                  max_steps=max_steps, lr=lr, warmup_steps=warmup_steps, mask_prob=mask_prob, seed=seed, bf16=bf16,
                  io_batch_size=io_batch_size, log_every=log_every, checkpoint_every=checkpoint_every, resume=resume,
                  encoder_threads=encoder_threads, progress=progress)
