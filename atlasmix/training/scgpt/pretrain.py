"""scGPT pretraining (masked value prediction) on a mixture streamed from the store.

Cells come from :class:`atlasmix.training.loader.MixtureLoader` (per-epoch shuffle, DDP shards under
``torchrun``), are value binned and tokenized on the fly (:class:`ScGPTStream`, scGPT's
:mod:`~atlasmix.training.scgpt.encoding`), and train :class:`~atlasmix.training.scgpt.model.ScGPTModel`
with scGPT's pretraining objective (Cui et al. 2024; ``scgpt/tokenizer/gene_tokenizer.py``,
``random_mask_value``; ``scgpt/loss.py``, ``masked_mse_loss``): in every cell ``int(0.4 n)`` of its
``n`` non-padding tokens, drawn uniformly, get the value -1 (``mask_value``) and the GEP head
predicts their binned values; the loss is the mean squared error over the masked tokens.

Differences from scGPT's scripts: the masking draws come from a torch generator keyed by
``(seed, step, rank)`` (so a resumed run equals an uninterrupted one); AdamW with linear warmup and
decay (scGPT: Adam, StepLR); length-grouped training batches padded to their longest cell (scGPT
pads every cell to ``max_len``); bf16 autocast on CUDA (scGPT: fp16 AMP); the GEPC (MVC) objective
is not built.

Outputs (directory ``out``): ``model/`` (``config.json`` with the sizes, binning and vocabulary
settings, ``model.safetensors``, ``vocab.json``, ``genes.tsv``: the store genes (Ensembl ids) behind
the gene tokens; :func:`atlasmix.training.scgpt.model.load_scgpt`
reloads it), ``training_curve.csv/png``, ``run.json``, ``checkpoints/last.pt`` (``resume=True``
continues mid-epoch).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from atlasmix.errors import AtlasmixError
from atlasmix.training.pretrain_loop import (LoopOptions, check_run, device_of, pin_run_config, run_pretraining,
                                             run_record, start_run, step_generator, wrap_ddp)
from atlasmix.training.scgpt.encoding import (CLS, MASK_VALUE, MAX_LEN, N_BINS, PAD, PAD_VALUE, ScGPTEncoder,
                                              load_vocab, vocabulary_axis)
from atlasmix.training.scgpt.model import PRESETS, ScGPTModel, load_scgpt
from atlasmix.training.stream import (EncodedStream, cells_to_embed, embedding_loader, embedding_table,
                                     train_loader)

#: scGPT's pretraining settings (``mask_ratio``; learning rate of its whole-human pretraining).
TRAIN_DEFAULTS = dict(lr=1e-4, weight_decay=0.0, warmup_steps=1_000, batch_size=32, mask_ratio=0.4)
VOCAB_FILE = "vocab.json"
AXIS_FILE = "genes.tsv"


class ScGPTStream(EncodedStream):
    """Training batches of scGPT inputs from a sparse loader on the vocabulary axis.

    Parameters
    ----------
    loader : atlasmix.training.loader.MixtureLoader
        ``sparse=True``, ``var_joinids = axis["var_joinids"]``; its batch size is the megabatch.
    encoder : atlasmix.training.scgpt.encoding.ScGPTEncoder
    batch_size, group_by_length, drop_empty, prefetch
        :class:`~atlasmix.training.stream.EncodedStream`.

    Yields
    ------
    dict
        ``genes`` int64 (b, L), ``values`` float32 (b, L) (``<pad>`` / -2 after ``lengths``),
        ``lengths``, ``soma_joinid``, the loader's obs codes. The encoder's draws follow the loader's
        epoch.
    """

    n_special = 1  # <cls>
    thread_name = "atlasmix-scgpt"

    def __init__(self, loader, encoder: ScGPTEncoder, batch_size: int | None = None, group_by_length: bool = True,
                 drop_empty: bool = True, prefetch: int = 2):
        if not loader.sparse:
            raise AtlasmixError("ScGPTStream needs a loader with sparse=True")
        super().__init__(loader, batch_size, group_by_length, drop_empty, prefetch)
        self.encoder = encoder

    def encode(self, b: dict[str, Any]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        self.encoder.set_epoch(self.loader.epoch)
        e = self.encoder(b)
        return {"genes": e["genes"].numpy(), "values": e["values"].numpy()}, e["lengths"].numpy()


def mask_values(values: torch.Tensor, ratio: float, generator: torch.Generator, *, pad_value: float = PAD_VALUE,
                mask_value: float = MASK_VALUE) -> tuple[torch.Tensor, torch.Tensor]:
    """scGPT's ``random_mask_value``: per cell, ``int(ratio * n)`` of its ``n`` non-padding tokens,
    uniformly without replacement, get ``mask_value``.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        Masked values (same shape and dtype) and the mask, bool (B, L).
    """
    real = values.ne(pad_value)
    k = (real.sum(1).double() * ratio).floor().long()  # int(n * ratio)
    scores = torch.rand(values.shape, generator=generator).to(values.device)
    scores = scores.masked_fill(~real, 2.0)
    rank = scores.argsort(dim=1).argsort(dim=1)
    mask = rank < k[:, None]
    return values.masked_fill(mask, mask_value), mask


def store_vocab(store) -> dict[str, int]:
    """A vocabulary of the store's gene symbols (sorted; ids from 0) and scGPT's special tokens, for
    pretraining from scratch without scGPT's published vocabulary."""
    sym = sorted(set(store.var()["feature_name"].astype(str)) - {PAD, CLS, "<eoc>"})
    return {s: i for i, s in enumerate(sym)} | {PAD: len(sym), CLS: len(sym) + 1, "<eoc>": len(sym) + 2}


# Its keyword arguments are the Python API that the CLI, the study grid, tests and benchmarks call;
# train_geneformer and train_scbert take the same names for the same settings (LoopOptions and
# train_loader inside), so the three signatures repeat those lines on purpose, and so do the
# numpydoc entries of the parameters they share (store, manifest, out; Returns, Raises).
def train_scgpt(store, manifest: str | Path, out: str | Path, *, vocab: str | Path | None = None,
                preset: str = "scgpt", config_overrides: dict[str, Any] | None = None, n_bins: int = N_BINS,
                max_len: int = MAX_LEN, batch_size: int = TRAIN_DEFAULTS["batch_size"], group_batches: int = 50,
                epochs: int = 1, max_steps: int | None = None, lr: float = TRAIN_DEFAULTS["lr"],
                warmup_steps: int = TRAIN_DEFAULTS["warmup_steps"],
                weight_decay: float = TRAIN_DEFAULTS["weight_decay"],
                mask_ratio: float = TRAIN_DEFAULTS["mask_ratio"], max_grad_norm: float = 1.0, seed: int = 0,
                device: str = "auto", bf16: bool = True, io_batch_size: int = 16384, block_size: int = 64,
                prefetch_io: int = 2, io_threads: int = 2, log_every: int = 10, checkpoint_every: int = 500,
                resume: bool = False, encoder_threads: int = 1, progress: bool = False,
                stop_after: int | None = None) -> dict[str, Any]:
    """Pretrain scGPT on a manifest's train split, streamed from the store (module doc).

    Parameters
    ----------
    store : atlasmix.store.Store
    manifest : path
        Resolved manifest ``.parquet``.
    out : path
        Output folder (module doc); must be empty unless ``resume``.
    vocab : path, optional
        scGPT's vocabulary JSON (e.g. ``vocab.json`` of a published model); default: the store's gene
        symbols (:func:`store_vocab`).
    preset : {"tiny", "scgpt"}
        Model size (:data:`atlasmix.training.scgpt.model.PRESETS`); ``config_overrides`` for single
        fields (``d_model``, ``n_heads``, ``d_hid``, ``n_layers``, ``dropout``).
    n_bins, max_len
        Value binning and tokens per cell (scGPT: 51, 1,200).
    batch_size : int
        Cells per optimizer step (per DDP rank).
    group_batches : int
        Training batches per length-grouping megabatch.
    epochs, max_steps
        How long; ``max_steps`` stops earlier and sets the schedule length.
    lr, warmup_steps, weight_decay, mask_ratio, max_grad_norm
        Optimisation (warmup capped at 10% of the steps).
    seed : int
        Seed of weights, masks, binning draws, dropout and the data order.
    device : str
        ``auto``, ``cpu``, ``cuda``...
    bf16 : bool
        bf16 autocast on CUDA.
    io_batch_size, block_size, prefetch_io, io_threads
        Loader settings.
    log_every, checkpoint_every : int
        Steps between curve rows / checkpoints (0: at the end only).
    resume : bool
        Continue from ``out/checkpoints/last.pt``, with the vocabulary the run started with
        (``out/vocab.json``); other model settings than at its start are refused.
    encoder_threads : int
        Threads of the value binning.
    progress : bool
    stop_after : int, optional
        Stop after this step as if interrupted (the schedule still spans the whole run).

    Returns
    -------
    dict
        ``run.json`` (empty on DDP ranks other than 0).

    Raises
    ------
    AtlasmixError
        ``out`` not empty without resume, nothing to resume, bad options, vocabulary or manifest.
    """
    out = check_run(out, resume, model="scGPT", preset=preset, presets=PRESETS, batch_size=batch_size,
                    group_batches=group_batches, epochs=epochs, max_steps=max_steps)
    if not lr > 0 or not 0 < mask_ratio < 1:
        raise AtlasmixError(f"need lr > 0 and 0 < mask ratio < 1, got {lr} and {mask_ratio}")
    if n_bins < 3 or max_len < 2:
        raise AtlasmixError(f"n_bins must be >= 3 and max_len >= 2, got {n_bins} and {max_len}")
    loop = LoopOptions(lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps, max_grad_norm=max_grad_norm,
                       epochs=epochs, max_steps=max_steps, stop_after=stop_after, log_every=log_every,
                       checkpoint_every=checkpoint_every, resume=resume, progress=progress)
    side, ctx = start_run(manifest, out, device, seed)
    rank, world, dev = ctx.rank, ctx.world, ctx.device
    saved_vocab = out / VOCAB_FILE  # the run's vocabulary, fixed at its start
    if resume and saved_vocab.is_file():
        vocab_d = load_vocab(saved_vocab)
    else:
        vocab_d = load_vocab(vocab) if vocab is not None else store_vocab(store)
        if rank == 0:
            saved_vocab.write_text(json.dumps(vocab_d) + "\n")
    axis = vocabulary_axis(store, vocab_d)
    encoder = ScGPTEncoder(axis, vocab_d, n_bins=n_bins, max_len=max_len, seed=seed, threads=encoder_threads)
    loader = train_loader(store, manifest, axis["var_joinids"], batch_size=batch_size, group_batches=group_batches,
                          io_batch_size=io_batch_size, block_size=block_size, seed=seed, prefetch_io=prefetch_io,
                          io_threads=io_threads)
    stream = ScGPTStream(loader, encoder, batch_size=batch_size)
    cfg = {**PRESETS[preset], **{k: v for k, v in (config_overrides or {}).items() if v is not None}}
    if cfg["d_model"] % cfg["n_heads"]:
        raise AtlasmixError(f"d_model {cfg['d_model']} is not a multiple of n_heads {cfg['n_heads']}")
    pin_run_config(out, {"model": "scgpt", **cfg, "n_bins": n_bins, "max_len": max_len,
                         "n_tokens": max(vocab_d.values()) + 1, "genes_in_store": int(len(axis["var_joinids"]))},
                   resume, rank)
    model = ScGPTModel(max(vocab_d.values()) + 1, vocab_d[PAD], **cfg).to(dev)
    net = wrap_ddp(model, ctx)
    use_bf16 = bool(bf16 and dev.type == "cuda")

    def step_loss(b: dict, step: int) -> tuple[torch.Tensor, int, int]:
        genes = b["genes"].to(dev, non_blocking=True)
        values = b["values"].to(dev, non_blocking=True)
        masked, mask = mask_values(values, mask_ratio, step_generator(seed, step, rank))
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            pred = net(genes, masked)["gep"]
        m = mask.float()
        loss = ((pred.float() - values) ** 2 * m).sum() / m.sum().clamp(min=1.0)  # scGPT's masked_mse_loss
        return loss, int(genes.shape[0]), int(b["lengths"].sum())

    res = run_pretraining(model=model, net=net, stream=stream, out=out, step_loss=step_loss, loop=loop, ctx=ctx,
                          no_decay=lambda n: n.endswith("bias") or "norm" in n,
                          loss_label="masked-value MSE (bins^2 per masked token)")
    if rank != 0:  # rank 0 writes the outputs
        return {}
    mdir = out / "model"
    model.save(mdir, {"n_bins": n_bins, "max_len": max_len, "preset": preset,
                      "manifest_sha256": side["manifest"]["sha256"], "store": store.identity()})
    (mdir / VOCAB_FILE).write_text(json.dumps(vocab_d) + "\n")
    # the store genes behind the tokens (Ensembl ids): evaluation aligns any eval set to them
    pd.DataFrame({"feature_id": axis["feature_id"], "token_id": axis["token_ids"]}).to_csv(
        mdir / AXIS_FILE, sep="\t", index=False)
    run = {
        "model": "scGPT (atlasmix.training.scgpt.model.ScGPTModel: torch TransformerEncoder, GEP head)",
        "config": model.config,
        "options": {"preset": preset, "n_bins": n_bins, "max_len": max_len, "batch_size": batch_size,
                    "group_batches": group_batches, "epochs": epochs, "max_steps": max_steps, "lr": lr,
                    "warmup_steps": res["warmup_steps"], "weight_decay": weight_decay, "mask_ratio": mask_ratio,
                    "seed": seed, "device": str(dev), "bf16": use_bf16, "world_size": world,
                    "vocab": str(vocab) if vocab else "the store's gene symbols"},
        **run_record(res, manifest=manifest, side=side, store=store, n_train=loader.n_obs, resume=resume),
        "vocabulary": {"n_tokens": model.config["n_tokens"], "n_genes_in_store": int(len(axis["var_joinids"]))},
    }
    (out / "run.json").write_text(json.dumps(run, indent=1, default=str) + "\n")
    return run


def embed_cells(model_path: str | Path, store, joinids: np.ndarray, *, batch_size: int = 64, device: str = "auto",
                io_batch_size: int = 4096, obs_columns=("dataset_id", "cell_type")) -> pd.DataFrame:
    """scGPT cell embeddings (the ``<cls>`` output) of cells streamed from the store.

    Parameters
    ----------
    model_path : path
        ``atlasmix train scgpt`` output (``OUT`` or ``OUT/model``).
    store : atlasmix.store.Store
    joinids : numpy.ndarray of int64
    batch_size : int
    device : str
    obs_columns : sequence of str

    Returns
    -------
    pandas.DataFrame
        Index ``soma_joinid`` (sorted); ``obs_columns``; ``n_tokens`` (genes, ``<cls>`` excluded);
        ``emb_0..emb_{d-1}`` float32 (NaN for a cell without vocabulary genes). Binning draws use
        seed 0, epoch 0: the same cells give the same embeddings.

    Raises
    ------
    AtlasmixError
        No cells, no model, no vocabulary gene in the store.
    """
    joinids = cells_to_embed(joinids)
    dev = device_of(device)
    model, cfg = load_scgpt(model_path, dev)
    vocab_d = load_vocab(Path(cfg["folder"]) / VOCAB_FILE)
    axis = vocabulary_axis(store, vocab_d)
    loader = embedding_loader(store, joinids, axis["var_joinids"], batch_size=batch_size, io_batch_size=io_batch_size)
    enc = ScGPTEncoder(axis, vocab_d, n_bins=int(cfg["n_bins"]), max_len=int(cfg["max_len"]), seed=0)
    stream = ScGPTStream(loader, enc, batch_size=batch_size, group_by_length=False, drop_empty=True)
    D = int(cfg["d_model"])
    embs, ids, ntok = [], [], []
    with torch.inference_mode():
        for b in stream:
            e = model(b["genes"].to(dev), b["values"].to(dev))["cell_emb"]
            embs.append(e.float().cpu().numpy())
            ids.append(b["soma_joinid"].numpy())
            ntok.append(b["lengths"].numpy() - 1)
    return embedding_table(store, joinids, ids, embs, ntok, D, obs_columns)
