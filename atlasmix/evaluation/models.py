"""Model adapters for evaluation: trained model directory -> per-batch outputs on aligned counts.

Every adapter has ``name``, ``kind``, ``mixture`` (the training mixture's name), ``feature_ids``
(its gene axis, Ensembl ids: eval counts are aligned to it, missing genes zero-filled, extra genes
dropped) and :meth:`training_cells` (for the overlap refusal).

LDVAE
    ``atlasmix train ldvae`` output (``model/``, ``run.json``). :meth:`LDVAEAdapter.encode` goes
    through scvi-tools' public model API on a one-minibatch data loader of dense counts (scvi-tools'
    custom-dataloader contract, as in :func:`atlasmix.training.ldvae.latent_representation`):
    ``LinearSCVI.get_latent_representation`` gives the posterior mean of z, and
    ``LinearSCVI.get_normalized_expression(library_size=1e4)`` the normalised expression at library
    size 10,000, averaged over :data:`N_SAMPLES` posterior samples of z per cell (its
    ``n_samples`` / ``return_mean``: a Monte Carlo estimate of the expected expression). The samples
    come from torch's global generator, which :meth:`LDVAEAdapter.reconstruction` seeds once per
    (model, eval set), so scores are reproducible (for a given ``seed`` and batch size). Until issue
    22 the evaluation called the module's ``inference`` / ``generative`` itself and decoded the
    posterior *mean* of z, which no public call does. One sample per cell (scvi-tools' default, the
    call scFM-datamix's ``Evaluations/ldvae/LDVAE_eval_class.py`` makes) decodes noisier expression:
    median per-cell r -0.002 on a converged simulated LDVAE (500 HVGs, 800,000 cells seen), -0.011 on
    held-out kang_ifnb / pbmc3k cells of a converged real-PBMC LDVAE, and on the short-budget models
    of the demo study (20,000 cells seen) it dropped the blood models' mean r from above 0.1 to
    0.055-0.069, a change made by the sampling, not by the models. Averaging 25 samples lands within
    ~0.002 of the posterior-mean decoding on the converged models, so the reported r measures the
    model, not the draw.

    Batch covariate of eval cells: a cell whose ``dataset_id`` is one of the model's training
    batches (a dataset with training cells, read from the manifest sidecar's composition) gets that
    batch's code; any other cell (held-out dataset, external file) gets the code of the first
    trained batch category (the reference batch) -- scvi-tools has no code for an unseen batch
    without query-model surgery (scArches), and the LDVAE decoder's batch term is additive in the
    linear predictor, so this conditions the reconstruction on a fixed, seen batch. The per-cell
    table records ``batch_seen``.

Geneformer, scGPT, scBERT
    :mod:`atlasmix.evaluation.pretrained`.

:func:`load_model` picks the adapter of a model directory.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from atlasmix.errors import AtlasmixError
from atlasmix.evaluation.metrics import reconstruction_accuracy
from atlasmix.evaluation.overlap import TrainedOnManifest
from atlasmix.evaluation.pretrained import GeneformerAdapter, ScBERTAdapter, ScGPTAdapter
from atlasmix.mixing import read_sidecar
from atlasmix.preprocess import GramPCA, log1p_cp10k


#: Posterior samples of z averaged by the LDVAE reconstruction (module doc).
N_SAMPLES = 25

class LDVAEAdapter(TrainedOnManifest):
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
        import scvi  # (heavy: loaded only when an LDVAE is evaluated)

        self.path = Path(path)
        if not (self.path / "model" / "model.pt").is_file() or not (self.path / "run.json").is_file():
            raise AtlasmixError(f"{self.path} is not an LDVAE run directory (needs model/model.pt and run.json)")
        self.run = json.loads((self.path / "run.json").read_text())
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

    def encode(self, X: np.ndarray, batch: np.ndarray, library_size: float = 1e4) -> tuple[np.ndarray, np.ndarray]:
        """Latent posterior mean and normalised expression of a batch of cells (module doc), through
        ``LinearSCVI.get_normalized_expression`` and ``LinearSCVI.get_latent_representation``.

        Parameters
        ----------
        X : numpy.ndarray of float32, shape (B, n_genes)
            Raw counts on the model's gene axis.
        batch : numpy.ndarray of int, shape (B,)
            Batch codes (:meth:`batch_codes`).
        library_size : float
            Library size the expression proportions are scaled to.

        Returns
        -------
        (numpy.ndarray, numpy.ndarray)
            Latent means float32 (B, n_latent); normalised expression float32 (B, n_genes), the mean
            over :data:`N_SAMPLES` posterior samples of z per cell (torch's global generator), rows
            summing to ``library_size``.
        """
        import torch
        from scvi import REGISTRY_KEYS

        x = torch.as_tensor(np.asarray(X, dtype=np.float32), device=self.device)
        b = torch.as_tensor(np.asarray(batch, dtype=np.int64), device=self.device).reshape(-1, 1)
        loader = [{REGISTRY_KEYS.X_KEY: x, REGISTRY_KEYS.BATCH_KEY: b, REGISTRY_KEYS.LABELS_KEY: torch.zeros_like(b)}]
        expr = self.model.get_normalized_expression(dataloader=loader, library_size=library_size,
                                                    n_samples=N_SAMPLES, return_mean=True)
        z = self.model.get_latent_representation(dataloader=loader)
        return np.asarray(z, dtype=np.float32), np.asarray(expr, dtype=np.float32)

    def reconstruction(self, batches, n_cells: int, codes: np.ndarray, hvg: np.ndarray,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """scFM-datamix reconstruction accuracy and latent means of eval cells streamed in batches.

        Parameters
        ----------
        batches : iterable of (slice, scipy.sparse.csr_matrix)
            Consecutive row ranges of the ``n_cells`` eval cells and their raw counts on
            :attr:`feature_ids` (e.g. :meth:`atlasmix.evaluation.evalsets.EvalSet.iter_counts`);
            one batch at a time is held dense.
        n_cells : int
        codes : numpy.ndarray of int64, shape (n_cells,)
            Batch codes (:meth:`batch_codes`).
        hvg : numpy.ndarray of int
            Columns scored (the eval set's top HVGs on the model's gene axis).
        seed : int
            Seeds torch's generator before the first batch: the posterior samples of z, hence the
            scores, are the same on every run.

        Returns
        -------
        (numpy.ndarray, numpy.ndarray)
            Per-cell Pearson r float64 (n_cells,) (:func:`atlasmix.evaluation.metrics.reconstruction_accuracy`,
            NaN for cells without a count on ``hvg``); latent means float32 (n_cells, n_latent).
        """
        import torch

        torch.manual_seed(seed)
        r = np.full(n_cells, np.nan)
        lat = np.zeros((n_cells, self.n_latent), dtype=np.float32)
        for sl, counts in batches:
            z, expr = self.encode(counts.toarray(), codes[sl])
            r[sl] = reconstruction_accuracy(counts, expr, hvg)[0]
            lat[sl] = z
        return r, lat


class PCABaseline:
    """PCA of log1p(CP10k) on an eval set's own top HVGs (the sc-foundation-eval baseline).

    Exact and streamed (:class:`atlasmix.preprocess.GramPCA`, the PCA the geometric sketch uses too):
    pass 1 accumulates the Gram matrix of the log1p(CP10k) batches (O(n_genes^2) memory, 32 MB for
    2,000 HVGs), pass 2 projects each centred batch. The result equals ``sklearn.decomposition.PCA``
    on the full matrix up to the sign of each component.

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
        G = len(genes)
        k = int(min(self.n_components, G - 1, eval_set.n_cells - 1))
        if k < 2:
            raise AtlasmixError(f"eval set {eval_set.name}: too few cells or genes for a PCA baseline")
        pca = GramPCA(G)
        for _, m in eval_set.iter_counts(genes, batch_size):
            pca.update(log1p_cp10k(m))
        pca.fit(k)
        self.explained_variance_ = pca.explained_variance_
        out = np.zeros((eval_set.n_cells, k), dtype=np.float32)
        for sl, m in eval_set.iter_counts(genes, batch_size):
            out[sl] = pca.transform(log1p_cp10k(m))
        return out


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
