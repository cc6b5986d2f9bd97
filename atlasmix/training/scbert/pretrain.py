"""scBERT pretraining (masked expression-token prediction) on a mixture streamed from the store.

Following scBERT's ``pretrain.py`` (Yang et al. 2022): the model is ``performer_pytorch.PerformerLM``
(the Performer attention scBERT uses; the ``performer-pytorch`` package) over the cell's tokens on
scBERT's gene axis (:mod:`atlasmix.training.scbert.encoding`; ``num_tokens = bin_num + 2 = 7``,
``max_seq_len = genes + 1``), with gene2vec position embeddings when a gene2vec matrix is given
(scBERT's ``g2v_position_emb``; ``gene2vec_16906.npy``, one row per gene of the axis, fixed) and
learnable ones otherwise. Masking (``data_mask``): in each cell ``ceil(0.15 n)`` of its ``n`` tokens
that are neither 0 nor ``<pad>``, drawn uniformly, are predicted; 90% of them are replaced by
``<mask>`` (token 6), the rest stay; the loss is the cross-entropy over them (``ignore_index`` = 6).

Presets: ``scbert`` (``dim 200, depth 6, heads 10``: scBERT's) and ``tiny`` (tests). Differences
from scBERT's script: the masking draws come from a torch generator keyed by ``(seed, step, rank)``;
AdamW with linear warmup and decay instead of Adam with cosine restarts and gradient accumulation
(``--batch-size`` sets the cells per step); bf16 autocast on CUDA. Upstream ``performer-pytorch``
has no gene2vec option: its position embedding module is replaced by :class:`Gene2VecEmbedding`.

Outputs (``out``): ``model/`` (``config.json``, ``model.safetensors``, ``genes.txt`` = the gene axis
used, ``axis.tsv`` = the store gene (Ensembl id) at each position the store fills), ``training_curve.csv/png``, ``run.json``, ``checkpoints/last.pt``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from atlasmix.errors import AtlasmixError
from atlasmix.training.gene_lists import model_axis, read_gene_list
from atlasmix.training.pretrain_loop import (LoopOptions, check_run, device_of, pin_run_config, run_pretraining,
                                             run_record, start_run, step_generator, wrap_ddp)
from atlasmix.training.scbert.encoding import BIN_NUM, MASK_TOKEN, PAD_TOKEN, ScBERTEncoder
from atlasmix.training.stream import (EncodedStream, cells_to_embed, embedding_loader, embedding_table,
                                     train_loader)

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(dim=32, depth=2, heads=2, dim_head=16),
    "scbert": dict(dim=200, depth=6, heads=10, dim_head=64),
}
TRAIN_DEFAULTS = dict(lr=1e-4, weight_decay=0.0, warmup_steps=1_000, batch_size=3, mask_prob=0.15, replace_prob=0.9)
GENES_FILE = "genes.txt"
AXIS_FILE = "axis.tsv"


class Gene2VecEmbedding(nn.Module):
    """scBERT's ``Gene2VecPositionalEmbedding``: row ``i`` of a fixed gene2vec matrix for position ``i``,
    a zero row for the appended last token."""

    def __init__(self, weights: np.ndarray):
        super().__init__()
        w = np.concatenate([np.asarray(weights, dtype=np.float32), np.zeros((1, weights.shape[1]), np.float32)])
        self.emb = nn.Embedding.from_pretrained(torch.from_numpy(w), freeze=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.emb(torch.arange(x.shape[1], device=x.device))


def build_model(n_genes: int, preset: str = "scbert", gene2vec: np.ndarray | None = None,
                **overrides) -> nn.Module:
    """``PerformerLM`` for scBERT (module doc); ``gene2vec`` (n_genes, dim) fixes the position embedding.

    Raises
    ------
    AtlasmixError
        Unknown preset, or a gene2vec matrix that is not (n_genes, dim).
    """
    from performer_pytorch import PerformerLM

    if preset not in PRESETS:
        raise AtlasmixError(f"unknown scBERT preset {preset!r} (one of {', '.join(PRESETS)})")
    cfg = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    if gene2vec is not None and gene2vec.shape != (n_genes, cfg["dim"]):
        raise AtlasmixError(f"gene2vec matrix is {gene2vec.shape}, the model needs ({n_genes}, {cfg['dim']})")
    m = PerformerLM(num_tokens=BIN_NUM + 2, max_seq_len=n_genes + 1, local_attn_heads=0, rotary_position_emb=False,
                    **cfg)
    if gene2vec is not None:
        m.pos_emb = Gene2VecEmbedding(gene2vec)
    m.atlasmix_config = {"n_genes": int(n_genes), "preset": preset, "gene2vec": gene2vec is not None, **cfg}
    return m


class ScBERTStream(EncodedStream):
    """Training batches of scBERT tokens (uint8 (b, genes + 1), every cell the same length)."""

    thread_name = "atlasmix-scbert"

    def __init__(self, loader, encoder: ScBERTEncoder, batch_size: int | None = None, prefetch: int = 2):
        if not loader.sparse:
            raise AtlasmixError("ScBERTStream needs a loader with sparse=True")
        super().__init__(loader, batch_size, group_by_length=False, drop_empty=True, prefetch=prefetch)
        self.encoder = encoder

    def encode(self, b: dict[str, Any]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        tok = self.encoder(b)["tokens"].numpy()
        # a cell without any count on the axis encodes to all zeros: length 0, dropped
        lengths = np.where(tok[:, :-1].any(axis=1), tok.shape[1], 0).astype(np.int64)
        return {"tokens": tok}, lengths


def mask_tokens(tokens: torch.Tensor, generator: torch.Generator, *, mask_prob: float = 0.15,
                replace_prob: float = 0.9) -> tuple[torch.Tensor, torch.Tensor]:
    """scBERT's ``data_mask`` (module doc). Returns (masked input, labels with ``<pad>`` = ignore)."""
    eligible = tokens.ne(0) & tokens.ne(PAD_TOKEN)
    k = (eligible.sum(1).double() * mask_prob).ceil().long()
    scores = torch.rand(tokens.shape, generator=generator).to(tokens.device).masked_fill(~eligible, 2.0)
    mask = scores.argsort(1).argsort(1) < k[:, None]
    replace = torch.rand(tokens.shape, generator=generator).to(tokens.device) < replace_prob
    return tokens.masked_fill(mask & replace, MASK_TOKEN), tokens.masked_fill(~mask, PAD_TOKEN)


def _save(model: nn.Module, mdir: Path, genes: list[str], extra: dict[str, Any]) -> None:
    from safetensors.torch import save_model

    mdir.mkdir(parents=True, exist_ok=True)
    (mdir / "config.json").write_text(json.dumps({"model": "scbert", **model.atlasmix_config, **extra}, indent=1) + "\n")
    save_model(model, str(mdir / "model.safetensors"))  # Performer modules share tensors: saved once
    (mdir / GENES_FILE).write_text("\n".join(genes) + "\n")


def load_scbert(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any], list[str]]:
    """A saved scBERT (eval mode), its ``config.json`` and gene axis.

    Raises
    ------
    AtlasmixError
        No scBERT model in ``path`` or ``path/model``.
    """
    from safetensors.torch import load_file, load_model

    p = Path(path)
    d = next((c for c in (p / "model", p) if (c / "config.json").is_file() and (c / "model.safetensors").is_file()),
             None)
    cfg = json.loads((d / "config.json").read_text()) if d is not None else {}
    if d is None or cfg.get("model") != "scbert":
        raise AtlasmixError(f"no scBERT model (config.json + model.safetensors) in {p} or {p / 'model'}")
    state = load_file(str(d / "model.safetensors"))
    g2v = state["pos_emb.emb.weight"][:-1].numpy() if cfg.get("gene2vec") else None
    m = build_model(cfg["n_genes"], cfg["preset"], g2v, **{k: cfg[k] for k in ("dim", "depth", "heads", "dim_head")})
    load_model(m, str(d / "model.safetensors"))
    m.eval()
    return m.to(device), cfg | {"folder": str(d)}, read_gene_list(d / GENES_FILE)


# Keyword arguments named as train_scgpt's and train_geneformer's (see the note above train_scgpt).
def train_scbert(store, manifest: str | Path, out: str | Path, *, genes: str | Path, gene2vec: str | Path | None = None,
                 preset: str = "scbert", config_overrides: dict[str, Any] | None = None,
                 batch_size: int = TRAIN_DEFAULTS["batch_size"], group_batches: int = 50, epochs: int = 1,
                 max_steps: int | None = None, lr: float = TRAIN_DEFAULTS["lr"],
                 warmup_steps: int = TRAIN_DEFAULTS["warmup_steps"], weight_decay: float = TRAIN_DEFAULTS["weight_decay"],
                 mask_prob: float = TRAIN_DEFAULTS["mask_prob"], replace_prob: float = TRAIN_DEFAULTS["replace_prob"],
                 max_grad_norm: float = 100.0, seed: int = 0, device: str = "auto", bf16: bool = True,
                 io_batch_size: int = 16384, block_size: int = 64, log_every: int = 10, checkpoint_every: int = 500,
                 resume: bool = False, encoder_threads: int = 1, progress: bool = False,
                 stop_after: int | None = None) -> dict[str, Any]:
    """Pretrain scBERT on a manifest's train split, streamed from the store (module doc).

    Parameters
    ----------
    store : atlasmix.store.Store
    manifest : path
    out : path
        Output folder; must be empty unless ``resume``.
    genes : path
        scBERT's gene axis (:func:`atlasmix.training.gene_lists.read_gene_list`: e.g. the
        ``var_names`` of its ``panglao_human.h5ad``).
    gene2vec : path, optional
        ``.npy`` matrix (genes x dim) of gene2vec embeddings in the axis' order (scBERT's
        ``gene2vec_16906.npy``); default: learnable position embeddings.
    preset, config_overrides
        :data:`PRESETS`; overrides of ``dim``, ``depth``, ``heads``, ``dim_head``.
    batch_size, group_batches, epochs, max_steps, lr, warmup_steps, weight_decay, mask_prob, replace_prob,
    max_grad_norm, seed, device, bf16, io_batch_size, block_size, log_every, checkpoint_every, resume,
    encoder_threads, progress, stop_after
        As :func:`atlasmix.training.scgpt.pretrain.train_scgpt` (scBERT: clipping at 100; a resume
        keeps the gene list the run started with, ``out/genes.txt``).

    Returns
    -------
    dict
        ``run.json`` (empty on DDP ranks other than 0).

    Raises
    ------
    AtlasmixError
        Bad options, gene list, gene2vec matrix, manifest; ``out`` not empty without resume.
    """
    out = check_run(out, resume, model="scBERT", preset=preset, presets=PRESETS, batch_size=batch_size,
                    group_batches=group_batches, epochs=epochs, max_steps=max_steps)
    if not lr > 0 or not 0 < mask_prob < 1 or not 0 <= replace_prob <= 1:
        raise AtlasmixError("need lr > 0, 0 < mask prob < 1 and 0 <= replace prob <= 1")
    saved = out / GENES_FILE  # the run's gene axis, fixed at its start
    gene_list = read_gene_list(saved if resume and saved.is_file() else genes)
    g2v = None
    if gene2vec is not None:
        try:
            g2v = np.load(gene2vec, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise AtlasmixError(f"gene2vec matrix {gene2vec} is not readable: {e}") from None
        if not isinstance(g2v, np.ndarray) or g2v.ndim != 2 or not np.issubdtype(g2v.dtype, np.number):
            raise AtlasmixError(f"gene2vec matrix {gene2vec} must be one numeric .npy array, genes x dim")
        if not np.isfinite(g2v).all():
            raise AtlasmixError(f"gene2vec matrix {gene2vec} holds NaN or infinite values")
        config_overrides = {**(config_overrides or {}), "dim": int(g2v.shape[1])}
    loop = LoopOptions(lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps, max_grad_norm=max_grad_norm,
                       epochs=epochs, max_steps=max_steps, stop_after=stop_after, log_every=log_every,
                       checkpoint_every=checkpoint_every, resume=resume, progress=progress)
    side, ctx = start_run(manifest, out, device, seed)
    rank, world, dev = ctx.rank, ctx.world, ctx.device
    axis = model_axis(store, gene_list)
    cfg = {**PRESETS[preset], **{k: v for k, v in (config_overrides or {}).items() if v is not None}}
    pin_run_config(out, {"model": "scbert", "preset": preset, **cfg, "n_genes": len(gene_list),
                         "gene2vec": g2v is not None, "genes_in_store": int(axis["matched"])}, resume, rank)
    if rank == 0 and not (resume and saved.is_file()):
        saved.write_text("\n".join(gene_list) + "\n")
    loader = train_loader(store, manifest, axis["var_joinids"], batch_size=batch_size, group_batches=group_batches,
                          io_batch_size=io_batch_size, block_size=block_size, seed=seed)
    stream = ScBERTStream(loader, ScBERTEncoder(axis, threads=encoder_threads), batch_size=batch_size)
    model = build_model(len(gene_list), preset, g2v, **(config_overrides or {})).to(dev)
    net = wrap_ddp(model, ctx)
    use_bf16 = bool(bf16 and dev.type == "cuda")

    def step_loss(b: dict, step: int) -> tuple[torch.Tensor, int, int]:
        tok = b["tokens"].to(dev, non_blocking=True).long()
        x, labels = mask_tokens(tok, step_generator(seed, step, rank), mask_prob=mask_prob,
                                replace_prob=replace_prob)
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = net(x)
        loss = nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=PAD_TOKEN)
        return loss, int(tok.shape[0]), int(tok.ne(0).sum())

    res = run_pretraining(model=model, net=net, stream=stream, out=out, step_loss=step_loss, loop=loop, ctx=ctx,
                          loss_label="cross-entropy (nats per masked token)")
    if rank != 0:  # rank 0 writes the outputs
        return {}
    _save(model, out / "model", gene_list, {"manifest_sha256": side["manifest"]["sha256"],
                                            "store": store.identity()})
    # the store genes behind the axis positions (Ensembl ids): evaluation aligns any eval set to them
    fid = store.var().loc[axis["var_joinids"], "feature_id"].astype(str).to_numpy()
    pd.DataFrame({"feature_id": fid, "position": axis["position"]}).to_csv(out / "model" / AXIS_FILE, sep="\t",
                                                                           index=False)
    run = {
        "model": "scBERT (performer_pytorch.PerformerLM)",
        "config": model.atlasmix_config,
        "options": {"preset": preset, "batch_size": batch_size, "group_batches": group_batches, "epochs": epochs,
                    "max_steps": max_steps, "lr": lr, "warmup_steps": res["warmup_steps"], "weight_decay": weight_decay,
                    "mask_prob": mask_prob, "replace_prob": replace_prob, "seed": seed, "device": str(dev),
                    "bf16": use_bf16, "world_size": world, "genes": str(genes),
                    "gene2vec": str(gene2vec) if gene2vec else None},
        **run_record(res, manifest=manifest, side=side, store=store, n_train=loader.n_obs, resume=resume),
        "gene_axis": {"n_genes": len(gene_list), "n_genes_in_store": int(axis["matched"])},
    }
    (out / "run.json").write_text(json.dumps(run, indent=1, default=str) + "\n")
    return run


def embed_cells(model_path: str | Path, store, joinids: np.ndarray, *, batch_size: int = 8, device: str = "auto",
                io_batch_size: int = 4096, obs_columns=("dataset_id", "cell_type")) -> pd.DataFrame:
    """scBERT cell embeddings of cells streamed from the store: the encoder's output at the appended
    last position (scBERT has no ``<cls>``; that position carries no gene and attends to all).

    Returns
    -------
    pandas.DataFrame
        Index ``soma_joinid``; ``obs_columns``; ``n_tokens`` (nonzero tokens); ``emb_*`` float32 (NaN
        for cells without counts on the axis).

    Raises
    ------
    AtlasmixError
        No cells or no model.
    """
    joinids = cells_to_embed(joinids)
    dev = device_of(device)
    model, cfg, gene_list = load_scbert(model_path, dev)
    axis = model_axis(store, gene_list)
    loader = embedding_loader(store, joinids, axis["var_joinids"], batch_size=batch_size, io_batch_size=io_batch_size)
    stream = ScBERTStream(loader, ScBERTEncoder(axis), batch_size=batch_size)
    embs, ids, ntok = [], [], []
    with torch.inference_mode():
        for b in stream:
            tok = b["tokens"].to(dev).long()
            h = model(tok, return_encodings=True)
            embs.append(h[:, -1].float().cpu().numpy())
            ids.append(b["soma_joinid"].numpy())
            ntok.append(tok.ne(0).sum(1).cpu().numpy())
    return embedding_table(store, joinids, ids, embs, ntok, int(cfg["dim"]), obs_columns)
