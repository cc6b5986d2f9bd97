"""``atlasmix geneformer medians|embed`` and ``atlasmix train geneformer``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from atlasmix.errors import AtlasmixError
from atlasmix.training.cli import (AcceleratorOpt, Bf16Opt, CheckpointEveryOpt, EmbedBatchOpt, EmbedOutOpt, EpochsOpt,
                                   IoBatchOpt, LogEveryOpt, MaxLrOpt, MaxStepsOpt, MegabatchOpt, ProgressOpt, ResumeOpt,
                                   StepCellsOpt, StoreOpt, TrainSplitOpt, WarmupOpt, check_devices, echo_run,
                                   train_group, write_embeddings)
from atlasmix.training.defaults import torch_device_name


def register(app: typer.Typer) -> None:
    """Add ``geneformer medians``, ``geneformer embed`` and ``train geneformer`` to ``app``."""
    gf = typer.Typer(help="Geneformer: gene medians / dictionaries and cell embeddings.", no_args_is_help=True)
    app.add_typer(gf, name="geneformer")

    @gf.command("medians")
    def medians_cmd(
        store: StoreOpt,
        out: Annotated[Path, typer.Option("--out", help="Output folder: token_dictionary.pkl, "
                                                        "gene_median_dictionary.pkl, medians.parquet, medians.json.")],
        mixture: Annotated[Optional[Path], typer.Option("--mixture", help="Manifest: use its --split cells "
                                                                          "(default: every cell of the store).")] = None,
        split: Annotated[str, typer.Option(help="Manifest split.")] = "train",
        species: Annotated[str, typer.Option(help="Genes of this var species only ('all': every gene).")] = "human",
        special_tokens: Annotated[bool, typer.Option("--v2/--v1", help="V2 dictionary (<cls>, <eos>) or V1.")] = False,
        min_cells: Annotated[int, typer.Option(help="Keep genes nonzero in at least this many cells.")] = 1,
        chunk_size: Annotated[int, typer.Option(help="Cells per read.")] = 8192,
        genes: Annotated[Optional[str], typer.Option(help="Only genes of this axis (needs --mixture): all-shared, "
                                                          "hvg:N[,min-datasets=F] or a file.")] = None,
    ):
        """Exact per-gene nonzero medians of CP10k expression (out of core) -> Geneformer dictionaries."""
        from atlasmix.store import Store
        from atlasmix.training.geneformer.dictionaries import build_dictionaries, write_dictionaries
        from atlasmix.training.geneformer.medians import gene_medians, species_genes

        s = Store(store)
        genes_ = species_genes(s, species)
        if genes is not None:
            from atlasmix.mixing.genes import GeneAxis, gene_axis_var_joinids

            if mixture is None:
                raise AtlasmixError("--genes needs --mixture (the cells whose gene axis it is)")
            genes_ = np.intersect1d(genes_, gene_axis_var_joinids(s, mixture, GeneAxis.parse(genes), split))
        sha = None
        if mixture is not None:
            from atlasmix.mixing import read_sidecar

            sha = read_sidecar(mixture)["manifest"]["sha256"]
        med = gene_medians(s, mixture, split, genes_, chunk_size=chunk_size)
        kept = med[med["n_nonzero"] >= max(min_cells, 1)]
        d = build_dictionaries(dict(zip(kept["feature_id"], kept["median"])), special_tokens=special_tokens)
        out.mkdir(parents=True, exist_ok=True)
        write_dictionaries(d, out)
        med.to_parquet(out / "medians.parquet")
        info = {"method": "exact nonzero median of CP10k (two streaming passes)", "store": s.identity(),
                "manifest_sha256": sha, "split": split if mixture else None, "species": species,
                "n_genes": int(len(med)), "n_genes_in_dictionary": int(len(kept)), "special_tokens": special_tokens}
        (out / "medians.json").write_text(json.dumps(info, indent=1) + "\n")
        typer.echo(json.dumps({k: info[k] for k in ("n_genes", "n_genes_in_dictionary")}))

    @gf.command("embed")
    def embed_cmd(
        model: Annotated[Path, typer.Option("--model", help="Run folder of `atlasmix train geneformer` "
                                                            "(or its model/ folder).")],
        store: StoreOpt,
        where: Annotated[str, typer.Option("--where", help="SQL predicate over obs (duckdb), e.g. "
                                                           "\"dataset_id = 'pbmc3k'\".")],
        out: EmbedOutOpt,
        batch_size: EmbedBatchOpt = 64,
        accelerator: AcceleratorOpt = "auto",
        device: Annotated[Optional[str], typer.Option(hidden=True, help="Old spelling of --accelerator.")] = None,
    ):
        """Cell embeddings: mean of the second-to-last layer over the gene tokens."""
        from atlasmix.training.geneformer.embed import embed_cells

        write_embeddings(embed_cells, model, store, where, out, batch_size, torch_device_name(accelerator, device))

    train = train_group(app)

    # options shared with train scgpt / scbert: the aliases of atlasmix.training.cli, listed again here
    # because typer reads a command's options from its signature (see fm_cli)
    @train.command("geneformer")
    def train_cmd(
        store: StoreOpt,
        mixture: TrainSplitOpt,
        out: Annotated[Path, typer.Option("--out", help="Output folder (model/, dictionaries/, run.json, "
                                                        "training_curve.csv/png, checkpoints/).")],
        dictionaries: Annotated[Optional[Path], typer.Option(help="Folder with token_dictionary.pkl and "
                                                                  "gene_median_dictionary.pkl (default: medians of the train split).")] = None,
        mode: Annotated[str, typer.Option(help="Tokenizer: v1 (2048, no special tokens) or v2 (4096, <cls>/<eos>).")] = "v1",
        max_len: Annotated[Optional[int], typer.Option(help="Model input size override.")] = None,
        preset: Annotated[str, typer.Option(help="Model size: tiny, v1 (6L/256), v1-12l, v2-104m.")] = "v1",
        n_layers: Annotated[Optional[int], typer.Option(help="Override num_hidden_layers.")] = None,
        hidden_size: Annotated[Optional[int], typer.Option(help="Override hidden_size.")] = None,
        n_heads: Annotated[Optional[int], typer.Option(help="Override num_attention_heads.")] = None,
        intermediate_size: Annotated[Optional[int], typer.Option(help="Override intermediate_size.")] = None,
        batch_size: StepCellsOpt = 12,
        group_batches: MegabatchOpt = 50,
        epochs: EpochsOpt = 1,
        max_steps: MaxStepsOpt = None,
        lr: MaxLrOpt = 1e-3,
        warmup_steps: WarmupOpt = 10_000,
        weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.001,
        seed: Annotated[int, typer.Option(help="Seed of weights, masks, dropout and data order.")] = 0,
        accelerator: AcceleratorOpt = "auto",
        devices: Annotated[int, typer.Option(help="Devices of this process (1; for N GPUs run under torchrun "
                                                  "--nproc_per_node N).")] = 1,
        device: Annotated[Optional[str], typer.Option(hidden=True, help="Old spelling of --accelerator.")] = None,
        bf16: Bf16Opt = True,
        io_batch_size: IoBatchOpt = 16384,
        block_size: Annotated[int, typer.Option(help="Consecutive store cells kept together when shuffling.")] = 64,
        log_every: LogEveryOpt = 10,
        checkpoint_every: CheckpointEveryOpt = 500,
        resume: ResumeOpt = False,
        tokenizer_threads: Annotated[int, typer.Option(help="Threads of the rank value encoding.")] = 1,
        genes: Annotated[Optional[str], typer.Option(help="Restrict the vocabulary (medians of the train split) to a "
                                                          "gene axis: all-shared, hvg:N[,min-datasets=F] or a file "
                                                          "(default: every human gene, Geneformer's choice).")] = None,
        progress: ProgressOpt = False,
    ):
        """Pretrain Geneformer (BertForMaskedLM, MLM) on MIXTURE streamed from STORE."""
        from atlasmix.store import Store
        from atlasmix.training.geneformer.pretrain import train_geneformer

        check_devices(devices, "Geneformer")
        s = Store(store)
        vj = None
        if genes is not None:
            from atlasmix.mixing.genes import GeneAxis, gene_axis_var_joinids

            if dictionaries is not None:
                raise AtlasmixError("give --genes or --dictionaries, not both (dictionaries fix the vocabulary)")
            vj = gene_axis_var_joinids(s, mixture, GeneAxis.parse(genes), seed=seed)
        ov = {"num_hidden_layers": n_layers, "hidden_size": hidden_size, "num_attention_heads": n_heads,
              "intermediate_size": intermediate_size}
        run = train_geneformer(s, mixture, out, dictionaries=dictionaries, mode=mode, max_len=max_len,
                               preset=preset, config_overrides=ov, batch_size=batch_size, group_batches=group_batches,
                               epochs=epochs, max_steps=max_steps, lr=lr, warmup_steps=warmup_steps,
                               weight_decay=weight_decay, seed=seed, device=torch_device_name(accelerator, device), bf16=bf16,
                               io_batch_size=io_batch_size, block_size=block_size, log_every=log_every,
                               checkpoint_every=checkpoint_every, resume=resume, progress=progress,
                               tokenizer_threads=tokenizer_threads, var_joinids=vj)
        echo_run(run, out)
