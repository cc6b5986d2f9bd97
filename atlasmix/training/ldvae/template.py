"""The small AnnData ``LinearSCVI`` is built with, and the library-size priors it is given.

``LinearSCVI.__init__`` still wants an AnnData: it reads the gene axis, the number of batches and,
from the counts, the per-batch mean and variance of log library size (the prior of the library
latent ``l``, used because ``use_observed_lib_size=False`` is LDVAE's default). We give it a small
*template* (:func:`template_anndata`): ``n_template`` real training cells (read from the store,
<= 1,000 by default) whose ``var`` is the mixture's gene axis (index ``feature_id``, column
``feature_name``) and whose ``obs["batch"]`` is a categorical holding *every* batch category of the
mixture (so ``n_batch`` is right even when the template lacks a batch). The library-size priors
computed by scvi-tools on the template are then replaced by priors computed over a random sample of
up to ``prior_cells`` training cells (all of them when fewer) streamed from the store
(:func:`library_priors`): per batch, mean and variance of ``log(sum of counts over the gene
axis)``; a batch absent from the sample gets the pooled values. The template is saved with the
model so ``scvi.model.LinearSCVI.load(OUT/model)`` works as usual.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from atlasmix.training.loader import MixtureLoader

#: Floor of the per-batch variance of log library size (the library prior's scale must be > 0).
MIN_LIBRARY_LOG_VAR = 1e-2


def library_priors(loader: MixtureLoader, batch_key: str | None, max_cells: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Per-batch mean and variance of log library size from a random sample of training cells.

    Parameters
    ----------
    loader : MixtureLoader
        A shuffled loader over the training split (a copy: its position is consumed).
    batch_key : str or None
    max_cells : int
        Stop after this many cells (the loader's order is a uniform block permutation, so the first
        cells are a random sample).

    Returns
    -------
    (numpy.ndarray, numpy.ndarray, dict)
        ``library_log_means`` and ``library_log_vars``, float32, shape (1, n_batch) (scvi-tools'
        layout), and a sample: ``X`` (scipy CSR of the first cells), ``batch`` codes, ``soma_joinid``.
    """
    n_batch = len(loader.categories[batch_key]) if batch_key else 1
    logs, codes, keep_X, keep_b, keep_id = [], [], [], [], []
    seen = 0
    for b in loader:
        lib = b["library_size"].cpu().numpy().ravel()
        c = b[batch_key].numpy() if batch_key else np.zeros(len(lib), dtype=np.int64)
        logs.append(np.log(np.maximum(lib, 1.0)))  # log(0) guarded as scvi-tools does (empty cells)
        codes.append(c)
        keep_X.append(sp.csr_matrix(b["X"].cpu().numpy()))
        keep_b.append(c)
        keep_id.append(b["soma_joinid"].numpy())
        seen += len(lib)
        if seen >= max_cells:
            break
    logs_a, codes_a = np.concatenate(logs)[:max_cells], np.concatenate(codes)[:max_cells]
    means = np.full(n_batch, logs_a.mean(), dtype=np.float64)
    var = np.full(n_batch, logs_a.var(), dtype=np.float64)
    for k in range(n_batch):
        sel = logs_a[codes_a == k]
        if len(sel):
            means[k] = sel.mean()
            var[k] = sel.var() if len(sel) > 1 else var[k]
    # a batch whose sampled cells all have the same library (e.g. a small gene panel that measures none
    # of the gene axis: every library is 0) has variance 0, and Normal(mean, 0) is invalid in scvi-tools
    var = np.maximum(var, MIN_LIBRARY_LOG_VAR)
    sample = {"X": sp.vstack(keep_X).tocsr(), "batch": np.concatenate(keep_b), "soma_joinid": np.concatenate(keep_id)}
    return means.reshape(1, -1).astype(np.float32), var.reshape(1, -1).astype(np.float32), sample


def template_anndata(store, loader: MixtureLoader, sample: dict, batch_key: str | None, n_template: int):
    """The small AnnData LinearSCVI is constructed with (module doc): ``n_template`` sampled cells.

    Returns
    -------
    anndata.AnnData
        X CSR float32 (n_template, n_genes) counts; obs ``batch`` (categorical over every batch
        category), ``soma_joinid``; var index ``feature_id``, column ``feature_name``.
    """
    import anndata as ad

    var = store.var().loc[loader.var_joinids]
    n = min(n_template, sample["X"].shape[0])
    cats = loader.categories[batch_key] if batch_key else ["all"]
    obs = pd.DataFrame({"batch": pd.Categorical.from_codes(sample["batch"][:n], categories=cats),
                        "soma_joinid": sample["soma_joinid"][:n]},
                       index=[f"cell{j}" for j in sample["soma_joinid"][:n]])
    vdf = pd.DataFrame({"feature_name": var["feature_name"].to_numpy(),
                        "soma_joinid": loader.var_joinids}, index=pd.Index(var["feature_id"].to_numpy(), name="feature_id"))
    return ad.AnnData(X=sample["X"][:n].astype(np.float32), obs=obs, var=vdf)
