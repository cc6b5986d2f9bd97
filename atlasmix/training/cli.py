"""``atlasmix train ...``: model training on mixtures streamed from the store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from atlasmix.training.defaults import DEFAULTS


def check_devices(devices: int, model: str) -> None:
    """Refuse ``--devices`` other than 1 with one line (multi-device training is not built yet).

    Raises
    ------
    AtlasmixError
        ``devices`` is not 1.
    """
    if devices != 1:
        from atlasmix.errors import AtlasmixError

        hint = " (Geneformer: run under torchrun --nproc_per_node N instead)" if model == "Geneformer" else ""
        raise AtlasmixError(f"--devices {devices}: {model} trains on one device per process{hint}")


def register(app: typer.Typer) -> None:
    """Add the ``train`` sub-commands (``ldvae``) to ``app``."""
    train = typer.Typer(help="Train models on a mixture, streamed from the store.", no_args_is_help=True)
    app.add_typer(train, name="train")

    @train.command("ldvae")
    def ldvae_cmd(
        store: Annotated[str, typer.Option("--store", help="Store path or URI.")],
        mixture: Annotated[Path, typer.Option("--mixture", help="Resolved manifest (.parquet) to train on "
                                                                "(its train split; validation split for losses).")],
        out: Annotated[Path, typer.Option("--out", help="Output directory (model/, loadings.parquet, "
                                                        "training_curve.csv/png, run.json, checkpoints/).")],
        accelerator: Annotated[str, typer.Option(help="Lightning accelerator: auto (CUDA when present), cpu, gpu.")] = "auto",
        devices: Annotated[int, typer.Option(help="Devices (Lightning's term); one per run today.")] = 1,
        batch_size: Annotated[int, typer.Option(help="Cells per minibatch.")] = DEFAULTS["batch_size"],
        max_epochs: Annotated[int, typer.Option(help="Epochs.")] = DEFAULTS["max_epochs"],
        seed: Annotated[int, typer.Option(help="Seed of weights, dropout and the data order.")] = 0,
        n_latent: Annotated[int, typer.Option(help="Latent dimensions.")] = DEFAULTS["n_latent"],
        n_layers: Annotated[int, typer.Option(help="Encoder hidden layers.")] = DEFAULTS["n_layers"],
        n_hidden: Annotated[int, typer.Option(help="Units per encoder hidden layer.")] = DEFAULTS["n_hidden"],
        dropout_rate: Annotated[float, typer.Option(help="Encoder dropout.")] = DEFAULTS["dropout_rate"],
        gene_likelihood: Annotated[str, typer.Option(help="nb, zinb or poisson.")] = DEFAULTS["gene_likelihood"],
        dispersion: Annotated[str, typer.Option(help="gene, gene-batch, gene-label or gene-cell.")] = DEFAULTS["dispersion"],
        lr: Annotated[float, typer.Option(help="Adam learning rate.")] = DEFAULTS["lr"],
        early_stopping: Annotated[bool, typer.Option(help="Stop when the validation loss stalls.")] = DEFAULTS["early_stopping"],
        budget: Annotated[Optional[str], typer.Option(help="Training budget instead of --max-epochs: cells=N (cells "
                                                           "seen), steps=N, epochs=N or converged:epochs=N[,patience=K]"
                                                           ".")] = None,
        batch_key: Annotated[str, typer.Option(help="obs column used as batch covariate; 'none' for no batch.")] = "dataset_id",
        genes: Annotated[Optional[str], typer.Option(help="Gene axis: all-shared (default: measured in every dataset "
                                                          "of the mixture), hvg:N[,min-datasets=F] (top N HVGs of the "
                                                          "training cells among genes measured in at least a fraction F "
                                                          "of its datasets, default 0.5) or a file with one gene "
                                                          "(feature_id or symbol) per line.")] = None,
        io_batch_size: Annotated[int, typer.Option(help="Cells per store read (memory ~ (prefetch+1) x this).")] = 16384,
        block_size: Annotated[int, typer.Option(help="Consecutive store cells kept together when shuffling.")] = 64,
        prefetch: Annotated[int, typer.Option(help="IO batches read ahead.")] = 2,
        io_threads: Annotated[int, typer.Option(help="Threads reading the store.")] = 2,
        read_processes: Annotated[int, typer.Option(help="Spawned processes reading the store (0: threads of "
                                                         "this process, the faster choice measured so far).")] = 0,
        x_cache: Annotated[Optional[Path], typer.Option(help="Local folder for a projection of X onto the training cells "
                                                             "x gene axis, built once (about one epoch's read) and "
                                                             "reused: each epoch then reads only the gene axis's "
                                                             "nonzeros (e.g. 2,000 HVGs: 6-17 % of a transcriptome's).")] = None,
        x_cache_format: Annotated[str, typer.Option(help="x cache format: tiledb (compressed) or h5 (uncompressed "
                                                         "CSR, faster to read, ~4.7x the disk space).")] = "tiledb",
        validation: Annotated[bool, typer.Option(help="Validation losses each epoch.")] = True,
        checkpoint_every: Annotated[int, typer.Option(help="Checkpoint every N epochs (0: never).")] = 10,
        resume: Annotated[bool, typer.Option("--resume", help="Continue the run in OUT from checkpoints/last.ckpt.")] = False,
        progress: Annotated[bool, typer.Option(help="Progress bar.")] = True,
    ):
        """Train scvi-tools LinearSCVI (LDVAE) on MIXTURE from STORE without building an AnnData of it."""
        from atlasmix.store import Store
        from atlasmix.training.ldvae import train_ldvae

        from atlasmix.mixing.genes import GeneAxis, resolve_gene_axis

        check_devices(devices, "LDVAE")
        store_ = Store(store)
        axis = GeneAxis.parse(genes)
        gl = resolve_gene_axis(store_, [mixture], axis, seed=seed)
        run = train_ldvae(store_, mixture, out, accelerator=accelerator, batch_size=batch_size,
                          max_epochs=max_epochs, seed=seed, n_latent=n_latent, n_layers=n_layers, n_hidden=n_hidden,
                          dropout_rate=dropout_rate, gene_likelihood=gene_likelihood, dispersion=dispersion, lr=lr,
                          early_stopping=early_stopping, budget=budget, batch_key=None if batch_key.lower() == "none" else batch_key,
                          genes=gl, io_batch_size=io_batch_size, block_size=block_size, prefetch_io=prefetch,
                          io_threads=io_threads, read_processes=read_processes, x_cache=x_cache,
                          x_cache_format=x_cache_format, validation=validation, checkpoint_every=checkpoint_every,
                          resume=resume, progress=progress)
        typer.echo(json.dumps({k: run[k] for k in ("n_cells", "n_genes", "budget", "training", "wall_s",
                                                   "train_cells_per_s")}))
        typer.echo(f"model: {Path(out) / 'model'}  loadings: {Path(out) / 'loadings.parquet'}", err=True)
