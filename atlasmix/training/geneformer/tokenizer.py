"""Rank value encoding (Geneformer's tokenizer) over whole CSR minibatches, no Python loop per cell.

The method (Theodoris et al. 2023; Geneformer's ``tokenizer.py``, ``TranscriptomeTokenizer``):
for each cell, over the genes of the vocabulary (genes with a token and a gene median) that are
nonzero in the cell,

    x_g = counts_g / n_counts * 10,000 / median_g

(CP10k normalisation by the cell's total counts over *all* measured genes, then division by the
gene's nonzero median over the pretraining corpus), order the genes by descending ``x_g`` and map
them to token ids; truncate to the model input size. V1: 2,048 tokens, no special tokens. V2: 4,096
tokens, ``<cls>`` first and ``<eos>`` last (so at most 4,094 genes).

:func:`rank_value_encode` does this for a whole CSR minibatch in one compiled (numba) pass over the
cells, without the GIL: per cell, each nonzero becomes an int64 key (descending value, token id)
and the keys are ordered by a bucket (counting) sort plus an insertion pass, expected O(n) per cell
instead of a comparison sort's O(n log n). Values are computed in float64 as Geneformer does (up to
the per-cell constant ``10,000 / n_counts``, which does not change the order); ties come out in
token-id order (Geneformer's own ``np.argsort`` leaves tie order unspecified). With Geneformer's V1
dictionaries it reproduces the published V1 tokens of ``pisces_pbmc1k`` for all 1,000 cells, tie
order included. :func:`rank_value_encode_reference` is the straightforward per-cell version of the
reference algorithm, kept for tests and the benchmark.

:class:`GeneformerStream` wraps a :class:`~atlasmix.training.loader.MixtureLoader` (sparse CSR
minibatches, ``library="total_counts"`` = Geneformer's ``n_counts``, gene axis = the vocabulary
genes present in the store) and tokenizes each minibatch on the fly; no tokenized copy of the
corpus is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from atlasmix.errors import AtlasmixError
from atlasmix.training._cells import run_in_chunks
from atlasmix.preprocess import TARGET_SUM
# the compiled kernel and its key layout; _MAX_BUCKET_N is read here by the tests
from atlasmix.training.geneformer._rank_kernel import _MAX_BUCKET_N, _MAX_POS_BITS, _encode_cells  # noqa: F401
from atlasmix.training.geneformer.dictionaries import CLS, EOS, Dictionaries
from atlasmix.training.stream import EncodedStream

#: model input sizes: V1 (Geneformer gc30M models) and V2 (gc104M models).
MODES = {"v1": {"max_len": 2048, "special_tokens": False}, "v2": {"max_len": 4096, "special_tokens": True}}


def mode_settings(mode: str, max_len: int | None = None) -> tuple[int, bool]:
    """(model input size, special tokens) of a tokenizer mode ``v1`` / ``v2``, ``max_len`` overriding.

    Raises
    ------
    AtlasmixError
        Unknown mode or ``max_len`` too small.
    """
    if mode not in MODES:
        raise AtlasmixError(f"tokenizer mode must be one of {sorted(MODES)}, got {mode!r}")
    m = MODES[mode]
    L = int(max_len or m["max_len"])
    if L < (3 if m["special_tokens"] else 1):
        raise AtlasmixError(f"model input size {L} is too small")
    return L, bool(m["special_tokens"])


def rank_value_encode(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, n_counts: np.ndarray,
                      medians: np.ndarray, token_ids: np.ndarray, max_len: int = 2048, *,
                      cls_id: int | None = None, eos_id: int | None = None, pad_id: int = 0,
                      target_sum: float = TARGET_SUM,
                      threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Rank value encoding of a CSR batch of raw counts (Geneformer's algorithm, compiled per cell).

    Parameters
    ----------
    indptr : numpy.ndarray of int, shape (B + 1,)
    indices : numpy.ndarray of int, shape (nnz,)
        Columns into the gene axis of ``medians`` / ``token_ids``.
    data : numpy.ndarray, shape (nnz,)
        Raw counts (any float / int dtype); zeros are ignored.
    n_counts : numpy.ndarray, shape (B,)
        Total counts of each cell over all its measured genes (Geneformer's ``n_counts``), > 0.
    medians : numpy.ndarray of float, shape (G,)
        Gene median (nonzero median of CP10k over the corpus) per column; NaN, inf or <= 0 marks
        a column outside the vocabulary (ignored).
    token_ids : numpy.ndarray of int, shape (G,)
        Token id per column.
    max_len : int
        Model input size (2048 for V1, 4096 for V2), special tokens included.
    cls_id, eos_id : int, optional
        V2: prepend ``<cls>`` and append ``<eos>`` (then at most ``max_len - 2`` genes).
    pad_id : int
        Padding token id of the output.
    target_sum : float
        CP10k: 10,000 (a per-cell constant factor: it does not change the order).
    threads : int
        Threads (the caller's included); they take contiguous chunks of cells (about equal nonzeros,
        up to 16 per thread) from a shared queue and encode them in place, so a slower core takes
        fewer chunks. The compiled kernel runs without the GIL.

    Returns
    -------
    (numpy.ndarray of int64, numpy.ndarray of int64)
        ``tokens`` shape (B, L) with L = the longest encoding in the batch, rows padded with
        ``pad_id``; ``lengths`` shape (B,). Genes of equal ``x`` come in token-id order.

    Raises
    ------
    AtlasmixError
        Shapes disagree, a token id is outside [0, 2^20), or a cell with nonzero counts has
        ``n_counts <= 0``.

    Notes
    -----
    Geneformer orders a cell's genes by ``x = counts / n_counts * 10,000 / median`` (float64);
    ``10,000 / n_counts`` is the same for all genes of a cell, so the order is that of
    ``counts * (1 / median)``, computed here in float64 (``n_counts`` and ``target_sum`` only
    validate). Each nonzero becomes one int64 key: the float64 bit pattern of x (monotonic for
    positive numbers) negated, its low 16 bits dropped, then the token id in the low 15+ bits; so
    ascending keys are descending x, and values within a relative 1.5e-11 of each other (float64
    rounding noise of equal ratios) count as ties and come in token-id order (Geneformer leaves the
    order of ties unspecified). Each cell's keys are bucket sorted (2-8 buckets per nonzero over the
    cell's key range, which is close to linear in log x; measured 0.14 out-of-order neighbours per
    nonzero on whole-transcriptome PBMCs, fixed by one insertion pass), with a comparison sort as
    the fallback for cells whose keys crowd into few buckets. The kernel is compiled by numba on
    first use (a few seconds, then cached on disk next to this module).
    """
    indptr = np.asarray(indptr, dtype=np.int64)
    indices = np.ascontiguousarray(indices)
    data = np.ascontiguousarray(data)
    n_counts = np.asarray(n_counts, dtype=np.float64).ravel()
    medians = np.asarray(medians, dtype=np.float64)
    token_ids = np.ascontiguousarray(token_ids, dtype=np.int64)
    B = len(indptr) - 1
    if len(n_counts) != B or len(medians) != len(token_ids) or len(indices) != len(data):
        raise AtlasmixError("rank_value_encode: inconsistent shapes")
    special = cls_id is not None and eos_id is not None
    n_genes_max = int(max_len) - (2 if special else 0)
    if n_genes_max < 1:
        raise AtlasmixError(f"model input size {max_len} leaves no room for genes")
    pos_bits = max(15, int(token_ids.max(initial=0)).bit_length())
    if pos_bits > _MAX_POS_BITS or int(token_ids.min(initial=0)) < 0:
        raise AtlasmixError(f"token ids must be in [0, 2^{_MAX_POS_BITS})")
    with np.errstate(divide="ignore", invalid="ignore"):  # columns outside the vocabulary: NaN
        inv_medians = np.where((medians > 0) & np.isfinite(medians), 1.0 / medians, np.nan)
    off = 1 if special else 0
    # width: the longest row before zeros / columns outside the vocabulary drop out (trimmed below)
    out = np.empty((B, int(min(np.diff(indptr).max(initial=0), n_genes_max)) + 2 * off), dtype=np.int64)
    lengths = np.empty(B, dtype=np.int64)
    args = (indptr, indices, data, inv_medians, token_ids, pos_bits, n_genes_max,
            int(cls_id) if special else -1, int(eos_id) if special else -1, int(pad_id))
    # in threads: dynamic chunks of about equal nonzeros (atlasmix.training._cells)
    run_in_chunks(lambda a, b: _encode_cells(out, lengths, a, b, *args), indptr, threads)
    if np.any(n_counts[lengths > 2 * off] <= 0):
        raise AtlasmixError("a cell with nonzero counts has n_counts <= 0")
    L = int(lengths.max(initial=2 * off))
    if L < out.shape[1]:
        out = np.ascontiguousarray(out[:, :L])
    return out, lengths


def rank_value_encode_reference(X, n_counts: np.ndarray, medians: np.ndarray, token_ids: np.ndarray,
                                max_len: int = 2048, cls_id: int | None = None, eos_id: int | None = None,
                                target_sum: float = TARGET_SUM) -> list[np.ndarray]:
    """The straightforward per-cell rank value encoding (Geneformer's ``tokenize_cell``/``rank_genes``).

    Normalises the batch as a sparse matrix, then loops over cells: take the row's nonzero values,
    ``argsort`` descending, map to tokens, truncate. Used as the parity reference and the
    benchmark baseline.

    Parameters
    ----------
    X : scipy.sparse.csr_matrix, shape (B, G)
        Raw counts over the vocabulary columns (columns outside the vocabulary: NaN median).
    n_counts, medians, token_ids, max_len, cls_id, eos_id, target_sum
        As :func:`rank_value_encode`.

    Returns
    -------
    list of numpy.ndarray of int64
        One token sequence per cell.
    """
    import scipy.sparse as sp

    med = np.asarray(medians, dtype=np.float64)
    keep = np.flatnonzero(med > 0)
    Xv = sp.csr_matrix(X)[:, keep].astype(np.float64)
    norm = sp.diags(1.0 / np.asarray(n_counts, dtype=np.float64).ravel()) @ Xv
    norm = (norm * target_sum) @ sp.diags(1.0 / med[keep])
    norm = sp.csr_matrix(norm)
    toks = np.asarray(token_ids, dtype=np.int64)[keep]
    special = cls_id is not None and eos_id is not None
    n_max = max_len - (2 if special else 0)
    out = []
    for i in range(norm.shape[0]):
        r = norm[i]
        nz = r.data > 0
        v, t = r.data[nz], toks[r.indices[nz]]
        seq = t[np.argsort(-v, kind="stable")][:n_max]
        if special:
            seq = np.concatenate([[cls_id], seq, [eos_id]])
        out.append(seq.astype(np.int64))
    return out


def tie_aware_equal(a: np.ndarray, b: np.ndarray, x_of: dict[int, float], rtol: float = 0.0) -> bool:
    """Whether two token sequences are the same rank value encoding up to the order of ties.

    Parameters
    ----------
    a, b : numpy.ndarray of int
        Token sequences (no padding).
    x_of : dict of int -> float
        Token id -> the cell's normalised value ``x`` (special tokens absent).
    rtol : float
        Values within this relative tolerance count as tied (0: exactly equal).

    Returns
    -------
    bool
        Same length, and position by position the values of ``a`` and ``b`` are (tie-)equal, and
        the multisets of tokens agree except inside the tie group cut by truncation.
    """
    a, b = np.asarray(a), np.asarray(b)
    if len(a) != len(b):
        return False
    if np.array_equal(a, b):
        return True
    va = np.array([x_of.get(int(t), np.nan) for t in a])
    vb = np.array([x_of.get(int(t), np.nan) for t in b])
    same_val = np.isclose(va, vb, rtol=rtol, atol=0) | (np.isnan(va) & np.isnan(vb) & (a == b))
    if not same_val.all():
        return False
    # tokens differ only within groups of equal values; the last group may be cut by truncation
    last = va[-1]
    full = ~np.isclose(va, last, rtol=rtol, atol=0)
    return sorted(a[full].tolist()) == sorted(b[full].tolist())


# ---------------------------------------------------------------------------------------------- store side
def vocabulary_axis(store, dicts: Dictionaries, species: str | None = None) -> dict[str, np.ndarray]:
    """The store genes of a vocabulary: var joinids, token ids and medians, aligned.

    Parameters
    ----------
    store : atlasmix.store.Store
    dicts : Dictionaries
    species : str, optional
        Keep only store genes of this species (default: all).

    Returns
    -------
    dict
        ``var_joinids`` int64 (G,), ``token_ids`` int64 (G,), ``medians`` float64 (G,),
        ``feature_ids`` object (G,), and ``n_vocab`` (genes in the dictionaries).

    Raises
    ------
    AtlasmixError
        No gene of the vocabulary is in the store.
    """
    var = store.var()
    if species is not None and "species" in var:
        var = var[var["species"] == species]
    ok, tok, med = dicts.arrays(var["feature_id"].tolist())
    if not ok.any():
        raise AtlasmixError("no gene of the token/median dictionaries is in the store (Ensembl ids differ?)")
    return {"var_joinids": var.index.to_numpy(dtype=np.int64)[ok], "token_ids": tok[ok], "medians": med[ok],
            "feature_ids": var["feature_id"].to_numpy()[ok], "n_vocab": len(dicts.genes())}


class GeneformerStream(EncodedStream):
    """Tokenized minibatches of a mixture, rank value encoded on the fly from a :class:`MixtureLoader`.

    Parameters
    ----------
    loader : atlasmix.training.loader.MixtureLoader
        Built with ``sparse=True``, ``library="total_counts"`` and ``var_joinids`` = the
        vocabulary axis (:func:`vocabulary_axis`), CPU device. Its ``batch_size`` is the
        *megabatch*: it is tokenized at once, then (``group_by_length``) sorted by length and cut
        into training batches of ``batch_size`` (Geneformer's length-grouped sampler: similar
        lengths share a batch, so dynamic padding wastes little).
    axis : dict
        :func:`vocabulary_axis` output.
    dicts : Dictionaries
    mode : {"v1", "v2"}
    max_len : int, optional
        Model input size override.
    batch_size : int
        Cells per training batch (default: the loader's batch size, no grouping).
    group_by_length : bool
        Length-grouped batches inside each megabatch (batch order shuffled with the loader's seed).
    drop_empty : bool
        Drop cells with no vocabulary gene (e.g. mouse cells under a human vocabulary).
    threads : int
        Threads of :func:`rank_value_encode`.
    prefetch : int
        Tokenized megabatches made ahead of the consumer by a background thread.

    Yields
    ------
    dict
        ``input_ids`` int64 (b, L) padded with ``<pad>`` to the batch's longest cell (dynamic
        padding), ``attention_mask`` int64 (b, L), ``lengths`` int64 (b,), ``soma_joinid`` int64 (b,),
        plus the loader's obs code tensors. CPU tensors.

    Notes
    -----
    :meth:`state_dict` / :meth:`load_state_dict` record the consumer's position (megabatch and the
    batch index inside it; the background thread may have read ahead), so a resumed stream
    continues with the next training batch.

    Tokens from the store equal Geneformer's from the source file on every gene both map to the
    same Ensembl id: the store maps symbols with GENCODE/HGNC (aliases and previous symbols
    included, duplicate symbols summed), Geneformer with its ``gene_name_id_dict`` (first column
    wins). Measured on ``pisces_pbmc1k`` with the V1 dictionaries: 19,857 genes mapped identically,
    18 only by Geneformer, 1,108 (expressed) only by the store (e.g. ATP5E -> ENSG00000124172);
    so 11/1,000 cells are identical in full, and all 1,000 rank the common genes identically.
    """

    thread_name = "atlasmix-geneformer"

    def __init__(self, loader, axis: dict[str, np.ndarray], dicts: Dictionaries, mode: str = "v1",
                 max_len: int | None = None, batch_size: int | None = None, group_by_length: bool = True,
                 drop_empty: bool = True, threads: int = 1, prefetch: int = 2):
        if not loader.sparse or loader.library != "total_counts":
            raise AtlasmixError("GeneformerStream needs a loader with sparse=True and library='total_counts'")
        if not np.array_equal(loader.var_joinids, axis["var_joinids"]):
            raise AtlasmixError("the loader's gene axis is not the vocabulary axis")
        super().__init__(loader, batch_size, group_by_length, drop_empty, prefetch)
        self.axis, self.dicts, self.mode = axis, dicts, mode
        self.max_len, special = mode_settings(mode, max_len)
        if special and not dicts.has_v2_specials:
            raise AtlasmixError("V2 mode needs <cls> and <eos> in the token dictionary")
        self.cls_id = dicts.token[CLS] if special else None
        self.eos_id = dicts.token[EOS] if special else None
        self.n_special = 2 if special else 0
        self.threads = max(1, int(threads))

    def tokenize(self, b: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """Rank value encode one loader minibatch; returns (tokens (B, L), lengths (B,))."""
        X = b["X"]
        return rank_value_encode(X.crow_indices().numpy(), X.col_indices().numpy(), X.values().numpy(),
                                 b["library_size"].numpy().ravel(), self.axis["medians"], self.axis["token_ids"],
                                 self.max_len, cls_id=self.cls_id, eos_id=self.eos_id, pad_id=self.dicts.pad_id,
                                 threads=self.threads)

    def encode(self, b: dict[str, Any]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        tokens, lengths = self.tokenize(b)
        return {"input_ids": tokens}, lengths

    def finish(self, d: dict[str, Any]) -> dict[str, Any]:
        L = d["input_ids"].shape[1]
        d["attention_mask"] = (torch.arange(L)[None, :] < d["lengths"][:, None]).long()
        return d


def tokenize_anndata(adata, dicts: Dictionaries, name_id: dict[str, str] | None = None, mode: str = "v1",
                     max_len: int | None = None, chunk: int = 4096, n_counts: Sequence[float] | None = None):
    """Rank value encoding of an AnnData of raw counts, as Geneformer's ``TranscriptomeTokenizer``.

    Gene identifiers: ``var["ensembl_id"]`` when present, else ``var_names`` as symbols (whitespace
    stripped) mapped with ``name_id`` (Geneformer's ``gene_name_id_dict``), else ``var_names`` as
    Ensembl ids. Genes outside the vocabulary are dropped; when several columns map to one Ensembl
    id, the first column wins (the others are ignored, as in Geneformer's V1 mapping).

    Parameters
    ----------
    adata : anndata.AnnData
        Raw counts in X (cells x genes).
    dicts : Dictionaries
    name_id : dict, optional
        Symbol -> Ensembl id.
    mode, max_len
        See :func:`mode_settings`.
    chunk : int
        Cells per vectorised call.
    n_counts : sequence of float, optional
        Default ``obs["n_counts"]`` when present, else the sum over all genes of X.

    Returns
    -------
    list of numpy.ndarray of int64
        One token sequence per cell.
    """
    import scipy.sparse as sp

    names = [str(v).strip() for v in adata.var_names]
    if "ensembl_id" in adata.var:
        ids = [str(v) for v in adata.var["ensembl_id"]]
    elif name_id is not None:
        ids = [name_id.get(n, n) for n in names]
    else:
        ids = names
    ok, tok, med = dicts.arrays(ids)
    seen: set[str] = set()
    for i, g in enumerate(ids):  # first occurrence of an id wins
        if ok[i]:
            if g in seen:
                ok[i] = False
            seen.add(g)
    med = np.where(ok, med, np.nan)
    L, special = mode_settings(mode, max_len)
    X = adata.X
    if n_counts is None:
        n_counts = (adata.obs["n_counts"].to_numpy() if "n_counts" in adata.obs
                    else np.asarray(X.sum(axis=1)).ravel())
    n_counts = np.asarray(n_counts, dtype=np.float64)
    out: list[np.ndarray] = []
    for s in range(0, adata.n_obs, chunk):
        m = sp.csr_matrix(X[s:s + chunk])
        t, lens = rank_value_encode(m.indptr, m.indices, m.data, n_counts[s:s + chunk], med, tok, L,
                                    cls_id=dicts.token.get(CLS) if special else None,
                                    eos_id=dicts.token.get(EOS) if special else None, pad_id=dicts.pad_id)
        out.extend(t[i, :lens[i]] for i in range(len(lens)))
    return out
