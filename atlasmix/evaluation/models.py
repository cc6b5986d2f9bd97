"""Model adapters for evaluation: trained model directory -> per-batch outputs on aligned counts.

Every adapter has ``name``, ``kind``, ``mixture`` (the training mixture's name), ``feature_ids``
(its gene axis, Ensembl ids: eval counts are aligned to it, missing genes zero-filled, extra genes
dropped) and :meth:`training_cells` (for the overlap refusal).

LDVAE
    ``atlasmix train ldvae`` output (``model/``, ``run.json``). :meth:`LDVAEAdapter.encode` runs
    scvi-tools' own module on a dense count batch: ``module.inference`` (encoder of log1p counts) then
    ``module.generative`` with the posterior mean of z; the decoder's ``px.scale`` (expression
    proportions) times 10,000 is the normalised expression at library size 10,000, i.e. what
    ``LinearSCVI.get_normalized_expression(library_size=1e4)`` returns, except that scvi draws one
    posterior sample of z by default (``sample_z=True`` reproduces that draw exactly; the test checks
    both). The posterior mean is the default because it makes the score deterministic and is the latent
    ``get_latent_representation`` returns.

    Batch covariate of eval cells: a cell whose ``dataset_id`` is one of the model's training
    batches (a dataset with training cells, read from the manifest sidecar's composition) gets that
    batch's code; any other cell (held-out dataset, external file) gets the code of the first
    trained batch category (the reference batch) -- scvi-tools has no code for an unseen batch
    without query-model surgery (scArches), and the LDVAE decoder's batch term is additive in the
    linear predictor, so this conditions the reconstruction on a fixed, seen batch. The per-cell
    table records ``batch_seen``.

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


def _training_cells_from_manifest(path: str | None, sha256: str | None) -> tuple[np.ndarray | None, dict]:
    """train + validation joinids of a manifest (sha256-checked) and its sidecar; (None, {}) if absent."""
    if not path or not Path(path).is_file():
        return None, {}
    from atlasmix.mixing import read_manifest

    table, side = read_manifest(path)  # verifies the file's sha256 against the sidecar
    if sha256 and side["manifest"]["sha256"] != sha256:
        raise AtlasmixError(f"manifest {path} is not the one the model was trained on (sha256 differs)")
    t = table.to_pandas()
    tv = t[t["split"].astype(str).isin(["train", "validation"])]
    return np.unique(tv["soma_joinid"].to_numpy(dtype=np.int64)), side


class _TrainedOnManifest:
    """``training_cells`` for adapters of run directories whose ``run.json`` names the training manifest."""

    def training_cells(self) -> tuple[np.ndarray | None, dict]:
        """(train + validation soma_joinids, info) from the manifest named in ``run.json``; (None, ...)
        when it names none (a bare model folder).

        ``info`` holds ``store`` (the training store's identity) and ``manifest`` (path).

        Raises
        ------
        AtlasmixError
            The manifest named in ``run.json`` is missing (the overlap check cannot be done).
        """
        m = self.run.get("manifest", {})
        if m.get("path") and not Path(m["path"]).is_file():
            raise AtlasmixError(f"{self.name}: training manifest {m['path']} is missing, so the eval/train overlap "
                                "cannot be checked")
        ids, _ = _training_cells_from_manifest(m.get("path"), m.get("sha256"))
        return ids, {"store": self.run.get("store", {}), "manifest": m.get("path")}


class LDVAEAdapter(_TrainedOnManifest):
    """A trained LinearSCVI (``OUT`` of :func:`atlasmix.training.ldvae.train_ldvae`).

    Parameters
    ----------
    path : path
        The run directory (``model/`` and ``run.json``).
    device : str
        torch device for inference.

    Raises
    ------
    AtlasmixError
        Not an LDVAE run directory.
    """

    kind = "ldvae"

    def __init__(self, path: str | Path, device: str = "cpu"):
        import scvi

        self.path = Path(path)
        if not (self.path / "model" / "model.pt").is_file() or not (self.path / "run.json").is_file():
            raise AtlasmixError(f"{self.path} is not an LDVAE run directory (needs model/model.pt and run.json)")
        self.run = json.loads((self.path / "run.json").read_text())
        import logging

        logging.getLogger("scvi").setLevel(logging.WARNING)
        self.model = scvi.model.LinearSCVI.load(str(self.path / "model"), accelerator="cpu" if device == "cpu" else "auto")
        self.model.module.eval()
        self.device = self.model.device
        self.name = self.path.name
        self.mixture = self.run.get("manifest", {}).get("name") or self.name
        var = self.model.adata.var
        self.feature_ids = np.asarray(var.index.astype(str), dtype=object)
        self.batch_key = self.run.get("options", {}).get("batch_key")
        # batch codes as scvi-tools registered them (the template's categorical mapping)
        cats = [str(c) for c in self.model.adata_manager.get_state_registry("batch").categorical_mapping]
        self.batch_categories = cats
        # the loader's categories span every split of the manifest (eval datasets too), so "seen" is
        # decided by the training split's composition (recorded in the manifest sidecar)
        trained = self._trained_batches(cats)
        self._code = {c: i for i, c in enumerate(cats) if c in trained}
        self.reference_code = min(self._code.values()) if self._code else 0
        self.n_latent = int(self.model.module.n_latent)

    def _trained_batches(self, cats: list[str]) -> set[str]:
        """Batch categories with training cells: from the sidecar's composition when the batch key is
        ``dataset_id``; otherwise (or without a readable sidecar) every category counts as seen."""
        from atlasmix.mixing import read_sidecar

        path = self.run.get("manifest", {}).get("path")
        if self.batch_key != "dataset_id" or not path or not Path(path).is_file():
            return set(cats)
        try:
            comp = read_sidecar(path).get("composition", [])
        except AtlasmixError:
            return set(cats)
        seen = {str(r.get("dataset_id")) for r in comp if r.get("split") == "train" and r.get("n_cells", 0) > 0}
        return seen or set(cats)

    def batch_codes(self, obs: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Batch codes of eval cells (module doc) and whether each cell's batch was seen in training."""
        if self.batch_key is None or self.batch_key not in obs:
            return np.zeros(len(obs), dtype=np.int64), np.ones(len(obs), dtype=bool)
        vals = obs[self.batch_key].astype(str).to_numpy()
        seen = np.array([v in self._code for v in vals], dtype=bool)
        return np.array([self._code.get(v, self.reference_code) for v in vals], dtype=np.int64), seen

    def encode(self, X: np.ndarray, batch: np.ndarray, library_size: float = 1e4,
               sample_z: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Latent posterior mean and normalised expression of a batch of cells.

        Parameters
        ----------
        X : numpy.ndarray of float32, shape (B, n_genes)
            Raw counts on the model's gene axis.
        batch : numpy.ndarray of int, shape (B,)
            Batch codes (:meth:`batch_codes`).
        library_size : float
            Library size the expression proportions are scaled to.
        sample_z : bool
            Decode one posterior sample of z (scvi's ``get_normalized_expression`` default) instead of
            the posterior mean.

        Returns
        -------
        (numpy.ndarray, numpy.ndarray)
            Latent means float32 (B, n_latent); normalised expression float32 (B, n_genes), rows
            summing to ``library_size``.
        """
        import torch

        mod = self.model.module
        with torch.inference_mode():
            x = torch.as_tensor(X, dtype=torch.float32, device=self.device)
            b = torch.as_tensor(batch, dtype=torch.int64, device=self.device).reshape(-1, 1)
            inf = mod.inference(x, b)
            qz = inf["qz"]
            z = inf["z"] if sample_z else mod.z_encoder.z_transformation(qz.loc)
            gen = mod.generative(z, inf["library"], b, y=torch.zeros_like(b))
            expr = gen["px"].scale * library_size
        return qz.loc.cpu().numpy().astype(np.float32), expr.cpu().numpy().astype(np.float32)


class PCABaseline:
    """PCA of log1p(CP10k) on an eval set's own top HVGs (the sc-foundation-eval baseline).

    Exact and streamed: pass 1 accumulates the gene x gene cross-product ``X^T X`` and the gene sums
    of the sparse log1p(CP10k) batches (O(n_genes^2) memory, 32 MB for 2,000 HVGs), the covariance's
    top eigenvectors come from ``scipy.sparse.linalg.eigsh``; pass 2 projects each centred batch.
    The result equals ``sklearn.decomposition.PCA`` on the full matrix up to the sign of each
    component (dense SVDs of whole batches, as ``IncrementalPCA`` does, took ~4 s per 1,000 x 2,000
    batch on the 2-core test machine).

    Parameters
    ----------
    n_components : int
        Principal components (50 in sc-foundation-eval; capped at n_cells - 1 and n_genes - 1).
    """

    kind = "pca"
    name = "pca"
    mixture = "baseline"

    def __init__(self, n_components: int = 50):
        self.n_components = n_components

    def fit_transform(self, eval_set, genes: np.ndarray, batch_size: int = 2048) -> np.ndarray:
        """Embed every cell of ``eval_set`` on the gene axis ``genes`` (Ensembl ids).

        Returns
        -------
        numpy.ndarray of float32, shape (n_cells, n_components)
            Components in decreasing order of explained variance.
        """
        from scipy.sparse.linalg import eigsh

        from atlasmix.evaluation.metrics import log1p_cp10k

        G = len(genes)
        k = int(min(self.n_components, G - 1, eval_set.n_cells - 1))
        if k < 2:
            raise AtlasmixError(f"eval set {eval_set.name}: too few cells or genes for a PCA baseline")
        xtx = np.zeros((G, G), dtype=np.float64)
        s = np.zeros(G, dtype=np.float64)
        n = 0
        for _, m in eval_set.iter_counts(genes, batch_size):
            x = log1p_cp10k(m)
            xtx += (x.T @ x).toarray()
            s += np.asarray(x.sum(axis=0)).ravel()
            n += x.shape[0]
        mu = s / n
        cov = (xtx - n * np.outer(mu, mu)) / max(n - 1, 1)
        vals, vecs = eigsh(cov, k=k, which="LA", v0=np.ones(G))
        order = np.argsort(vals)[::-1]
        V = vecs[:, order]
        V *= np.sign(V[np.abs(V).argmax(axis=0), np.arange(k)])  # deterministic signs
        self.explained_variance_ = vals[order]
        out = np.zeros((eval_set.n_cells, k), dtype=np.float32)
        shift = mu @ V
        for sl, m in eval_set.iter_counts(genes, batch_size):
            out[sl] = np.asarray(log1p_cp10k(m) @ V) - shift
        return out


class GeneformerAdapter(_TrainedOnManifest):
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

        from atlasmix.evaluation.metrics import rank_prediction_score

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


class _EncodedModelAdapter(_TrainedOnManifest):
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


def load_model(path: str | Path, device: str = "cpu"):
    """The adapter for a model directory: an LDVAE run dir, a Geneformer run dir (``OUT``) or model dir
    (``OUT/model`` or any folder with ``config.json`` and the Geneformer dictionaries).

    Raises
    ------
    AtlasmixError
        Missing directory or unknown layout.
    """
    p = Path(path)
    if not p.is_dir():
        raise AtlasmixError(f"model directory not found: {p}")
    if (p / "run.json").is_file() and (p / "model" / "model.pt").is_file():
        return LDVAEAdapter(p, device)
    for c in (p / "model", p):
        if (c / "config.json").is_file() and (c / "token_dictionary.pkl").is_file():
            return GeneformerAdapter(p, device)
        if (c / "config.json").is_file():
            try:
                kind = json.loads((c / "config.json").read_text()).get("model")
            except (OSError, ValueError):
                kind = None
            if kind in ("scgpt", "scbert"):
                return (ScGPTAdapter if kind == "scgpt" else ScBERTAdapter)(p, device)
    raise AtlasmixError(f"{p}: not an LDVAE run directory (run.json + model/), a Geneformer run or model "
                        "directory (config.json + token_dictionary.pkl, in it or in its model/) nor an scGPT / "
                        "scBERT one (config.json naming the model)")
