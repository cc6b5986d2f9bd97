"""Adapters of the pretrained transformer models for evaluation (Geneformer, scGPT, scBERT).

Each has the interface of :mod:`atlasmix.evaluation.models` (``name``, ``kind``, ``mixture``,
``feature_ids``, :meth:`training_cells`); :func:`atlasmix.evaluation.models.load_model` picks them.
Their scores on an eval set: :mod:`atlasmix.evaluation.pretrained_outputs`.

Geneformer
    ``atlasmix train geneformer`` output ``OUT`` with ``run.json`` and ``model/``, or a model
    folder with ``config.json`` + ``token_dictionary.pkl`` + ``gene_median_dictionary.pkl``.
    :class:`GeneformerAdapter`: rank value encoding of eval counts with the project's tokenizer
    (:mod:`atlasmix.training.geneformer.tokenizer`), cell embeddings (mean of the second-to-last
    hidden layer over gene tokens) and per-cell rank prediction scores of the MLM head. The gene
    axis is the vocabulary; there is no batch covariate and no reconstruction output.

scGPT / scBERT
    ``atlasmix train scgpt|scbert`` output. :class:`ScGPTAdapter`, :class:`ScBERTAdapter`: the eval
    counts on the store genes behind the model's tokens (saved with the model), encoded as in
    pretraining; cell embeddings only (scGPT: ``<cls>``; scBERT: the appended last position).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from atlasmix.errors import AtlasmixError
from atlasmix.evaluation.metrics import rank_prediction_score
from atlasmix.evaluation.overlap import TrainedOnManifest


class GeneformerAdapter(TrainedOnManifest):
    """A Geneformer BERT masked language model (``atlasmix train geneformer`` output).

    ``path`` is the run directory ``OUT`` (``OUT/model/`` = ``save_pretrained`` + ``token_dictionary.pkl``
    + ``gene_median_dictionary.pkl`` + ``atlasmix_geneformer.json``; ``OUT/run.json`` = options,
    manifest path and sha256, store identity), ``OUT/model`` itself (``run.json`` is then read from
    the parent when present), or any Geneformer model folder (e.g. a published model; no training
    manifest, so no overlap check). The model is loaded with
    :func:`atlasmix.training.geneformer.pretrain.load_model` (tokenizer mode and input size from
    ``atlasmix_geneformer.json``).

    Eval cells are rank value encoded with the project's tokenizer
    (:func:`atlasmix.training.geneformer.tokenizer.rank_value_encode`): counts / n_counts * 10,000
    / gene median over the vocabulary genes, genes sorted by decreasing value, truncated to the
    model input size (``<cls>``/``<eos>`` in V2 mode). Outputs: the cell embedding
    (:meth:`embed`, the mean of the second-to-last hidden layer over the gene tokens, as
    :func:`atlasmix.training.geneformer.embed.embed_cells` and Geneformer's ``EmbExtractor`` with
    ``emb_layer=-1``) and the per-cell rank prediction score of the MLM head (:meth:`rank_scores`).

    Parameters
    ----------
    path : path
    device : str
        torch device (``cpu``, ``cuda``, ``auto``).

    Attributes
    ----------
    name : str
        The run directory's name (``OUT``'s, also when ``OUT/model`` is given).
    mixture : str
        The training manifest's name (``run.json``), else ``name``.
    feature_ids : numpy.ndarray of str
        The vocabulary genes (Ensembl ids with a token and a median), in token-id order.
    max_len : int
        Model input size; ``mode`` the tokenizer mode.

    Raises
    ------
    AtlasmixError
        Not a Geneformer model directory (``config.json`` + both dictionaries).
    """

    kind = "geneformer"

    def __init__(self, path: str | Path, device: str = "cpu"):
        from atlasmix.training.pretrain_loop import device_of
        from atlasmix.training.geneformer.pretrain import load_model as load_gf
        from atlasmix.training.geneformer.pretrain import model_dir

        p = Path(path)
        mdir = model_dir(p)  # OUT/model or p itself
        for f in ("config.json", "token_dictionary.pkl", "gene_median_dictionary.pkl"):
            if not (mdir / f).is_file():
                raise AtlasmixError(f"{p} is not a Geneformer model directory (no {f} in {mdir})")
        self.path = p if mdir == p / "model" else (mdir.parent if (mdir.parent / "run.json").is_file() else mdir)
        run_json = self.path / "run.json"
        self.run = json.loads(run_json.read_text()) if run_json.is_file() and self.path != mdir else {}
        self.model, self.dicts, self.meta = load_gf(mdir)
        self.device = device_of(device)
        self.model.to(self.device)
        self.name = self.path.name
        self.mixture = self.run.get("manifest", {}).get("name") or self.name
        self.feature_ids = np.asarray(self.dicts.genes(), dtype=object)
        self.mode = str(self.meta["mode"])
        self.max_len = int(self.meta["max_len"])
        from atlasmix.training.geneformer.dictionaries import CLS, EOS
        from atlasmix.training.geneformer.tokenizer import mode_settings

        _, special = mode_settings(self.mode, self.max_len)
        self.cls_id = self.dicts.token[CLS] if special else None
        self.eos_id = self.dicts.token[EOS] if special else None
        self.special_ids = list(self.dicts.special_ids)
        self.vocab_size = int(self.model.config.vocab_size)
        self.n_latent = int(self.model.config.hidden_size)
        ok, tok, med = self.dicts.arrays(self.feature_ids)
        self._tok, self._med = tok[ok], med[ok]

    def tokenize(self, counts, n_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rank value encoding of raw counts on the vocabulary axis (:attr:`feature_ids`).

        Parameters
        ----------
        counts : scipy.sparse.csr_matrix, shape (B, len(feature_ids))
        n_counts : numpy.ndarray, shape (B,)
            Total counts of each cell over all its measured genes (cells with no count: any value).

        Returns
        -------
        (numpy.ndarray of int64, numpy.ndarray of int64)
            Tokens (B, L) padded with ``<pad>``, lengths (B,) (special tokens included).
        """
        import scipy.sparse as sp

        from atlasmix.training.geneformer.tokenizer import rank_value_encode

        m = sp.csr_matrix(counts)
        nc = np.asarray(n_counts, dtype=np.float64).copy()
        nc[np.diff(m.indptr) == 0] = 1.0  # empty rows: no gene, any positive total
        return rank_value_encode(m.indptr, m.indices, m.data, nc, self._med, self._tok, self.max_len,
                                 cls_id=self.cls_id, eos_id=self.eos_id, pad_id=self.dicts.pad_id)

    def n_genes(self, lengths: np.ndarray) -> np.ndarray:
        """Gene tokens per cell from sequence lengths (special tokens removed)."""
        return np.asarray(lengths) - (2 if self.cls_id is not None else 0)

    def embed(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Cell embeddings: mean of the second-to-last hidden layer over the gene tokens.

        Parameters
        ----------
        tokens : numpy.ndarray of int64, shape (B, L)
        lengths : numpy.ndarray of int, shape (B,)

        Returns
        -------
        numpy.ndarray of float32, shape (B, hidden_size)
            NaN rows for cells without a gene token.
        """
        import torch

        if np.max(lengths, initial=0) <= 0 or tokens.shape[1] == 0:  # no cell has a token (e.g. mouse genes)
            return np.full((len(lengths), self.n_latent), np.nan, dtype=np.float32)
        L = int(max(1, np.max(lengths, initial=0)))
        x = torch.as_tensor(np.ascontiguousarray(tokens[:, :L]), device=self.device)
        att = (torch.arange(L, device=self.device)[None, :] < torch.as_tensor(lengths, device=self.device)[:, None]).long()
        special = torch.tensor(self.special_ids, device=self.device)
        with torch.inference_mode():
            hs = self.model.bert(input_ids=x, attention_mask=att, output_hidden_states=True).hidden_states[-2]
            keep = (att.bool() & ~torch.isin(x, special)).unsqueeze(-1).to(hs.dtype)
            e = (hs * keep).sum(1) / keep.sum(1).clamp(min=1)
        e = e.float().cpu().numpy()
        e[self.n_genes(lengths) <= 0] = np.nan
        return e

    def rank_scores(self, tokens: np.ndarray, lengths: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Per-cell rank prediction score (:func:`atlasmix.evaluation.metrics.rank_prediction_score`).

        The masked positions are replaced by ``<mask>`` and the MLM scores every vocabulary token
        there; only the (masked position x masked gene) probabilities are gathered per cell, so no
        (seq_len x vocab) logits are held.

        Parameters
        ----------
        tokens : numpy.ndarray of int64, shape (B, L)
            Unmasked tokens.
        lengths : numpy.ndarray, shape (B,)
        mask : numpy.ndarray of bool, shape (B, L)
            :func:`atlasmix.evaluation.metrics.mask_positions`.

        Returns
        -------
        numpy.ndarray of float64, shape (B,)
            NaN for cells with fewer than 3 masked genes.
        """
        import torch

        if np.max(lengths, initial=0) < 3 or tokens.shape[1] == 0:  # no cell can have 3 masked genes
            return np.full(len(lengths), np.nan)
        L = int(max(1, np.max(lengths, initial=0)))
        ids = np.ascontiguousarray(tokens[:, :L])
        mk = np.asarray(mask)[:, :L]
        masked = np.where(mk, self.dicts.mask_id, ids)
        x = torch.as_tensor(masked, device=self.device)
        att = (torch.arange(L, device=self.device)[None, :] < torch.as_tensor(lengths, device=self.device)[:, None]).long()
        out = np.full(len(ids), np.nan)
        with torch.inference_mode():
            h = self.model.bert(input_ids=x, attention_mask=att).last_hidden_state
            for i in range(len(ids)):
                pos = np.flatnonzero(mk[i])
                if len(pos) < 3:
                    continue
                lp = torch.log_softmax(self.model.cls(h[i, torch.as_tensor(pos, device=self.device)]).float(), dim=-1)
                genes = torch.as_tensor(ids[i, pos], device=self.device)
                out[i] = rank_prediction_score(pos, lp[:, genes].exp().double().cpu().numpy())
        return out


class _EncodedModelAdapter(TrainedOnManifest):
    """Shared part of the scGPT and scBERT adapters: a run folder ``OUT`` (``run.json`` + ``model/``) or a
    model folder; :attr:`feature_ids` are the store genes (Ensembl ids) behind the model's gene tokens,
    saved with the model, so any eval set (store or file) is aligned to them."""

    axis_file = ""

    def _setup(self, path: str | Path, device: str) -> Path:
        from atlasmix.training.pretrain_loop import device_of

        p = Path(path)
        mdir = p / "model" if (p / "model" / "config.json").is_file() else p
        if not (mdir / self.axis_file).is_file():
            raise AtlasmixError(f"{p} is not a {self.kind} model directory (no {self.axis_file} in {mdir})")
        self.path = mdir.parent if mdir == p / "model" or (mdir.parent / "run.json").is_file() else mdir
        run_json = self.path / "run.json"
        self.run = json.loads(run_json.read_text()) if run_json.is_file() and self.path != mdir else {}
        self.device = device_of(device)
        self.name = self.path.name
        self.mixture = self.run.get("manifest", {}).get("name") or self.name
        self.axis = pd.read_csv(mdir / self.axis_file, sep="\t")
        self.feature_ids = np.asarray(self.axis["feature_id"].astype(str), dtype=object)
        return mdir


class ScGPTAdapter(_EncodedModelAdapter):
    """A trained scGPT (``atlasmix train scgpt``): cell embeddings = the ``<cls>`` output of the value
    binned cells (:mod:`atlasmix.training.scgpt`); binning draws keyed by each cell's ``soma_joinid``
    (its position in a file eval set) with seed 0, so scores are deterministic."""

    kind = "scgpt"
    axis_file = "genes.tsv"

    def __init__(self, path: str | Path, device: str = "cpu"):
        from atlasmix.training.scgpt.encoding import CLS, PAD, load_vocab
        from atlasmix.training.scgpt.model import load_scgpt

        mdir = self._setup(path, device)
        self.model, self.cfg = load_scgpt(mdir, self.device)
        self.tokens = self.axis["token_id"].to_numpy(dtype=np.int64)
        vocab = load_vocab(mdir / "vocab.json")
        self.cls_id, self.pad_id = int(vocab[CLS]), int(vocab[PAD])
        self.n_latent = int(self.cfg["d_model"])

    def embed_counts(self, counts, cell_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings float32 (B, d_model), gene tokens per cell int64 (B,)) of raw counts on
        :attr:`feature_ids` (CSR, (B, n_genes)); NaN rows for cells without a token. ``cell_keys``
        (int64 (B,), e.g. ``soma_joinid``) key the binning draws, as in
        :func:`atlasmix.training.scgpt.pretrain.embed_cells`."""
        import scipy.sparse as sp
        import torch

        from atlasmix.training.scgpt.encoding import bin_and_tokenize

        m = sp.csr_matrix(counts)
        enc = bin_and_tokenize(m.indptr, m.indices, m.data, self.tokens, np.asarray(cell_keys, dtype=np.int64),
                               cls_id=self.cls_id, pad_id=self.pad_id, n_bins=int(self.cfg["n_bins"]),
                               max_len=int(self.cfg["max_len"]))
        with torch.inference_mode():
            e = self.model(torch.from_numpy(enc["genes"]).to(self.device),
                           torch.from_numpy(enc["values"]).to(self.device))["cell_emb"]
        e = e.float().cpu().numpy()
        n = enc["lengths"] - 1
        e[n <= 0] = np.nan
        return e, n

    def masked_prediction(self, counts, cell_keys: np.ndarray, mask_fraction: float,
                          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """scGPT's pretraining task on eval cells: mask ``mask_fraction`` of each cell's gene tokens (at
        least 3; the mask value -1) and predict their bins with the GEP head.

        Returns
        -------
        (gene_keys, truth, pred, eligible) : numpy.ndarray, shape (B, L)
            Token id, true bin, predicted bin (NaN where not masked) and whether the position is a
            gene token (the baseline's genes).
        """
        import scipy.sparse as sp
        import torch

        from atlasmix.training.scgpt.encoding import MASK_VALUE, bin_and_tokenize

        m = sp.csr_matrix(counts)
        enc = bin_and_tokenize(m.indptr, m.indices, m.data, self.tokens, np.asarray(cell_keys, dtype=np.int64),
                               cls_id=self.cls_id, pad_id=self.pad_id, n_bins=int(self.cfg["n_bins"]),
                               max_len=int(self.cfg["max_len"]))
        genes, values = enc["genes"], enc["values"].astype(np.float64)
        eligible = np.arange(genes.shape[1])[None, :] < enc["lengths"][:, None]
        eligible[:, 0] = False  # <cls>
        mask = _choose_masked(eligible, mask_fraction, rng)
        with torch.inference_mode():
            pred = self.model(torch.from_numpy(genes).to(self.device),
                              torch.from_numpy(np.where(mask, MASK_VALUE, enc["values"])).to(self.device))["gep"]
        return genes, values, np.where(mask, pred.float().cpu().numpy(), np.nan), eligible


def _choose_masked(eligible: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Per row, ``max(3, floor(fraction * n))`` of its ``n`` eligible positions, uniformly (none for
    rows with fewer than 3)."""
    n = eligible.sum(1)
    k = np.where(n >= 3, np.maximum(3, np.floor(fraction * n)), 0)
    scores = np.where(eligible, rng.random(eligible.shape), 2.0)
    return scores.argsort(1).argsort(1) < k[:, None]


class ScBERTAdapter(_EncodedModelAdapter):
    """A trained scBERT (``atlasmix train scbert``): cell embeddings = the Performer's output at the
    appended last position of the cell's tokens (:mod:`atlasmix.training.scbert`)."""

    kind = "scbert"
    axis_file = "axis.tsv"

    def __init__(self, path: str | Path, device: str = "cpu"):
        from atlasmix.training.scbert.pretrain import load_scbert

        mdir = self._setup(path, device)
        self.model, self.cfg, _ = load_scbert(mdir, self.device)
        self.positions = self.axis["position"].to_numpy(dtype=np.int64)
        self.n_genes_model = int(self.cfg["n_genes"])
        self.n_latent = int(self.cfg["dim"])

    def embed_counts(self, counts, cell_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`ScGPTAdapter.embed_counts` (``cell_keys`` unused: no random draws); tokens =
        nonzero expression tokens."""
        import scipy.sparse as sp
        import torch

        from atlasmix.training.scbert.encoding import scbert_tokens

        m = sp.csr_matrix(counts)
        tok = torch.from_numpy(scbert_tokens(m.indptr, m.indices, m.data, self.positions, self.n_genes_model))
        with torch.inference_mode():
            h = self.model(tok.to(self.device).long(), return_encodings=True)
        e = h[:, -1].float().cpu().numpy()
        n = tok.ne(0).sum(1).numpy().astype(np.int64)
        e[n <= 0] = np.nan
        return e, n

    def masked_prediction(self, counts, cell_keys: np.ndarray, mask_fraction: float,
                          rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """scBERT's pretraining task on eval cells: ``mask_fraction`` of each cell's nonzero tokens (at
        least 3) become ``<mask>``; the prediction is the expected token under the model's softmax
        over the expression tokens 0 .. 5. Returns as :meth:`ScGPTAdapter.masked_prediction` (gene
        keys: axis positions)."""
        import scipy.sparse as sp
        import torch

        from atlasmix.training.scbert.encoding import MASK_TOKEN, scbert_tokens

        m = sp.csr_matrix(counts)
        tok = scbert_tokens(m.indptr, m.indices, m.data, self.positions, self.n_genes_model).astype(np.int64)
        eligible = tok != 0
        mask = _choose_masked(eligible, mask_fraction, rng)
        with torch.inference_mode():
            logits = self.model(torch.from_numpy(np.where(mask, MASK_TOKEN, tok)).to(self.device))
            p = torch.softmax(logits[..., :MASK_TOKEN].float(), dim=-1)
            expected = (p * torch.arange(MASK_TOKEN, device=p.device, dtype=p.dtype)).sum(-1)
        keys = np.broadcast_to(np.arange(tok.shape[1]), tok.shape)
        return keys, tok.astype(np.float64), np.where(mask, expected.cpu().numpy(), np.nan), eligible
