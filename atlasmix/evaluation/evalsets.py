"""Eval sets: named cell sets of the store (declared in an eval-set spec) or external files.

Store eval sets
    A TOML file in the mixture-spec format whose ``[eval_sets.NAME]`` tables declare queries over
    obs (e.g. ``examples/mixtures/shared/eval_sets.toml``, the file every mixture there excludes).
    It is resolved with :func:`atlasmix.mixing.resolve` (same seeded draws, so the cells are exactly
    the ones the mixtures kept out of training); each set is its sorted ``soma_joinid`` array.
External eval sets
    An ``.h5ad`` file or a 10x MEX directory (raw counts). Gene identifiers (var index, or
    ``gene_symbols``/``gene_ids`` for MEX) are mapped to Ensembl ids with the ingest's harmonisation
    rules (:func:`atlasmix.ingest.harmonize.harmonize_genes`; duplicates summed). Cell types come
    from an obs column (``cell_type_column``, default ``cell_type``) or, for MEX, a
    ``cell_types.csv`` (barcode, cell_type) in the directory.

Either kind streams its counts aligned to any gene axis given as Ensembl ids
(:meth:`EvalSet.iter_counts`): genes the set lacks are zero-filled, genes the axis lacks are dropped.
:meth:`EvalSet.iter_counts_totals` adds each cell's total counts over all its measured genes
(Geneformer's ``n_counts``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from atlasmix._files import sha256_of
from atlasmix.errors import AtlasmixError

FILE_SUFFIXES = (".h5ad",)


@dataclasses.dataclass
class EvalSet:
    """One eval set.

    Attributes
    ----------
    name : str
    kind : {"store", "file"}
    obs : pandas.DataFrame
        One row per cell, in streaming order: ``cell_id`` (str), ``cell_type`` (str, "unknown" when
        absent), ``dataset_id`` (str), ``soma_joinid`` (int64; -1 for external files).
    feature_ids : numpy.ndarray of str
        The set's own gene axis (Ensembl ids): genes measured in every dataset of a store set, the
        mapped genes of a file.
    store : atlasmix.store.Store or None
    source : str or None
        Path of an external file; ``sha256`` its content hash (as recorded by ingest).
    definition : dict
        Where it was declared (spec path and query, or file path).
    """

    name: str
    kind: str
    obs: pd.DataFrame
    feature_ids: np.ndarray
    store: object = None
    source: str | None = None
    sha256: str | None = None
    definition: dict = dataclasses.field(default_factory=dict)
    _reader: object = None
    _mapping: object = None

    @property
    def n_cells(self) -> int:
        return len(self.obs)

    @property
    def joinids(self) -> np.ndarray:
        return self.obs["soma_joinid"].to_numpy(dtype=np.int64)

    def iter_counts(self, feature_ids, batch_size: int = 2048) -> Iterator[tuple[slice, sp.csr_matrix]]:
        """Stream raw counts aligned to a gene axis.

        Parameters
        ----------
        feature_ids : sequence of str, length n_genes
            Target gene axis (Ensembl ids), e.g. a model's genes.
        batch_size : int
            Cells per batch (memory ~ batch_size x nonzeros per cell; the caller densifies).

        Yields
        ------
        (slice, scipy.sparse.csr_matrix)
            Rows of :attr:`obs` covered, and their counts, float32, shape (batch, n_genes); genes the
            set does not measure are zero.
        """
        for sl, m, _ in self._iter(feature_ids, batch_size, totals=False):
            yield sl, m

    def iter_counts_totals(self, feature_ids, batch_size: int = 2048) -> Iterator[tuple[slice, sp.csr_matrix, np.ndarray]]:
        """:meth:`iter_counts` plus each cell's total counts over *all* its measured genes.

        The totals are Geneformer's ``n_counts`` (the CP10k denominator of rank value encoding):
        obs ``total_counts`` of a store set (the sum over every gene of the source file, recorded
        at ingest), the row sums of the raw source rows (before gene mapping) of a file set.

        Yields
        ------
        (slice, scipy.sparse.csr_matrix, numpy.ndarray of float64)
        """
        yield from self._iter(feature_ids, batch_size, totals=True)

    def _iter(self, feature_ids, batch_size: int, totals: bool):
        target = pd.Index(np.asarray(feature_ids, dtype=object))
        tc = None
        if totals and self.kind == "store":
            o = self.store.obs(["total_counts"]).to_pandas().set_index("soma_joinid")
            tc = o["total_counts"].reindex(self.joinids).to_numpy(dtype=np.float64)
        if self.kind == "store":
            var = self.store.var()
            jid_of = pd.Series(var.index.to_numpy(dtype=np.int64), index=var["feature_id"].to_numpy())
            jid_of = jid_of[~jid_of.index.duplicated()]
            present = target.isin(jid_of.index)
            cols = np.flatnonzero(present)
            vj = jid_of.loc[target[present]].to_numpy(dtype=np.int64)
            ids = self.joinids
            start = 0
            if len(vj) == 0:
                for s in range(0, len(ids), batch_size):
                    n = min(batch_size, len(ids) - s)
                    yield slice(s, s + n), sp.csr_matrix((n, len(target)), dtype=np.float32), \
                        (tc[s:s + n] if tc is not None else None)
                return
            for chunk_ids, m in self.store.iter_X(ids, vj, chunk_size=batch_size):
                n = len(chunk_ids)
                yield slice(start, start + n), _place(m, cols, len(target)), \
                    (tc[start:start + n] if tc is not None else None)
                start += n
            return
        # external file: source genes -> mapped Ensembl ids (summing duplicates) -> target axis
        mp = self._mapping
        src_fid = mp.feature_id
        rows = np.flatnonzero(pd.Index(src_fid).isin(target) & (src_fid != None))  # noqa: E711
        cols = target.get_indexer(src_fid[rows])
        M = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(len(src_fid), len(target)))
        n = self.n_cells
        for s in range(0, n, batch_size):
            idx = np.arange(s, min(n, s + batch_size))
            block = sp.vstack(list(self._reader.iter_rows(idx, batch_size))).tocsr()
            tot = np.asarray(block.sum(axis=1), dtype=np.float64).ravel() if totals else None
            yield slice(s, s + len(idx)), (block.astype(np.float32) @ M).tocsr(), tot


def _place(m: sp.csr_matrix, cols: np.ndarray, width: int) -> sp.csr_matrix:
    """Put the columns of ``m`` at positions ``cols`` of a ``width``-wide CSR (others zero)."""
    if len(cols) == width and np.array_equal(cols, np.arange(width)):
        return m
    m = m.tocoo()
    out = sp.csr_matrix((m.data, (m.row, cols[m.col])), shape=(m.shape[0], width), dtype=np.float32)
    out.sort_indices()
    return out


# ---------------------------------------------------------------------------------------------- store sets
# (`duplicates` pairs the end of this docstring and the first lines below with scgpt's embed_cells:
# numpydoc Raises sections and imports/calls of the same shape, not the same logic.)
def store_eval_sets(spec_path: str | Path, store) -> list[EvalSet]:
    """Resolve the eval sets of a spec file against the store.

    Parameters
    ----------
    spec_path : path
        A TOML spec (mixture-spec format) declaring ``[eval_sets.NAME]`` tables; its components,
        if any, are ignored.
    store : atlasmix.store.Store

    Returns
    -------
    list of EvalSet
        One per declared set (own and those of specs it excludes), sorted by name.

    Raises
    ------
    AtlasmixError
        Bad spec, failing query, or a spec without eval sets.
    """
    from atlasmix.mixing import load_spec, resolve
    from atlasmix.mixing.genes import mixture_genes

    path = Path(spec_path)
    spec = load_spec(path)
    # only the eval sets matter: drop the components so their quotas are not drawn
    spec = spec.model_copy(update={"components": [], "n_cells": None})
    if not spec.eval_sets and not spec.exclude:
        raise AtlasmixError(f"{path} declares no eval sets")
    res = resolve(spec, store, base_dir=path.parent)
    t = res.table.to_pandas()
    t = t[t["split"].astype(str) == "eval"]
    if t.empty:
        raise AtlasmixError(f"{path} declares no eval sets")
    obs = store.obs(["obs_id", "dataset_id", "cell_type"]).to_pandas().set_index("soma_joinid")
    out = []
    reports = {r["name"]: r for r in res.eval_sets}
    for name, grp in t.groupby(t["component"].astype(str), sort=True):
        ids = np.unique(grp["soma_joinid"].to_numpy(dtype=np.int64))
        o = obs.loc[ids]
        df = pd.DataFrame({"cell_id": o["obs_id"].astype(str).to_numpy(),
                           "cell_type": o["cell_type"].astype(str).to_numpy(),
                           "dataset_id": o["dataset_id"].astype(str).to_numpy(),
                           "soma_joinid": ids})
        var = store.var()
        fids = var.loc[mixture_genes(store, ids), "feature_id"].to_numpy(dtype=object)
        rep = reports.get(name, {})
        out.append(EvalSet(name=name, kind="store", obs=df, feature_ids=fids, store=store,
                           definition={"spec": str(path), "defined_in": rep.get("defined_in"),
                                       "query": _query_of(spec, name)}))
    return out


def _query_of(spec, name: str) -> str | None:
    ev = spec.eval_sets.get(name)
    return ev.query_text if ev is not None else None


# ---------------------------------------------------------------------------------------------- file sets
def file_eval_set(path: str | Path, name: str | None = None, cell_type_column: str = "cell_type",
                  organism: str = "human") -> EvalSet:
    """An external h5ad file or 10x MEX directory as an eval set (counts read lazily in batches).

    Parameters
    ----------
    path : path
        ``.h5ad`` (X must be raw counts) or a MEX directory.
    name : str, optional
        Default: the file stem.
    cell_type_column : str
        obs column holding cell types; for MEX, ``cell_types.csv`` in the directory is used.
    organism : str
        Gene table used to map symbols to Ensembl ids.

    Raises
    ------
    AtlasmixError
        Missing or unreadable file, no gene mapped.
    """
    from atlasmix.ingest.harmonize import harmonize_genes
    from atlasmix.ingest.readers import open_reader
    from atlasmix.store.genes import gene_table

    p = Path(path)
    if not p.exists():
        raise AtlasmixError(f"eval set file not found: {p}")
    try:
        reader = open_reader(str(p))
    except AtlasmixError:
        raise
    except Exception as e:
        raise AtlasmixError(f"cannot read {p}: {type(e).__name__}: {e}".splitlines()[0]) from e
    var = reader.var()
    names = var["gene_symbols"] if getattr(reader, "format", "") == "mex" and "gene_symbols" in var else var.index
    mapping = harmonize_genes(list(names), gene_table(organism))
    if not mapping.target_ids:
        raise AtlasmixError(f"{p.name}: no gene identifier maps to an Ensembl id")
    obs = reader.obs()
    ct = None
    if cell_type_column in obs.columns:
        ct = obs[cell_type_column].astype(str).to_numpy()
    elif p.is_dir() and (p / "cell_types.csv").is_file():
        side = pd.read_csv(p / "cell_types.csv", index_col=0, dtype=str)
        ct = side.iloc[:, 0].reindex(obs.index.astype(str)).fillna("unknown").to_numpy()
    nm = name or (p.name[:-len(".h5ad")] if p.name.endswith(".h5ad") else p.name)
    df = pd.DataFrame({"cell_id": obs.index.astype(str).to_numpy(),
                       "cell_type": ct if ct is not None else np.full(len(obs), "unknown", dtype=object),
                       "dataset_id": nm, "soma_joinid": np.full(len(obs), -1, dtype=np.int64)})
    return EvalSet(name=nm, kind="file", obs=df, feature_ids=np.asarray(mapping.target_ids, dtype=object),
                   source=str(p.resolve()), sha256=sha256_of(p), _reader=reader, _mapping=mapping,
                   definition={"file": str(p), "cell_type_column": cell_type_column, "organism": organism,
                               "gene_mapping": {k: v for k, v in mapping.report.items() if k != "unmapped_examples"}})


def load_eval_sets(items, store=None, cell_type_column: str = "cell_type", organism: str = "human") -> list[EvalSet]:
    """Eval sets from CLI-style items: ``SPEC.toml``, ``FILE.h5ad``, ``MEX_DIR`` or ``NAME=PATH``.

    Raises
    ------
    AtlasmixError
        A spec without ``store``, duplicate set names, unknown item.
    """
    out: list[EvalSet] = []
    for it in items:
        it = str(it)
        name = None
        if "=" in it and not Path(it).exists():
            name, it = it.split("=", 1)
        p = Path(it)
        if p.suffix == ".toml":
            if store is None:
                raise AtlasmixError(f"{p} declares store eval sets: give --store")
            sets = store_eval_sets(p, store)
            if name:
                for s in sets:
                    s.name = f"{name}.{s.name}"
            out.extend(sets)
        elif p.suffix in FILE_SUFFIXES or p.is_dir():
            out.append(file_eval_set(p, name, cell_type_column, organism))
        else:
            raise AtlasmixError(f"eval set {it!r}: expected a .toml eval-set spec, an .h5ad file or a MEX directory")
    names = [s.name for s in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise AtlasmixError(f"eval set name {dup[0]!r} is used twice; name them NAME=PATH")
    return out
