"""scFoundation's model input over whole CSR minibatches (a loader transform).

The method (Hao et al. 2024, *Nature Methods* 21:1481; scFoundation's ``model/get_embedding.py``,
single-cell input with ``pre_normalized='F'``, and ``model/load.py``, ``gatherData``), for each cell:

1. the cell on scFoundation's gene axis (19,264 genes, ``OS_scRNA_gene_index.19264.tsv``; genes the
   data lack are zero: ``main_gene_selection``);
2. values ``log1p(count / total * 1e4)``, the library size ``total`` summed over that axis;
3. two total-count tokens appended at positions 19,264 and 19,265: **T** (the target depth) and
   **S** = ``log10(total)`` (the depth of the input). T follows ``get_embedding.py``'s
   ``--tgthighres``: ``"t<x>"`` -> ``x``, ``"f<x>"`` -> ``log10(total * x)``, ``"a<x>"`` ->
   ``log10(total) + x``; default ``"t4"`` as there. With read-depth-aware (RDA) downsampling
   (:mod:`atlasmix.training.rda`) the input is the downsampled cell, S its depth and T the
   *original* depth ``log10(original total)``, as in the paper's pretraining;
4. the encoder sees only the nonzero values and T, S (``gatherData``: ``value > 0``), padded per
   batch; each carries its gene position (``data_gene_ids = arange(19266)``).

:func:`scfoundation_input` returns that gathered form -- ``values`` (B, L) float32, ``gene_ids``
(B, L) int32, ``padding`` (B, L) bool, L = the most nonzeros of a cell + 2 -- and, on request, the
dense (B, 19,266) vector. Differences from the repository's code: the gathered tokens of a cell come
in the loader's column order, not sorted by position (the encoder is a transformer whose tokens
carry their gene embedding and no sequence position, so the order does not change its output);
padded slots hold value 0 and gene id ``n_genes + 2`` and are flagged by ``padding`` (scFoundation
fills both with its config's ``pad_token_id``); a cell without counts on the axis gets S = 0 and T =
the ``t`` target or 0 for ``f`` / ``a`` (``log10(0)`` there). scFoundation's pretraining code is not public, so only the input is built here.

:func:`scfoundation_input` is one compiled (numba) pass per cell without the GIL, in threads;
:func:`scfoundation_input_reference` is the straightforward per-cell numpy version of
``get_embedding.py``'s steps, kept for tests and the benchmark.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from numba import njit

from atlasmix.errors import AtlasmixError
from atlasmix.training._cells import mark_whole_counts, run_in_chunks

TARGET_SUM = 1e4
#: Whole counts below this get their value from a per-cell table (one log1p per distinct count).
LUT_SIZE = 256
#: ``get_embedding.py``'s default ``--tgthighres``.
TGTHIGHRES = "t4"


def parse_tgthighres(spec: str) -> tuple[int, float]:
    """``(mode, x)`` of a ``--tgthighres`` string: mode 0 ``t``, 1 ``f``, 2 ``a``.

    Raises
    ------
    AtlasmixError
        Not ``t``/``f``/``a`` followed by a number (``f`` needs a positive one).
    """
    try:
        mode, x = "tfa".index(spec[0]), float(spec[1:])
    except (IndexError, ValueError):
        raise AtlasmixError(f"tgthighres must be t<x>, f<x> or a<x> (e.g. t4, f1, a0), got {spec!r}") from None
    if mode == 1 and not x > 0:
        raise AtlasmixError(f"tgthighres f<x> needs x > 0, got {spec!r}")
    return mode, x


@njit(cache=True, nogil=True)
def _scf_cells(r0, r1, indptr, indices, data, position, n_genes, target_sum, mode, tgt, original, starts, pad_to,
               values, gene_ids, padding, dense, want_dense):
    lut = np.zeros(LUT_SIZE)
    seen = np.zeros(LUT_SIZE, dtype=np.bool_)
    for i in range(r0, r1):
        a, b = indptr[i], indptr[i + 1]
        if want_dense:
            dense[i, :] = 0.0
        o = starts[i]
        # whole counts below LUT_SIZE (nearly all of a cell's): one log1p per distinct count, then a
        # plain gather; other values (and explicit zeros) one by one
        total, small = mark_whole_counts(data, a, b, seen, LUT_SIZE)
        for w in range(1, LUT_SIZE):
            if seen[w]:
                lut[w] = np.log1p(float(w) / total * target_sum)
                seen[w] = False
        n = 0
        if small:
            for k in range(a, b):
                values[o + n] = lut[int(data[k])]
                gene_ids[o + n] = position[indices[k]]
                n += 1
        else:
            for k in range(a, b):
                c = float(data[k])
                if c > 0:
                    w = int(c)
                    values[o + n] = lut[w] if w < LUT_SIZE and w == c else np.log1p(c / total * target_sum)
                    gene_ids[o + n] = position[indices[k]]
                    n += 1
        if want_dense:
            for j in range(n):
                dense[i, gene_ids[o + j]] = values[o + j]
        s = np.log10(total) if total > 0 else 0.0
        if original[i] >= 0:  # RDA: T is the depth before downsampling
            t = np.log10(original[i]) if original[i] > 0 else 0.0
        elif mode == 0:
            t = tgt
        elif mode == 1:
            t = np.log10(total * tgt) if total > 0 else 0.0
        else:
            t = np.log10(total) + tgt if total > 0 else 0.0
        values[o + n], gene_ids[o + n] = t, n_genes
        values[o + n + 1], gene_ids[o + n + 1] = s, n_genes + 1
        if pad_to > 0:
            padding[o:o + n + 2] = False
            values[o + n + 2:o + pad_to] = 0.0
            gene_ids[o + n + 2:o + pad_to] = n_genes + 2
            padding[o + n + 2:o + pad_to] = True
        if want_dense:
            dense[i, n_genes] = t
            dense[i, n_genes + 1] = s


def scfoundation_input(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, position: np.ndarray,
                       n_genes: int, *, tgthighres: str = TGTHIGHRES, original_totals: np.ndarray | None = None,
                       threads: int = 1, dense: bool = False, layout: str = "padded") -> dict[str, np.ndarray]:
    """scFoundation's input of a CSR batch of raw counts (module doc), one compiled pass.

    Parameters
    ----------
    indptr, indices, data : numpy.ndarray
        CSR of the batch, shape (B + 1,), (nnz,), (nnz,); column ``j`` is model gene ``position[j]``.
    position : numpy.ndarray of int64, shape (G,)
        :func:`atlasmix.training.gene_lists.model_axis` ``["position"]``.
    n_genes : int
        Length of the model's axis (19,264 for the published model).
    tgthighres : str
        The target depth T (module doc), ignored for cells with an original total.
    original_totals : numpy.ndarray of float64, shape (B,), optional
        Each cell's library size before RDA downsampling (-1: not downsampled); then T is its log10.
    threads : int
    dense : bool
        Also return the dense vector.
    layout : {"padded", "packed"}
        ``padded``: ``gatherData``'s (B, L) tensors. ``packed``: the cells' tokens back to back
        (N = nonzeros + 2 B) with ``offsets`` (B + 1,) -- FlashAttention's variable-length
        ``cu_seqlens`` form, without the padding a batch's longest cell forces on every cell
        (PBMCs: 3.6x the tokens); :func:`pad_packed` pads it on the model's device.

    Returns
    -------
    dict
        padded: ``values`` float32 (B, L), ``gene_ids`` int32 (B, L), ``padding`` bool (B, L) with
        ``L = max nonzeros + 2``; packed: ``values`` float32 (N,), ``gene_ids`` int32 (N,),
        ``offsets`` int64 (B + 1,); ``dense`` float32 (B, n_genes + 2) if asked.

    Raises
    ------
    AtlasmixError
        A bad ``tgthighres`` or ``layout``.
    """
    mode, x = parse_tgthighres(tgthighres)
    if layout not in ("padded", "packed"):
        raise AtlasmixError(f"layout must be 'padded' or 'packed', got {layout!r}")
    indptr = np.asarray(indptr, dtype=np.int64)
    data = np.asarray(data)
    B = len(indptr) - 1
    if len(data) and data.min() > 0:  # the loader's CSR holds no explicit zeros
        per_cell = np.diff(indptr)
    else:
        cs = np.concatenate([[0], np.cumsum(data > 0)])
        per_cell = cs[indptr[1:]] - cs[indptr[:-1]]
    if layout == "padded":
        L = int(per_cell.max(initial=0)) + 2
        starts = np.arange(B, dtype=np.int64) * L
        size, pad_to = B * L, L
    else:
        offsets = np.concatenate([[0], np.cumsum(per_cell + 2)]).astype(np.int64)
        starts, size, pad_to = offsets[:-1], int(offsets[-1]), 0
    values = np.empty(size, dtype=np.float32)
    gene_ids = np.empty(size, dtype=np.int32)
    padding = np.empty(size if layout == "padded" else 1, dtype=np.bool_)
    dense_out = np.empty((B if dense else 1, int(n_genes) + 2), dtype=np.float32)
    orig = (np.full(B, -1.0) if original_totals is None else np.asarray(original_totals, dtype=np.float64))
    args = (indptr, np.asarray(indices), data, np.asarray(position, dtype=np.int64), int(n_genes),
            float(TARGET_SUM), mode, float(x), orig, starts, pad_to, values, gene_ids, padding, dense_out,
            bool(dense))
    run_in_chunks(lambda a, b: _scf_cells(a, b, *args), indptr, threads)
    if layout == "padded":
        out = {"values": values.reshape(B, L), "gene_ids": gene_ids.reshape(B, L), "padding": padding.reshape(B, L)}
    else:
        out = {"values": values, "gene_ids": gene_ids, "offsets": offsets}
    if dense:
        out["dense"] = dense_out
    return out


def pad_packed(values: torch.Tensor, gene_ids: torch.Tensor, offsets: torch.Tensor, n_genes: int) -> dict:
    """The padded (``gatherData``) form of a packed batch, built on the tensors' device.

    Parameters
    ----------
    values : torch.Tensor, float32 (N,)
    gene_ids : torch.Tensor, int32 (N,)
    offsets : torch.Tensor, int64 (B + 1,)
    n_genes : int

    Returns
    -------
    dict
        ``values`` (B, L), ``gene_ids`` (B, L) (pad: ``n_genes + 2``), ``padding`` bool (B, L).
    """
    lengths = offsets[1:] - offsets[:-1]
    B, L = len(lengths), int(lengths.max()) if len(lengths) else 0
    row = torch.repeat_interleave(torch.arange(B, device=values.device), lengths)
    col = torch.arange(len(values), device=values.device) - offsets[:-1][row]
    v = torch.zeros((B, L), dtype=values.dtype, device=values.device)
    g = torch.full((B, L), n_genes + 2, dtype=gene_ids.dtype, device=values.device)
    pad = torch.ones((B, L), dtype=torch.bool, device=values.device)
    v[row, col], g[row, col], pad[row, col] = values, gene_ids, False
    return {"values": v, "gene_ids": g, "padding": pad}


def scfoundation_input_reference(X, position: np.ndarray, n_genes: int, *, tgthighres: str = TGTHIGHRES,
                                 original_totals: np.ndarray | None = None) -> dict[str, list]:
    """The straightforward per-cell numpy version of ``get_embedding.py``'s single-cell steps
    (dense cell on the axis, log1p(CP10k), T and S, then the values > 0); tests and benchmarks.

    Returns
    -------
    dict
        ``dense``: list of float64 (n_genes + 2,) arrays; ``values`` / ``gene_ids``: the gathered
        nonzeros and T, S of each cell, in position order.
    """
    mode, x = parse_tgthighres(tgthighres)
    X = X.tocsr()
    out: dict[str, list] = {"dense": [], "values": [], "gene_ids": []}
    for i in range(X.shape[0]):
        row = X[i]
        full = np.zeros(n_genes)
        full[position[row.indices]] = row.data
        total = full.sum()
        tmp = np.log1p(full / total * TARGET_SUM) if total > 0 else full
        s = np.log10(total) if total > 0 else 0.0
        if original_totals is not None and original_totals[i] >= 0:
            t = np.log10(original_totals[i]) if original_totals[i] > 0 else 0.0
        elif total <= 0:
            t = x if mode == 0 else 0.0
        else:
            t = [x, np.log10(total * x), np.log10(total) + x][mode]
        vec = np.concatenate([tmp, [t, s]])
        keep = np.flatnonzero(vec[:n_genes] > 0)
        out["dense"].append(vec)
        out["values"].append(np.concatenate([vec[keep], [t, s]]))
        out["gene_ids"].append(np.concatenate([keep, [n_genes, n_genes + 1]]))
    return out


class ScFoundationEncoder:
    """A transform of the loader's sparse minibatches into scFoundation's gathered input.

    Parameters
    ----------
    axis : dict
        :func:`atlasmix.training.gene_lists.model_axis` over scFoundation's gene list (the loader's
        gene axis must be ``axis["var_joinids"]``).
    tgthighres, threads, dense, layout
        As :func:`scfoundation_input`.

    Notes
    -----
    Call it on a sparse :class:`~atlasmix.training.loader.MixtureLoader` batch (``X`` raw counts),
    optionally after :class:`atlasmix.training.rda.ReadDepthAugment` (its ``original_total`` then
    sets T). Returns torch tensors ``values``, ``gene_ids``, ``padding`` (packed: ``offsets``;
    and ``dense``) and ``soma_joinid``.
    """

    def __init__(self, axis: dict[str, Any], *, tgthighres: str = TGTHIGHRES, threads: int = 1,
                 dense: bool = False, layout: str = "padded"):
        parse_tgthighres(tgthighres)
        if layout not in ("padded", "packed"):
            raise AtlasmixError(f"layout must be 'padded' or 'packed', got {layout!r}")
        self.layout = layout
        self.position = np.asarray(axis["position"], dtype=np.int64)
        self.n_genes = int(axis["n_genes"])
        self.tgthighres, self.threads, self.dense = tgthighres, int(threads), bool(dense)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        X = batch["X"]
        orig = batch.get("original_total")
        out = scfoundation_input(X.crow_indices().numpy(), X.col_indices().numpy(), X.values().numpy(),
                                 self.position, self.n_genes, tgthighres=self.tgthighres,
                                 original_totals=None if orig is None else orig.numpy(), threads=self.threads,
                                 dense=self.dense, layout=self.layout)
        res = {k: torch.from_numpy(v) for k, v in out.items()}
        res["soma_joinid"] = batch["soma_joinid"]
        return res
