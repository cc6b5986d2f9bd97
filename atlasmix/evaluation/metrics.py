"""Evaluation metrics as pure functions over arrays (no store, no model).

Sources of the protocols
------------------------
- Reconstruction accuracy: scFM-datamix (the training-data-composition study this project
  reproduces): per-cell Pearson r between log1p(CP10k) of the observed counts and log1p of the
  LDVAE's normalised expression at library size 10,000, on the eval set's top 1,000 highly
  variable genes (scanpy ``highly_variable_genes``, ``flavor="seurat"``).
- kNN and few-shot classification of cell type from an embedding: sc-foundation-eval (Kedzierska
  et al. 2023/2025, "Assessing the limits of zero-shot foundation models in single-cell biology"):
  L1 logistic regression (liblinear), C chosen by 5-fold CV, increasing training fractions x seeds.
- Rank prediction score of Geneformer (sc-foundation-eval's zero-shot evaluation of the MLM head)
  and rank-value-encoding fidelity (the rank-encoding study: are cells of one type more alike in
  rank space than cells of different types, and does rank space keep log-expression neighbours).

Conventions: counts are raw UMI counts, float32 or float64, cells x genes (CSR or dense); CP10k =
counts / library size * 10,000 where library size is the cell's sum of counts over the given gene
axis; ``log1p`` is the natural log of 1 + x.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from atlasmix.preprocess import TARGET_SUM, HVGStats, log1p_cp10k  # noqa: F401  (re-exported: metrics.HVGStats)

def rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of ``a`` with the same row of ``b``.

    Parameters
    ----------
    a, b : numpy.ndarray, shape (n_rows, n_cols)

    Returns
    -------
    numpy.ndarray of float64, shape (n_rows,)
        NaN where a row of either input is constant (correlation undefined).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    num = (a * b).sum(axis=1)
    den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / den
    r[den == 0] = np.nan
    return r


# ---------------------------------------------------------------------------------------------- HVG
# ---------------------------------------------------------------------------------------------- reconstruction
def reconstruction_accuracy(counts, normalized: np.ndarray, genes: np.ndarray | None = None,
                            target_sum: float = TARGET_SUM) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell reconstruction accuracy (scFM-datamix protocol).

    Parameters
    ----------
    counts : numpy.ndarray or scipy.sparse matrix, shape (n_cells, n_genes)
        Observed raw counts, already aligned to the model's gene axis (missing genes zero-filled,
        extra genes dropped). CP10k uses the library size over this axis.
    normalized : numpy.ndarray, shape (n_cells, n_genes)
        The model's normalised expression *at library size* ``target_sum`` (scvi-tools'
        ``get_normalized_expression(library_size=1e4)``): rows sum to ``target_sum``.
    genes : numpy.ndarray of int, optional
        Columns scored (the eval set's top 1,000 HVGs); default all.
    target_sum : float

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        Pearson r and r**2 per cell, float64, shape (n_cells,); NaN for a cell whose observed
        expression over ``genes`` is constant (e.g. no counts there).
    """
    orig = log1p_cp10k(counts, target_sum)
    rec = np.log1p(np.asarray(normalized, dtype=np.float64))
    if genes is not None:
        orig = orig[:, genes]
        rec = rec[:, genes]
    orig = orig.toarray() if sp.issparse(orig) else orig
    r = rowwise_pearson(orig, rec)
    return r, r * r


def summarize(values: np.ndarray) -> dict[str, float]:
    """Median, quartiles, IQR, mean and count of the finite values (NaN-safe)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return {"median": np.nan, "q25": np.nan, "q75": np.nan, "iqr": np.nan, "mean": np.nan, "n": 0}
    q25, med, q75 = np.percentile(v, [25, 50, 75])
    return {"median": float(med), "q25": float(q25), "q75": float(q75), "iqr": float(q75 - q25),
            "mean": float(v.mean()), "n": int(len(v))}


# ---------------------------------------------------------------------------------------------- labels
def usable_labels(labels, min_cells: int = 10, exclude=("unknown", "", "nan", "None")) -> np.ndarray:
    """Mask of cells whose label is known and shared by at least ``min_cells`` cells.

    Classification needs several cells per class (5-fold CV of the few-shot protocol, a 50/50 split).

    Returns
    -------
    numpy.ndarray of bool, shape (n_cells,)
    """
    lab = pd.Series(np.asarray(labels, dtype=object)).astype(str)
    ok = ~lab.isin(list(exclude))
    counts = lab[ok].value_counts()
    return (ok & lab.map(counts).fillna(0).ge(min_cells)).to_numpy()


def knn_classification(emb: np.ndarray, labels, k: int = 5, seed: int = 0, test_size: float = 0.5) -> dict[str, float]:
    """kNN (k=5) classification of cell type on a seeded, stratified 50/50 split.

    Parameters
    ----------
    emb : numpy.ndarray, shape (n_cells, n_dims)
        Cell embedding (LDVAE latent mean, Geneformer cell embedding, PCA).
    labels : array-like of str, shape (n_cells,)
        Cell types (use :func:`usable_labels` first).
    k : int
    seed : int
        Seeds the split.

    Returns
    -------
    dict
        ``accuracy``, ``macro_f1`` on the held-out half, ``n_train``, ``n_test``, ``n_classes``.
    """
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.model_selection import train_test_split
    from sklearn.neighbors import KNeighborsClassifier

    y = np.asarray(labels).astype(str)
    Xtr, Xte, ytr, yte = train_test_split(np.asarray(emb), y, test_size=test_size, random_state=seed, stratify=y)
    pred = KNeighborsClassifier(n_neighbors=k).fit(Xtr, ytr).predict(Xte)
    return {"accuracy": float(accuracy_score(yte, pred)), "macro_f1": float(f1_score(yte, pred, average="macro")),
            "n_train": int(len(ytr)), "n_test": int(len(yte)), "n_classes": int(len(np.unique(y)))}


FEW_SHOT_FRACTIONS = (0.1, 0.25, 0.5, 0.75, 1.0)


def few_shot(emb: np.ndarray, labels, fractions=FEW_SHOT_FRACTIONS, seeds=(0, 1, 2), test_size: float = 0.5,
             Cs=(0.01, 0.1, 1.0, 10.0), cv: int = 5, split_seed: int = 0) -> pd.DataFrame:
    """sc-foundation-eval few-shot protocol: L1 logistic regression on growing training fractions.

    A stratified split (``split_seed``) holds out ``test_size`` of the cells as the test set. For
    each training fraction f and seed s, a stratified subsample of f of the training half (every
    class keeps at least ``cv`` cells) fits ``LogisticRegressionCV(penalty="l1",
    solver="liblinear", Cs=Cs, cv=cv)`` one-vs-rest (liblinear is binary; C chosen by stratified
    5-fold CV for each class) on standardised features; accuracy and macro F1 are measured on the fixed test half.

    Parameters
    ----------
    emb : numpy.ndarray, shape (n_cells, n_dims)
    labels : array-like of str, shape (n_cells,)
        At least ``2 * cv`` cells per class (see :func:`usable_labels`).
    fractions : sequence of float
        Training fractions in (0, 1].
    seeds : sequence of int
    Cs : sequence of float
        Inverse regularisation strengths searched by CV (a small grid keeps CPU time low).

    Returns
    -------
    pandas.DataFrame
        One row per (fraction, seed): ``fraction``, ``seed``, ``n_train``, ``C``, ``accuracy``, ``macro_f1``.
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.model_selection import train_test_split
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X = np.asarray(emb, dtype=np.float64)
    y = np.asarray(labels).astype(str)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=test_size, random_state=split_seed, stratify=y)
    rows = []
    for f in fractions:
        for s in seeds:
            rng = np.random.default_rng([int(s), int(round(f * 1000))])
            idx = []
            for c in np.unique(ytr):  # stratified subsample, >= cv cells per class
                pos = np.flatnonzero(ytr == c)
                n = min(len(pos), max(cv, int(round(f * len(pos)))))
                idx.append(rng.choice(pos, size=n, replace=False))
            idx = np.sort(np.concatenate(idx))
            clf = make_pipeline(StandardScaler(), OneVsRestClassifier(LogisticRegressionCV(
                Cs=list(Cs), cv=cv, penalty="l1", solver="liblinear", max_iter=200, random_state=int(s))))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", UserWarning)
                clf.fit(Xtr[idx], ytr[idx])
            pred = clf.predict(Xte)
            C = np.concatenate([np.atleast_1d(est.C_) for est in clf[-1].estimators_])
            rows.append({"fraction": float(f), "seed": int(s), "n_train": int(len(idx)), "C": float(np.median(C)),
                         "accuracy": float(accuracy_score(yte, pred)),
                         "macro_f1": float(f1_score(yte, pred, average="macro"))})
    return pd.DataFrame(rows)


def integration_metrics(emb: np.ndarray, labels, seed: int = 0) -> dict[str, float]:
    """Cell-type clustering agreement of an embedding: NMI, ARI (k-means, k = number of types) and
    cell-type silhouette rescaled to [0, 1] as scib's ASW ((s + 1) / 2).

    Uses ``scib_metrics`` (``nmi_ari_cluster_labels_kmeans``, ``silhouette_label``) when it is
    installed, else scikit-learn's equivalents (k-means with ``n_init=10``, ``silhouette_score``).

    Returns
    -------
    dict
        ``nmi``, ``ari``, ``silhouette_label``, and ``backend`` ("scib_metrics" or "sklearn").
    """
    X = np.asarray(emb, dtype=np.float64)
    y = np.asarray(labels).astype(str)
    try:  # optional dependency
        import scib_metrics  # type: ignore

        na = scib_metrics.nmi_ari_cluster_labels_kmeans(X, y)
        return {"nmi": float(na["nmi"]), "ari": float(na["ari"]),
                "silhouette_label": float(scib_metrics.silhouette_label(X, y)), "backend": "scib_metrics"}
    except ImportError:
        pass
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

    k = len(np.unique(y))
    cl = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(X)
    sub = np.random.default_rng(seed).permutation(len(y))[:5000]  # silhouette is O(n^2)
    sil = silhouette_score(X[sub], y[sub]) if len(np.unique(y[sub])) > 1 else np.nan
    return {"nmi": float(normalized_mutual_info_score(y, cl)), "ari": float(adjusted_rand_score(y, cl)),
            "silhouette_label": float((sil + 1) / 2), "backend": "sklearn"}


# ---------------------------------------------------------------------------------------------- ranks
def rank_encode(counts, gene_medians: np.ndarray | None = None, target_sum: float = TARGET_SUM) -> np.ndarray:
    """Within-cell rank of each gene (Geneformer's rank value encoding as a dense rank vector).

    Expression is CP10k divided by each gene's nonzero median (Geneformer's normalisation; omitted
    when ``gene_medians`` is None). The most expressed gene gets the highest rank; genes with no
    counts share rank 0 (they are absent from a Geneformer input).

    Parameters
    ----------
    counts : numpy.ndarray or scipy.sparse matrix, shape (n_cells, n_genes)
    gene_medians : numpy.ndarray of float, shape (n_genes,), optional

    Returns
    -------
    numpy.ndarray of float64, shape (n_cells, n_genes)
        Average ranks of the expressed genes (1 = least expressed expressed gene), 0 for zeros.
    """
    from scipy.stats import rankdata

    x = np.asarray(counts.toarray() if sp.issparse(counts) else counts, dtype=np.float64)
    lib = x.sum(axis=1, keepdims=True)
    x = x * np.divide(target_sum, lib, out=np.zeros_like(lib), where=lib > 0)
    if gene_medians is not None:
        med = np.asarray(gene_medians, dtype=np.float64)
        x = x / np.where(med > 0, med, 1.0)
    r = rankdata(x, axis=1, method="average")
    nz = (x > 0).sum(axis=1, keepdims=True)
    r = r - (x.shape[1] - nz)  # zeros occupy the lowest ranks: shift so expressed genes are 1..nz
    r[x <= 0] = 0.0
    return r


def rank_fidelity(counts, labels, k: int = 5, max_cells: int = 3000, seed: int = 0,
                  gene_medians: np.ndarray | None = None) -> dict[str, float]:
    """Rank-value-encoding fidelity (the rank-encoding study).

    On up to ``max_cells`` cells (a seeded subsample; the n x n correlation is O(n^2)):

    - Spearman correlation between cells (Pearson of the within-cell rank vectors of
      :func:`rank_encode`), averaged over pairs of the same cell type (``spearman_within``) and of
      different cell types (``spearman_between``); ``spearman_gap`` = within - between.
    - kNN (k=5, Euclidean) cell-type agreement: the fraction of each cell's neighbours with its cell
      type, in rank space (``knn_agreement_rank``) and in log1p(CP10k) space
      (``knn_agreement_log``); and ``knn_overlap`` = mean fraction of shared neighbours between
      the two spaces.

    Parameters
    ----------
    counts : numpy.ndarray or scipy.sparse matrix, shape (n_cells, n_genes)
        Raw counts over the genes considered (e.g. the eval set's HVGs).
    labels : array-like of str, shape (n_cells,)

    Returns
    -------
    dict of float
    """
    from sklearn.neighbors import NearestNeighbors

    y = np.asarray(labels).astype(str)
    n = len(y)
    sub = np.sort(np.random.default_rng(seed).permutation(n)[:max_cells])
    y = y[sub]
    c = counts[sub]
    R = rank_encode(c, gene_medians)
    L = log1p_cp10k(c)
    L = L.toarray() if sp.issparse(L) else L
    keep = R.std(axis=1) > 0
    R, L, y = R[keep], L[keep], y[keep]
    C = np.corrcoef(R)
    same = y[:, None] == y[None, :]
    off = ~np.eye(len(y), dtype=bool)
    out = {"spearman_within": float(np.nanmean(C[same & off])) if (same & off).any() else np.nan,
           "spearman_between": float(np.nanmean(C[~same])) if (~same).any() else np.nan}
    out["spearman_gap"] = out["spearman_within"] - out["spearman_between"]
    kk = min(k, len(y) - 1)
    nbr = {}
    for name, M in (("rank", R), ("log", L)):
        idx = NearestNeighbors(n_neighbors=kk + 1).fit(M).kneighbors(M, return_distance=False)[:, 1:]
        nbr[name] = idx
        out[f"knn_agreement_{name}"] = float((y[idx] == y[:, None]).mean())
    out["knn_overlap"] = float(np.mean([len(np.intersect1d(a, b)) / kk for a, b in zip(nbr["rank"], nbr["log"])]))
    out["n_cells"] = int(len(y))
    return out


def mask_positions(input_ids: np.ndarray, fraction: float = 0.15, seed: int = 0,
                   special_ids=(0, 1, 2, 3), min_masked: int = 3) -> np.ndarray:
    """Seeded mask of gene positions to hide from an MLM (Geneformer pretraining masks 15 %).

    Parameters
    ----------
    input_ids : numpy.ndarray of int, shape (n_cells, seq_len)
        Token ids per cell in rank order (position 0 = most expressed after median scaling),
        padded with a special id.
    fraction : float
        Share of each cell's gene tokens masked (at least ``min_masked`` when the cell has that many).
    special_ids : sequence of int
        Token ids that are never masked (pad, mask, cls, eos).

    Returns
    -------
    numpy.ndarray of bool, shape (n_cells, seq_len)
    """
    ids = np.asarray(input_ids)
    gene = ~np.isin(ids, list(special_ids))
    rng = np.random.default_rng(seed)
    mask = np.zeros(ids.shape, dtype=bool)
    for i in range(ids.shape[0]):
        pos = np.flatnonzero(gene[i])
        n = min(len(pos), max(min_masked, int(round(fraction * len(pos)))))
        if n:
            mask[i, rng.choice(pos, size=n, replace=False)] = True
    return mask


def _assign_order(true_pos: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Predicted positions: the masked positions (sorted) handed out in the order of ``score``."""
    order = np.argsort(score, kind="stable")
    pred = np.empty(len(score), dtype=np.float64)
    pred[order] = np.sort(true_pos)
    return pred


def _scorable_cells(ids: np.ndarray, mask: np.ndarray):
    """``(i, masked positions)`` of each cell (row of ``ids``) with at least 3 masked positions, the
    cells that :func:`rank_prediction_scores` and :func:`mean_rank_baseline_scores` score (the
    others stay NaN)."""
    for i in range(ids.shape[0]):
        pos = np.flatnonzero(mask[i])
        if len(pos) >= 3:
            yield i, pos


def rank_prediction_scores(input_ids: np.ndarray, mask: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """Per-cell rank prediction score of a masked language model (sc-foundation-eval's zero-shot test).

    For each cell, the genes at the masked positions are hidden (``<mask>`` tokens) and the model
    scores every vocabulary token at every masked position. Gene g's *expected position* is the
    average of the masked positions weighted by the model's probability of g there
    (``softmax(logits)[j, g]``, normalised over the masked positions j). The masked genes, ordered by
    expected position, are assigned to the masked positions in order (the *predicted rank
    position*); the score is the Pearson r between true and predicted positions (1: the model
    recovers the within-cell order of the hidden genes; ~0: no better than a random order).

    Parameters
    ----------
    input_ids : numpy.ndarray of int, shape (n_cells, seq_len)
        The unmasked token ids (true genes at each position).
    mask : numpy.ndarray of bool, shape (n_cells, seq_len)
        Masked positions (:func:`mask_positions`).
    logits : numpy.ndarray of float, shape (n_cells, seq_len, vocab_size)
        The MLM's output for the masked input.

    Returns
    -------
    numpy.ndarray of float64, shape (n_cells,)
        NaN for cells with fewer than 3 masked genes.
    """
    ids = np.asarray(input_ids)
    out = np.full(ids.shape[0], np.nan)
    for i, pos in _scorable_cells(ids, mask):
        genes = ids[i, pos]
        lg = np.asarray(logits[i][pos], dtype=np.float64)  # (n_masked, vocab)
        lg = lg - lg.max(axis=1, keepdims=True)
        p = np.exp(lg)
        p /= p.sum(axis=1, keepdims=True)
        out[i] = rank_prediction_score(pos, p[:, genes])
    return out


def rank_prediction_score(pos: np.ndarray, prob: np.ndarray) -> float:
    """The rank prediction score of one cell (:func:`rank_prediction_scores`) from the probabilities
    of its masked genes only.

    Parameters
    ----------
    pos : numpy.ndarray of int, shape (n,)
        The masked positions, ascending.
    prob : numpy.ndarray of float, shape (n, n)
        ``prob[j, g]``: the model's probability (softmax over the *whole* vocabulary) of the gene
        truly at masked position ``g`` at masked position ``j``. Gathering these n x n values from
        the logits of the masked positions avoids materialising (seq_len x vocab) per cell.

    Returns
    -------
    float
        Pearson r of true vs predicted positions; NaN when fewer than 3 positions.
    """
    pos = np.asarray(pos)
    if len(pos) < 3:
        return np.nan
    w = np.asarray(prob, dtype=np.float64)
    w = w / np.maximum(w.sum(axis=0, keepdims=True), 1e-300)
    expected = (pos[:, None] * w).sum(axis=0)
    pred = _assign_order(pos, expected)
    return float(np.corrcoef(pos, pred)[0, 1])


def mean_rank_baseline_scores(input_ids: np.ndarray, mask: np.ndarray, mean_position: np.ndarray) -> np.ndarray:
    """The mean-rank baseline of :func:`rank_prediction_scores`: the hidden genes are ordered by their
    average position over cells (e.g. over the eval set's inputs) instead of by the model.

    Parameters
    ----------
    input_ids, mask : as in :func:`rank_prediction_scores`
    mean_position : numpy.ndarray of float, shape (vocab_size,)
        Average position of each token over the cells where it occurs (NaN where it never does;
        such genes go last).

    Returns
    -------
    numpy.ndarray of float64, shape (n_cells,)
    """
    ids = np.asarray(input_ids)
    out = np.full(ids.shape[0], np.nan)
    for i, pos in _scorable_cells(ids, mask):
        sc = np.nan_to_num(mean_position[ids[i, pos]], nan=np.inf)
        pred = _assign_order(pos, sc)
        out[i] = np.corrcoef(pos, pred)[0, 1] if np.std(pred) > 0 else np.nan
    return out


def mean_positions(input_ids: np.ndarray, vocab_size: int, special_ids=(0, 1, 2, 3)) -> tuple[np.ndarray, np.ndarray]:
    """Sum of positions and occurrence counts of each token over cells (accumulate, then divide).

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        float64 sums and int64 counts, each shape (vocab_size,).
    """
    ids = np.asarray(input_ids)
    gene = ~np.isin(ids, list(special_ids))
    pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    s = np.bincount(ids[gene], weights=pos[gene], minlength=vocab_size).astype(np.float64)
    c = np.bincount(ids[gene], minlength=vocab_size).astype(np.int64)
    return s, c
