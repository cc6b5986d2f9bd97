"""Geneformer pretraining (masked language modelling) on a mixture streamed from the store.

The model is Hugging Face ``transformers.BertForMaskedLM`` with Geneformer's V1 settings
(Theodoris et al. 2023: 6 layers, hidden 256, 4 heads, intermediate 512, 2,048 positions, ReLU,
dropout 0.02, layer-norm eps 1e-12, initializer range 0.02, ``<pad>`` = 0); :data:`PRESETS` holds
other sizes and any field can be overridden. Training follows Geneformer's pretraining script:
MLM by Hugging Face's ``DataCollatorForLanguageModeling`` as Geneformer's pretrainer uses it (15% of
the gene tokens selected, never ``<pad>``, ``<cls>``, ``<eos>``; of those 80% become ``<mask>``, 10% a
random token and 10% stay; :func:`mask_tokens`); AdamW (weight decay 0.001), maximal learning rate
1e-3 with linear warmup and linear decay; length-grouped batches with dynamic padding (see
:class:`~atlasmix.training.geneformer.tokenizer.GeneformerStream`); bf16 autocast on CUDA.

Cells come from :class:`atlasmix.training.loader.MixtureLoader` (the LDVAE loader: per-epoch
shuffle, DDP shards when ``torch.distributed`` is initialised, e.g. under ``torchrun``) and are
rank value encoded on the fly. Outputs (directory ``out``):

``model/``
    ``save_pretrained`` (config.json, model.safetensors) plus ``token_dictionary.pkl``,
    ``gene_median_dictionary.pkl`` and ``atlasmix_geneformer.json`` (tokenizer mode, input size,
    manifest hash, store identity): ``BertForMaskedLM.from_pretrained(out / "model")``
``dictionaries/``
    the dictionaries used (computed from the train split when not given)
``training_curve.csv/png``
    loss, learning rate, cells seen, data-wait time per logging step
``run.json``
    options, manifest path / sha256, store identity, cells/s
``checkpoints/last.pt``
    model, optimizer, scheduler, stream position and RNG states (``resume=True`` continues mid-epoch
    with the next batch)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atlasmix.errors import AtlasmixError
from atlasmix.training.geneformer.dictionaries import (CLS, EOS, MASK, PAD, Dictionaries, build_dictionaries,
                                                       load_dictionaries, write_dictionaries)
from atlasmix.training.geneformer.tokenizer import GeneformerStream, mode_settings, vocabulary_axis
from atlasmix.training.pretrain_loop import (LoopOptions, check_out, run_pretraining, run_record, start_run,
                                             step_generator, wrap_ddp)
from atlasmix.training.stream import train_loader

#: BertConfig fields per size. ``v1`` = Geneformer V1 (gc30M 6L), ``v1-12l`` = its 12-layer model,
#: ``v2-104m`` = Geneformer V2 104M; ``tiny`` for tests.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64),
    "v1": dict(num_hidden_layers=6, hidden_size=256, num_attention_heads=4, intermediate_size=512),
    "v1-12l": dict(num_hidden_layers=12, hidden_size=512, num_attention_heads=8, intermediate_size=1024),
    "v2-104m": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
}
#: Geneformer V1 settings shared by every preset.
BASE = dict(hidden_act="relu", hidden_dropout_prob=0.02, attention_probs_dropout_prob=0.02,
            layer_norm_eps=1e-12, initializer_range=0.02, pad_token_id=0)
TRAIN_DEFAULTS = dict(lr=1e-3, weight_decay=0.001, warmup_steps=10_000, batch_size=12, mlm_probability=0.15)
META_FILE = "atlasmix_geneformer.json"


def bert_config(vocab_size: int, max_len: int, preset: str = "v1", **overrides):
    """A ``transformers.BertConfig`` for Geneformer.

    Parameters
    ----------
    vocab_size : int
        Token dictionary size (max token id + 1).
    max_len : int
        ``max_position_embeddings`` (the model input size: 2048 V1, 4096 V2).
    preset : str
        One of :data:`PRESETS`.
    **overrides
        Any ``BertConfig`` field (None values ignored).

    Raises
    ------
    AtlasmixError
        Unknown preset, or hidden size not divisible by the number of heads.
    """
    from transformers import BertConfig

    if preset not in PRESETS:
        raise AtlasmixError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    kw = dict(BASE) | PRESETS[preset] | {k: v for k, v in overrides.items() if v is not None}
    if kw["hidden_size"] % kw["num_attention_heads"]:
        raise AtlasmixError("hidden size must be a multiple of the number of attention heads")
    return BertConfig(vocab_size=int(vocab_size), max_position_embeddings=int(max_len), **kw)


def mlm_collator(dicts: Dictionaries, mlm_probability: float = 0.15):
    """Hugging Face's ``DataCollatorForLanguageModeling`` over Geneformer's token dictionary.

    The masking of Geneformer's published pretraining: its ``GeneformerPretrainer`` builds this
    collator (``mlm_probability=0.15``) over a stand-in tokenizer of the token dictionary
    (``GeneformerPreCollator``). Here the tokenizer is a ``PreTrainedTokenizerFast`` over a
    ``tokenizers`` word-level model of the dictionary, with ``<pad>``, ``<mask>`` (V2 also ``<cls>``,
    ``<eos>``) as its special tokens; :func:`mask_tokens` calls it on padded batches.

    Parameters
    ----------
    dicts : Dictionaries
    mlm_probability : float
        Fraction of the non-special tokens selected.

    Returns
    -------
    transformers.DataCollatorForLanguageModeling
        Random replacements are drawn from ``range(len(collator.tokenizer))``: every token id of a
        dictionary whose ids run from 0 (Geneformer's), special tokens included.
    """
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

    specials = {"pad_token": PAD, "mask_token": MASK} | ({"cls_token": CLS, "eos_token": EOS}
                                                          if dicts.has_v2_specials else {})
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(dicts.token, unk_token=PAD)), **specials)
    return DataCollatorForLanguageModeling(tok, mlm=True, mlm_probability=mlm_probability)


def mask_tokens(collator, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT MLM corruption of a padded batch by ``collator`` (:func:`mlm_collator`): each token that is
    neither padding nor special is selected with ``mlm_probability``; of those 80% become ``<mask>``,
    10% a random token of the vocabulary, 10% stay.

    Parameters
    ----------
    collator : transformers.DataCollatorForLanguageModeling
    input_ids : torch.Tensor of int64, shape (B, L)
        CPU tensor (the stream's batches); not modified.
    attention_mask : torch.Tensor, shape (B, L)
        1 on real tokens; padding (0) is never selected.
    generator : torch.Generator, optional
        CPU generator of every draw (keyed per step: a resumed run masks as an uninterrupted one);
        default: torch's global RNG, as the collator's own default.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        Corrupted ``input_ids`` and ``labels`` (original id where selected, -100 elsewhere), on
        ``input_ids``' device.

    Notes
    -----
    The draws are the collator's (``torch_mask_tokens``); two things are added: the special-tokens
    mask comes from the attention mask and the tokenizer's special ids (no per-token Python), and a
    batch in which no token was selected gets its first eligible token as target (the loss would
    be NaN). ``benchmarks/bench_mlm_collator.py`` (2-core CPU, 1 thread, 12 cells of up to 2,048
    tokens, Geneformer's 25,426-token V1 dictionary): 0.70 ms per batch against 0.42 ms for the
    hand-written masking it replaced (under 0.2 % of a step of the tiny test model, ~255 ms on this
    CPU); called as Geneformer's pretrainer calls it (special-tokens mask per token in Python) 18 ms.
    With the same generator it selects, and turns into ``<mask>``, exactly the tokens the
    hand-written masking did (its Bernoulli draws compare the same uniforms); the rest differs:
    whether a selected token becomes random or stays is a draw of its own, and the random tokens come
    from the whole vocabulary (special tokens included, as in Geneformer's pretraining) rather than
    from the gene tokens.
    """
    tok = collator.tokenizer
    special = ~attention_mask.bool()
    for s in tok.all_special_ids:  # a few comparisons: 6x faster than torch.isin here
        special |= input_ids == s
    before, collator.generator = collator.generator, generator  # the collator draws from it (None: global RNG)
    try:
        ids, labels = collator.torch_mask_tokens(input_ids.clone(), special_tokens_mask=special)
    finally:
        collator.generator = before
    if not labels.ne(-100).any() and not special.all():  # never a batch without a target
        first = int(torch.nonzero(~special.view(-1))[0])
        labels.view(-1)[first] = input_ids.view(-1)[first]
        ids.view(-1)[first] = tok.mask_token_id
    return ids, labels


class MaskedLMLoss(torch.nn.Module):
    """MLM cross-entropy of a ``BertForMaskedLM`` computed on the selected positions only.

    Identical to ``BertForMaskedLM(..., labels=labels).loss`` (mean over selected tokens) but the
    vocabulary projection runs on the ~15% selected positions instead of every position (B x L x
    vocab logits would be 2.5 GB in float32 for 12 cells x 2,048 tokens x 25k genes). Wrap this
    module, not the model, in DistributedDataParallel.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.model.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        sel = labels != -100
        logits = self.model.cls(h[sel])
        return torch.nn.functional.cross_entropy(logits.float(), labels[sel])


def model_dir(path: str | Path) -> Path:
    """The ``save_pretrained`` directory of a run (``OUT/model``) or ``path`` itself.

    Raises
    ------
    AtlasmixError
        No ``config.json`` there.
    """
    p = Path(path)
    for c in (p / "model", p):
        if (c / "config.json").is_file():
            return c
    raise AtlasmixError(f"no Geneformer model (config.json) in {p} or {p / 'model'}")


# Keyword arguments named as train_scgpt's and train_scbert's (see the note above train_scgpt).
def train_geneformer(store, manifest: str | Path, out: str | Path, *, dictionaries: str | Path | None = None,
                     mode: str = "v1", max_len: int | None = None, preset: str = "v1",
                     config_overrides: dict[str, Any] | None = None, batch_size: int = TRAIN_DEFAULTS["batch_size"],
                     group_batches: int = 50, epochs: int = 1, max_steps: int | None = None,
                     lr: float = TRAIN_DEFAULTS["lr"], warmup_steps: int = TRAIN_DEFAULTS["warmup_steps"],
                     weight_decay: float = TRAIN_DEFAULTS["weight_decay"],
                     mlm_probability: float = TRAIN_DEFAULTS["mlm_probability"], max_grad_norm: float = 1.0,
                     seed: int = 0, device: str = "auto", bf16: bool = True, io_batch_size: int = 16384,
                     block_size: int = 64, prefetch_io: int = 2, io_threads: int = 2, log_every: int = 10,
                     checkpoint_every: int = 500, resume: bool = False, tokenizer_threads: int = 1,
                     progress: bool = False, stop_after: int | None = None,
                     var_joinids: np.ndarray | None = None) -> dict[str, Any]:
    """Pretrain a Geneformer BertForMaskedLM on a manifest's train split, streamed from the store.

    Parameters
    ----------
    store : atlasmix.store.Store
    manifest : path
        Resolved manifest ``.parquet``.
    out : path
        Output directory (module doc); must be empty unless ``resume``.
    dictionaries : path, optional
        Folder with ``token_dictionary.pkl`` + ``gene_median_dictionary.pkl`` (e.g. Geneformer's
        published V1 files). Default: exact gene medians of the human genes over the train split
        (V2 mode adds ``<cls>``/``<eos>`` tokens).
    mode : {"v1", "v2"}
        Tokenizer: V1 2,048 tokens without special tokens, V2 4,096 with ``<cls>``/``<eos>``.
    max_len : int, optional
        Model input size override.
    preset : str
        Model size (:data:`PRESETS`); ``config_overrides`` for single ``BertConfig`` fields.
    batch_size : int
        Cells per optimizer step (per DDP rank).
    group_batches : int
        Batches per length-grouping megabatch (Geneformer's LengthGroupedSampler uses 50).
    epochs : int
        Passes over the train split; ``max_steps`` stops earlier (and sets the schedule length).
    lr, warmup_steps, weight_decay, mlm_probability, max_grad_norm
        Optimisation (Geneformer defaults; warmup is capped at 10% of the total steps).
    seed : int
        Seed of weights, masking, dropout and the data order.
    device : str
        ``auto`` (CUDA when present), ``cpu``, ``cuda``, ``cuda:1``...
    bf16 : bool
        bf16 autocast on CUDA (ignored on CPU).
    io_batch_size, block_size, prefetch_io, io_threads
        Loader settings (:class:`atlasmix.training.loader.MixtureLoader`).
    log_every, checkpoint_every : int
        Optimizer steps between curve rows / checkpoints (0: checkpoint only at the end).
    resume : bool
        Continue from ``out/checkpoints/last.pt``.
    tokenizer_threads : int
        Threads of the rank value encoding.
    stop_after : int, optional
        Stop after this optimizer step as if interrupted (checkpoint and outputs written; the
        learning-rate schedule still spans ``max_steps``/``epochs``): time-boxed jobs, tests.
    var_joinids : numpy.ndarray of int64, optional
        A gene axis (``--genes``, :func:`atlasmix.mixing.genes.gene_axis_var_joinids`): the medians,
        and so the vocabulary, keep only its human genes. Ignored with ``dictionaries``.

    Returns
    -------
    dict
        The contents of ``run.json`` (empty on DDP ranks other than 0).

    Raises
    ------
    AtlasmixError
        ``out`` not empty without resume, nothing to resume, bad options or manifest.

    Notes
    -----
    Under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is initialised here (NCCL on CUDA,
    gloo on CPU), the gene medians are computed once by all ranks together (each streams a
    contiguous part of the cells; :func:`atlasmix.training.geneformer.medians.gene_medians`), each
    rank trains on its shard of whole blocks of every epoch (equal batch counts) with
    DistributedDataParallel, every checkpoint holds each rank's stream position and RNG states (a
    resume needs the same number of ranks), and rank 0 writes the outputs. Tested with
    ``torchrun --nproc_per_node 2`` (gloo, CPU): stopped and resumed, the weights equal an
    uninterrupted run's.
    """
    from transformers import BertForMaskedLM

    out = Path(out)
    check_out(out, resume)
    if batch_size < 1 or group_batches < 1 or epochs < 1:
        raise AtlasmixError("batch size, group batches and epochs must be >= 1")
    if max_steps is not None and max_steps < 1:
        raise AtlasmixError(f"--max-steps must be >= 1, got {max_steps}")
    if not lr > 0:
        raise AtlasmixError(f"the learning rate must be > 0, got {lr}")
    L, special = mode_settings(mode, max_len)
    loop = LoopOptions(lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps, max_grad_norm=max_grad_norm,
                       epochs=epochs, max_steps=max_steps, stop_after=stop_after, log_every=log_every,
                       checkpoint_every=checkpoint_every, resume=resume, progress=progress)
    # under torchrun: one process per GPU (NCCL) or per CPU worker (gloo)
    side, ctx = start_run(manifest, out, device, seed)
    rank, world, dev = ctx.rank, ctx.world, ctx.device

    # dictionaries: given, or exact medians of the train split
    ddir = out / "dictionaries"
    medians_meta: dict[str, Any] = {}
    if resume and (ddir / "token_dictionary.pkl").is_file():
        dicts = load_dictionaries(ddir)
    elif dictionaries is not None:
        dicts = load_dictionaries(dictionaries)
        if rank == 0:
            write_dictionaries(dicts, ddir)
    else:
        from atlasmix.training.geneformer.medians import gene_medians, species_genes

        genes = species_genes(store, "human")
        if var_joinids is not None:  # a --genes axis restricts the vocabulary
            genes = np.intersect1d(genes, np.asarray(var_joinids, dtype=np.int64))
            if len(genes) == 0:
                raise AtlasmixError("no human gene on the --genes axis")
        med = gene_medians(store, manifest, "train", genes)
        medians_meta = {"passes": int(med.attrs["passes"]), "ranks": world, "genes": int((med["n_nonzero"] > 0).sum())}
        med = med[med["n_nonzero"] > 0]
        dicts = build_dictionaries(dict(zip(med["feature_id"], med["median"])), special_tokens=special)
        if rank == 0:
            write_dictionaries(dicts, ddir)
    if special and not dicts.has_v2_specials:
        raise AtlasmixError("V2 mode needs <cls> and <eos> in the token dictionary")
    axis = vocabulary_axis(store, dicts)
    loader = train_loader(store, manifest, axis["var_joinids"], batch_size=batch_size, group_batches=group_batches,
                          io_batch_size=io_batch_size, block_size=block_size, seed=seed, library="total_counts",
                          prefetch_io=prefetch_io, io_threads=io_threads)
    stream = GeneformerStream(loader, axis, dicts, mode=mode, max_len=L, batch_size=batch_size,
                              threads=tokenizer_threads)

    cfg = bert_config(dicts.vocab_size(), L, preset, **(config_overrides or {}))
    model = BertForMaskedLM(cfg).to(dev)
    net = wrap_ddp(MaskedLMLoss(model), ctx)
    use_bf16 = bool(bf16 and dev.type == "cuda")
    collator = mlm_collator(dicts, mlm_probability)

    def step_loss(b: dict, step: int) -> tuple[torch.Tensor, int, int]:
        # masked on the CPU, where the stream's tokens are, then moved once; the draws are a
        # function of (seed, step, rank): ranks mask independently, a resumed run as the uninterrupted one
        mids, labels = mask_tokens(collator, b["input_ids"], b["attention_mask"], step_generator(seed, step, rank))
        mids, att, labels = (t.to(dev, non_blocking=True) for t in (mids, b["attention_mask"], labels))
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = net(mids, att, labels)
        return loss, int(mids.shape[0]), int(b["lengths"].sum())

    res = run_pretraining(model=model, net=net, stream=stream, out=out, step_loss=step_loss, loop=loop, ctx=ctx,
                          no_decay=lambda n: n.endswith("bias") or "LayerNorm" in n,
                          loss_label="MLM cross-entropy (nats per masked token)")
    if rank != 0:  # rank 0 writes the outputs
        return {}
    mdir = out / "model"
    model.save_pretrained(mdir)
    write_dictionaries(dicts, mdir)
    meta = {"mode": mode, "max_len": L, "special_tokens": special, "preset": preset,
            "manifest_sha256": side["manifest"]["sha256"], "store": store.identity()}
    (mdir / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    import transformers

    run = {
        "model": "transformers.BertForMaskedLM (Geneformer)",
        "transformers_version": transformers.__version__,
        "config": {k: getattr(cfg, k) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                                 "intermediate_size", "max_position_embeddings", "vocab_size",
                                                 "hidden_act", "hidden_dropout_prob", "layer_norm_eps")},
        "options": {"mode": mode, "max_len": L, "preset": preset, "batch_size": batch_size,
                    "group_batches": group_batches, "epochs": epochs, "max_steps": max_steps, "lr": lr,
                    "warmup_steps": res["warmup_steps"], "weight_decay": weight_decay,
                    "mlm_probability": mlm_probability, "seed": seed, "device": str(dev), "bf16": use_bf16, "io_batch_size": loader.io_batch_size,
                    "block_size": block_size, "world_size": loader.world_size,
                    "dictionaries": str(dictionaries) if dictionaries else "computed from the train split"},
        **run_record(res, manifest=manifest, side=side, store=store, n_train=loader.n_obs, resume=resume),
        "vocabulary": {"n_tokens": dicts.vocab_size(), "n_genes_in_store": int(len(axis["var_joinids"]))},
        "medians": medians_meta,  # computed this call: passes over X and ranks that shared them
    }
    (out / "run.json").write_text(json.dumps(run, indent=1, default=str) + "\n")
    return run


def load_model(path: str | Path):
    """A trained model, its dictionaries and tokenizer settings.

    Returns
    -------
    (transformers.BertForMaskedLM, Dictionaries, dict)
        The model (eval mode, CPU), the dictionaries saved with it and ``atlasmix_geneformer.json``
        (defaults: V1 mode, ``max_position_embeddings`` input size, when absent, e.g. for
        Geneformer's published models).
    """
    from transformers import BertForMaskedLM

    d = model_dir(path)
    model = BertForMaskedLM.from_pretrained(d)
    model.eval()
    dicts: Dictionaries = load_dictionaries(d)
    meta = json.loads((d / META_FILE).read_text()) if (d / META_FILE).is_file() else {}
    meta.setdefault("mode", "v2" if dicts.has_v2_specials else "v1")
    meta.setdefault("max_len", int(model.config.max_position_embeddings))
    if not math.isfinite(meta["max_len"]):
        raise AtlasmixError("bad max_len in model metadata")
    return model, dicts, meta



