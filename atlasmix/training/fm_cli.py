"""``atlasmix train scgpt|scbert`` and ``atlasmix scgpt|scbert embed``: the foundation models whose
inputs are encoded on the fly from the store (scGPT value binning, scBERT expression tokens)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from atlasmix.errors import AtlasmixError
from atlasmix.training.defaults import torch_device_name


def _embed_command(app: typer.Typer, name: str, what: str, default_batch: int) -> None:
    """``atlasmix NAME embed``: cell embeddings of a trained model for the cells matching ``--where``."""
    group = typer.Typer(help=f"{name}: cell embeddings of a model trained by `atlasmix train {name.lower()}`.",
                        no_args_is_help=True)
    app.add_typer(group, name=name.lower())

    @group.command("embed", help=f"Cell embeddings: {what}.")
    def embed_cmd(
        model: Annotated[Path, typer.Option("--model", help="Run folder of `atlasmix train` (or its model/).")],
        store: Annotated[str, typer.Option("--store", help="Store path or URI.")],
        where: Annotated[str, typer.Option("--where", help="SQL predicate over obs (duckdb).")],
        out: Annotated[Path, typer.Option("--out", help="Output .parquet (soma_joinid, obs, n_tokens, emb_*).")],
        batch_size: Annotated[int, typer.Option(help="Cells per forward pass.")] = default_batch,
        accelerator: Annotated[str, typer.Option(help="auto (CUDA when present), cpu, gpu.")] = "auto",
    ):
        import importlib

        from atlasmix.store import Store
        from atlasmix.store.query import select_joinids

        embed_cells = importlib.import_module(f"atlasmix.training.{name.lower()}.pretrain").embed_cells
        s = Store(store)
        ids = select_joinids(s, where)
        if len(ids) == 0:
            raise AtlasmixError(f"no cell matches --where {where!r}")
        df = embed_cells(model, s, ids, batch_size=batch_size, device=torch_device_name(accelerator, None))
        out.parent.mkdir(parents=True, exist_ok=True)
        df.reset_index().to_parquet(out)
        typer.echo(json.dumps({"n_cells": int(len(df)), "n_without_tokens": int((df["n_tokens"] == 0).sum()),
                               "dim": int(df.filter(like="emb_").shape[1])}))


def _echo_run(run: dict, out: Path) -> None:
    if run:  # rank 0 (under torchrun the other ranks return nothing)
        typer.echo(json.dumps({k: run.get(k) for k in ("steps", "cells_this_call", "wall_s", "train_cells_per_s",
                                                       "data_wait_fraction", "final_loss")}))
        typer.echo(f"model: {Path(out) / 'model'}", err=True)


def register(app: typer.Typer) -> None:
    """Add ``train scgpt``, ``train scbert``, ``scgpt embed`` and ``scbert embed`` to ``app``."""
    from atlasmix.training.geneformer.cli import _train_group

    _embed_command(app, "scGPT", "the <cls> token's output", 64)
    _embed_command(app, "scBERT", "the output at the appended last position", 8)
    train = _train_group(app)

    @train.command("scgpt")
    def train_cmd(
        store: Annotated[str, typer.Option("--store", help="Store path or URI.")],
        mixture: Annotated[Path, typer.Option("--mixture", help="Resolved manifest (.parquet); its train split.")],
        out: Annotated[Path, typer.Option("--out", help="Output folder (model/, run.json, training_curve.csv/png, "
                                                        "checkpoints/).")],
        vocab: Annotated[Optional[Path], typer.Option(help="scGPT vocabulary JSON (symbol -> id), e.g. a published "
                                                           "model's vocab.json (default: the store's gene symbols).")] = None,
        preset: Annotated[str, typer.Option(help="Model size: tiny or scgpt (12 layers, 8 heads, 512).")] = "scgpt",
        n_layers: Annotated[Optional[int], typer.Option(help="Override the layers.")] = None,
        d_model: Annotated[Optional[int], typer.Option(help="Override the embedding size.")] = None,
        n_heads: Annotated[Optional[int], typer.Option(help="Override the attention heads.")] = None,
        n_bins: Annotated[int, typer.Option(help="Value bins (bin 0: zero).")] = 51,
        max_len: Annotated[int, typer.Option(help="Tokens per cell, <cls> included.")] = 1200,
        batch_size: Annotated[int, typer.Option(help="Cells per optimizer step.")] = 32,
        group_batches: Annotated[int, typer.Option(help="Batches per length-grouping megabatch.")] = 50,
        epochs: Annotated[int, typer.Option(help="Epochs.")] = 1,
        max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many optimizer steps.")] = None,
        lr: Annotated[float, typer.Option(help="Maximal learning rate.")] = 1e-4,
        warmup_steps: Annotated[int, typer.Option(help="Linear warmup steps (capped at 10% of all steps).")] = 1000,
        mask_ratio: Annotated[float, typer.Option(help="Fraction of each cell's tokens masked.")] = 0.4,
        seed: Annotated[int, typer.Option(help="Seed of weights, masks, binning, dropout and data order.")] = 0,
        accelerator: Annotated[str, typer.Option(help="auto (CUDA when present), cpu, gpu.")] = "auto",
        bf16: Annotated[bool, typer.Option(help="bf16 autocast on CUDA.")] = True,
        io_batch_size: Annotated[int, typer.Option(help="Cells per store read.")] = 16384,
        log_every: Annotated[int, typer.Option(help="Steps per training-curve row.")] = 10,
        checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints (0: at the end only).")] = 500,
        resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/checkpoints/last.pt.")] = False,
        encoder_threads: Annotated[int, typer.Option(help="Threads of the value binning.")] = 1,
        progress: Annotated[bool, typer.Option(help="Print a line per curve row.")] = False,
    ):
        """Pretrain scGPT (masked value prediction) on MIXTURE streamed from STORE; N GPUs: torchrun."""
        from atlasmix.store import Store
        from atlasmix.training.scgpt.pretrain import train_scgpt

        ov = {"n_layers": n_layers, "d_model": d_model, "n_heads": n_heads}
        run = train_scgpt(Store(store), mixture, out, vocab=vocab, preset=preset, config_overrides=ov, n_bins=n_bins,
                          max_len=max_len, batch_size=batch_size, group_batches=group_batches, epochs=epochs,
                          max_steps=max_steps, lr=lr, warmup_steps=warmup_steps, mask_ratio=mask_ratio, seed=seed,
                          device=torch_device_name(accelerator, None), bf16=bf16, io_batch_size=io_batch_size,
                          log_every=log_every, checkpoint_every=checkpoint_every, resume=resume,
                          encoder_threads=encoder_threads, progress=progress)
        _echo_run(run, out)

    @train.command("scbert")
    def train_scbert_cmd(
        store: Annotated[str, typer.Option("--store", help="Store path or URI.")],
        mixture: Annotated[Path, typer.Option("--mixture", help="Resolved manifest (.parquet); its train split.")],
        out: Annotated[Path, typer.Option("--out", help="Output folder (model/, run.json, training_curve.csv/png, "
                                                        "checkpoints/).")],
        genes: Annotated[Path, typer.Option(help="scBERT's gene axis: the var_names of its panglao_human.h5ad, or "
                                                 "a gene list (txt / tsv / csv).")],
        gene2vec: Annotated[Optional[Path], typer.Option(help="gene2vec matrix (.npy, genes x dim, axis order) for "
                                                              "fixed position embeddings (default: learnable).")] = None,
        preset: Annotated[str, typer.Option(help="Model size: tiny or scbert (dim 200, depth 6, heads 10).")] = "scbert",
        depth: Annotated[Optional[int], typer.Option(help="Override the layers.")] = None,
        dim: Annotated[Optional[int], typer.Option(help="Override the embedding size.")] = None,
        heads: Annotated[Optional[int], typer.Option(help="Override the attention heads.")] = None,
        batch_size: Annotated[int, typer.Option(help="Cells per optimizer step.")] = 3,
        group_batches: Annotated[int, typer.Option(help="Batches encoded together.")] = 50,
        epochs: Annotated[int, typer.Option(help="Epochs.")] = 1,
        max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many optimizer steps.")] = None,
        lr: Annotated[float, typer.Option(help="Maximal learning rate.")] = 1e-4,
        warmup_steps: Annotated[int, typer.Option(help="Linear warmup steps (capped at 10% of all steps).")] = 1000,
        mask_prob: Annotated[float, typer.Option(help="Fraction of each cell's nonzero tokens predicted.")] = 0.15,
        seed: Annotated[int, typer.Option(help="Seed of weights, masks, dropout and data order.")] = 0,
        accelerator: Annotated[str, typer.Option(help="auto (CUDA when present), cpu, gpu.")] = "auto",
        bf16: Annotated[bool, typer.Option(help="bf16 autocast on CUDA.")] = True,
        io_batch_size: Annotated[int, typer.Option(help="Cells per store read.")] = 16384,
        log_every: Annotated[int, typer.Option(help="Steps per training-curve row.")] = 10,
        checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints (0: at the end only).")] = 500,
        resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/checkpoints/last.pt.")] = False,
        encoder_threads: Annotated[int, typer.Option(help="Threads of the token encoding.")] = 1,
        progress: Annotated[bool, typer.Option(help="Print a line per curve row.")] = False,
    ):
        """Pretrain scBERT (Performer, masked expression tokens) on MIXTURE streamed from STORE."""
        from atlasmix.store import Store
        from atlasmix.training.scbert.pretrain import train_scbert

        run = train_scbert(Store(store), mixture, out, genes=genes, gene2vec=gene2vec, preset=preset,
                           config_overrides={"depth": depth, "dim": dim, "heads": heads}, batch_size=batch_size,
                           group_batches=group_batches, epochs=epochs, max_steps=max_steps, lr=lr,
                           warmup_steps=warmup_steps, mask_prob=mask_prob, seed=seed,
                           device=torch_device_name(accelerator, None), bf16=bf16, io_batch_size=io_batch_size,
                           log_every=log_every, checkpoint_every=checkpoint_every, resume=resume,
                           encoder_threads=encoder_threads, progress=progress)
        _echo_run(run, out)
