"""The cells of one manifest split and their per-cell obs fields, as a loader serves them.

:func:`split_cells` reads a manifest (or takes plain joinids) and keeps the split's cells (unique
soma_joinids, ascending); :func:`read_obs_fields` then reads obs for the manifest's rows only, so
that memory follows the manifest, not the store: each obs column becomes int32 codes over
categories shared by every split of the manifest (4 bytes per cell), plus ``total_counts`` and the
mean nonzeros per cell where the loader needs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from atlasmix._ids import unique_ids
from atlasmix.errors import AtlasmixError
from atlasmix.mixing import read_manifest


@dataclass
class SplitCells:
    """One split's cells (:func:`split_cells`) and obs fields (:func:`read_obs_fields`).

    Attributes
    ----------
    all_ids : numpy.ndarray of int64
        Every cell of the manifest (all splits), unique, ascending.
    cells : numpy.ndarray of int64
        The split's cells, unique, ascending.
    manifest_sha256 : str or None
        The manifest file's sha256 (None for a table or plain joinids).
    categories : dict of str to list of str
        Per obs column, the sorted distinct values over *all* the manifest's cells (or the given ones).
    codes : dict of str to numpy.ndarray of int32, shape (len(cells),)
        Per obs column, each cell's category index.
    total_counts : numpy.ndarray of float32 or None
        obs ``total_counts`` of the split's cells (when asked for).
    mean_nnz : float or None
        Mean obs ``n_genes_by_counts`` of the split's cells (when asked for).
    """

    all_ids: np.ndarray
    cells: np.ndarray
    manifest_sha256: str | None = None
    categories: dict[str, list[str]] | None = None
    codes: dict[str, np.ndarray] | None = None
    total_counts: np.ndarray | None = None
    mean_nnz: float | None = None


def split_cells(store, manifest: Any, split: str) -> SplitCells:
    """The manifest's cells and the split's (no obs fields yet).

    Parameters
    ----------
    store : atlasmix.store.Store
    manifest : path, pyarrow.Table or numpy.ndarray
        A manifest ``.parquet`` (read with :func:`atlasmix.mixing.read_manifest`, which refuses a
        manifest of another store or of a changed store state), its table (``soma_joinid``,
        ``split``), or plain cell joinids (then ``split`` is ignored).
    split : str

    Returns
    -------
    SplitCells
    """
    sha = None
    if isinstance(manifest, (str, Path)):
        table, side = read_manifest(manifest, store=store)
        sha = side["manifest"]["sha256"]
        manifest = table
    if isinstance(manifest, pa.Table):
        ids = manifest["soma_joinid"].to_numpy()
        is_split = pc.equal(manifest["split"].cast(pa.string()), split).to_numpy(zero_copy_only=False)
        return SplitCells(unique_ids(ids), unique_ids(ids[is_split]), sha)
    ids = unique_ids(manifest)
    return SplitCells(ids, ids, sha)


def read_obs_fields(store, out: SplitCells, obs_columns: Sequence[str],
                    categories: dict[str, list[str]] | None = None, total_counts: bool = False,
                    mean_nnz: bool = False) -> SplitCells:
    """Fill in a split's obs codes (and the other fields asked for), read for the manifest's rows only.

    Parameters
    ----------
    store : atlasmix.store.Store
    out : SplitCells
        From :func:`split_cells`; its fields are set and it is returned.
    obs_columns : sequence of str
        Columns delivered as codes.
    categories : dict of str to list of str, optional
        Given categories per column (e.g. the training split's for a validation loader).
    total_counts, mean_nnz : bool
        Also read obs ``total_counts`` / the mean ``n_genes_by_counts`` of the split.

    Returns
    -------
    SplitCells

    Raises
    ------
    AtlasmixError
        The manifest names cells that are not (complete) in the store, or a value is not among the
        given categories.
    """
    all_ids, cells = out.all_ids, out.cells
    cols = list(obs_columns) + (["total_counts"] if total_counts else [])
    if mean_nnz:
        cols.append("n_genes_by_counts")
    obs = store.obs(cols, joinids=all_ids)  # the manifest's rows only: memory follows the manifest
    jid = obs["soma_joinid"].to_numpy()
    pos_all = np.searchsorted(jid, all_ids)
    if np.any(pos_all >= len(jid)) or np.any(jid[np.minimum(pos_all, len(jid) - 1)] != all_ids):
        raise AtlasmixError("the manifest names cells that are not (complete) in this store")
    pos = np.searchsorted(jid, cells)
    categories = categories or {}
    out.categories, out.codes = {}, {}
    for c in obs_columns:
        # arrow's dictionary encoding: one O(n) pass, not a sort of n strings (10M cells: seconds)
        enc = pc.dictionary_encode(obs[c], null_encoding="encode").combine_chunks()
        values = enc.dictionary.to_pylist()
        idx = enc.indices.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
        seen = np.bincount(idx[pos_all], minlength=len(values)) > 0
        cats = list(categories.get(c) or sorted(values[i] for i in np.flatnonzero(seen)))
        lut = {v: i for i, v in enumerate(cats)}
        sub = idx[pos]
        here = np.flatnonzero(np.bincount(sub, minlength=len(values)) > 0)
        missing = [values[i] for i in here if values[i] not in lut]
        if missing:
            raise AtlasmixError(f"obs {c} value {missing[0]!r} is not among the given categories")
        code_of = np.full(len(values), -1, dtype=np.int32)
        for i in here:
            code_of[i] = lut[values[i]]
        out.categories[c] = cats
        out.codes[c] = code_of[sub]  # 4 B per cell
    if total_counts:
        out.total_counts = obs["total_counts"].to_numpy()[pos].astype(np.float32)
    if mean_nnz:
        out.mean_nnz = float(np.mean(obs["n_genes_by_counts"].to_numpy()[pos]))
    return out
