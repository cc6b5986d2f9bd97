"""Resolve a mixture spec against a store: queries -> exact, seeded cell sets.

Tables a query can use (duckdb, read-only, no file or network access)
--------------------------------------------------------------------
``obs``
    One row per visible cell (complete datasets only): ``soma_joinid`` and every store obs column
    (``obs_id, dataset_id, assay, organism, tissue, tissue_general, cell_type, disease, is_malignant,
    perturbation, development_stage, donor_id, total_counts, n_genes_by_counts, pct_counts_mt,
    qc_pass``) plus the catalog's dataset columns, joined on ``dataset_id``: ``dataset_joinid``,
    ``title``, ``citation``, ``source_format``, ``dataset_organism``, ``dataset_n_cells``,
    ``n_genes_measured``, ``ingest_time``. Only the columns a spec names are read from the store.
``datasets``
    The catalog of complete datasets (``dataset_joinid``, ``dataset_id``, ``title``, ``organism``,
    ``n_cells``, ``source_format``, ``provenance``, ...), for sub-queries.
``extra_<dataset_id>``
    The dataset's side table of other source obs columns (``soma_joinid`` + the source's columns,
    e.g. ``extra_scmageck_crispr."target.gene"``), loaded only when a query names it. Use it in a
    ``sql`` join or a ``where`` sub-query::

        where = "soma_joinid IN (SELECT soma_joinid FROM extra_pbmc3k WHERE seurat_clusters = '3')"

Queries run through :func:`atlasmix.store.query.safe_connection` (no file or network access,
configuration locked) after :func:`atlasmix.store.query.check_sql`; functions whose value changes
between runs (``random()``, ``uuid()``, ``now()``...) are refused too, so that a spec always
resolves to the same cells.

Order of resolution
-------------------
1. Eval sets (this spec's and those of excluded spec files) are drawn from the cells their queries
   match.
2. Excluded cells: eval cells, every cell of excluded specs (resolved recursively, exactly as they
   resolve alone) and of excluded manifests.
3. Components without ``weight`` in spec order, then weighted components in spec order. A
   component's pool is the cells its query matches minus excluded cells and cells drawn by the
   components before it (so components never share a cell). ``fraction`` is relative to that pool;
   weighted components share the total ``n_cells`` left after the others.
4. Each component's cells are split into train / validation (``validation_fraction``, seeded).

Training + validation cells are then checked to be disjoint from every eval set (an internal
assertion; the result is recorded in the manifest sidecar).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from atlasmix.errors import AtlasmixError
from atlasmix.mixing import sampling
from atlasmix.mixing.spec import MixtureSpec, Selection, SketchOptions, SpecError, canonical_json, load_spec
from atlasmix.store import schema as S
from atlasmix.store.query import check_sql, run_bounded, safe_connection

#: Store obs columns a query can name.
OBS_COLUMNS: tuple[str, ...] = tuple(f.name for f in S.OBS_SCHEMA)
#: Catalog columns added to the ``obs`` view: name in obs -> catalog column.
CATALOG_IN_OBS: dict[str, str] = {
    "dataset_joinid": "dataset_joinid", "title": "title", "citation": "citation",
    "source_format": "source_format", "dataset_organism": "organism", "dataset_n_cells": "n_cells",
    "n_genes_measured": "n_genes_measured", "ingest_time": "ingest_time",
}
SPLITS = ("train", "validation", "eval")
_SELECT_START = re.compile(r"^\s*(\(\s*)*(SELECT|WITH|FROM|VALUES)\b", re.IGNORECASE)
#: Functions whose value changes between runs: a spec using them could not resolve reproducibly.

# ---------------------------------------------------------------------------------------------- spec tree
@dataclasses.dataclass
class _Node:
    spec: MixtureSpec
    path: Path | None
    base_dir: Path
    children: list[tuple[int, "_Node"]]  # (index in exclude, excluded spec)
    manifests: list[tuple[int, Path]]  # (index in exclude, excluded manifest)
    inline_excludes: list[tuple[int, str]]

    def where(self) -> str:
        return self.path.name if self.path else self.spec.name


def _build_tree(spec: MixtureSpec, path: Path | None, base_dir: Path, stack: tuple[Path, ...],
                cache: dict[Path, _Node]) -> _Node:
    node = _Node(spec, path, base_dir, [], [], [])
    for i, item in enumerate(spec.exclude):
        label = f"exclude[{i}]"
        if item in spec.eval_sets:
            node.inline_excludes.append((i, item))
            continue
        if item.endswith(".toml"):
            p = (base_dir / item).resolve()
            if p in stack or (path is not None and p == path.resolve()):
                chain = " -> ".join(x.name for x in (*stack, p))
                raise SpecError(f"bad spec {node.where()}: {label}: circular exclusion {chain}")
            if p not in cache:
                if not p.is_file():
                    raise SpecError(f"bad spec {node.where()}: {label}: spec file not found: {p}")
                child_spec = load_spec(p)
                cache[p] = _build_tree(child_spec, p, p.parent, (*stack, p), cache)
            node.children.append((i, cache[p]))
        elif item.endswith(".parquet"):
            p = (base_dir / item).resolve()
            if not p.is_file():
                raise SpecError(f"bad spec {node.where()}: {label}: manifest not found: {p}")
            node.manifests.append((i, p))
        else:
            raise SpecError(f"bad spec {node.where()}: {label}: {item!r} is neither an eval set of this spec "
                            f"({', '.join(spec.eval_sets) or 'none declared'}) nor a .toml spec or .parquet manifest")
    return node


def _all_nodes(node: _Node, seen: set[int] | None = None) -> list[_Node]:
    seen = set() if seen is None else seen
    if id(node) in seen:
        return []
    seen.add(id(node))
    out = [node]
    for _, c in node.children:
        out += _all_nodes(c, seen)
    return out


def _selections(spec: MixtureSpec) -> list[tuple[str, Selection]]:
    out: list[tuple[str, Selection]] = [(f"eval_sets.{k}", v) for k, v in spec.eval_sets.items()]
    out += [(f"components[{i}]", c) for i, c in enumerate(spec.components)]
    return out


# ---------------------------------------------------------------------------------------------- obs context
def _index_in(col: pa.ChunkedArray, value_set: pa.Array) -> pa.ChunkedArray:
    """``pc.index_in`` that works on dictionary (enumeration) columns without decoding them."""
    if pa.types.is_dictionary(col.type):
        vs = value_set.cast(col.type.value_type)
        return pa.chunked_array([pc.index_in(ch.dictionary, value_set=vs).take(ch.indices) for ch in col.chunks],
                                type=pa.int32())
    return pc.index_in(col, value_set=value_set.cast(col.type))


class ObsContext:
    """duckdb connection over the obs columns a resolution needs.

    Parameters
    ----------
    obs : pyarrow.Table
        ``soma_joinid`` (int64) plus obs columns (any order of rows), visible cells only.
    catalog : pandas.DataFrame
        The store catalog (:meth:`atlasmix.store.Store.catalog`, complete datasets).
    store : atlasmix.store.Store, optional
        Needed for ``geometric_sketch`` (streams X) and ``extra_<dataset_id>`` side tables.
    identity : dict, optional
        Store identity recorded in the manifest (default: ``store.identity()``).
    catalog_columns : list of str, optional
        Catalog columns (:data:`CATALOG_IN_OBS`) to add to ``obs`` (default: all).
    """

    def __init__(self, obs: pa.Table, catalog: pd.DataFrame, store=None, identity: dict | None = None,
                 catalog_columns: list[str] | None = None):
        self.store = store
        self.identity = identity if identity is not None else (store.identity() if store is not None else
                                                               {"store_id": "", "uri": "", "n_cells": obs.num_rows,
                                                                "state_hash": ""})
        self.catalog = catalog
        jid = obs["soma_joinid"].to_numpy()
        self.max_joinid = int(jid.max()) if len(jid) else -1
        ds = catalog.reset_index().rename(columns={"soma_joinid": "dataset_joinid"})
        ds_table = pa.Table.from_pandas(ds, preserve_index=False)
        # catalog columns become real obs columns once (a lookup by dataset_id), not a join per query
        want = list(CATALOG_IN_OBS) if catalog_columns is None else [c for c in CATALOG_IN_OBS if c in catalog_columns]
        want = [c for c in want if c not in obs.column_names]
        if want and "dataset_id" in obs.column_names and obs.num_rows:
            idx = _index_in(obs["dataset_id"], ds_table["dataset_id"])
            for c in want:
                obs = obs.append_column(c, ds_table[CATALOG_IN_OBS[c]].take(idx))
        self.obs = obs
        self.con = safe_connection()
        self.con.register("_obs_core", obs)
        self.con.register("_datasets", ds_table)
        self.con.execute("CREATE VIEW datasets AS SELECT * FROM _datasets")
        self.con.execute("CREATE VIEW obs AS SELECT * FROM _obs_core")
        self._extra_loaded: set[str] = set()
        self._row_of: np.ndarray | None = None

    @classmethod
    def from_store(cls, store, texts: list[str], columns: list[str]) -> "ObsContext":
        """Read only the obs columns named in ``texts`` (SQL) or ``columns``, plus dataset_id and cell_type.

        Catalog columns (:data:`CATALOG_IN_OBS`) are added only when named.
        """
        ident = store.identity()
        need = set(columns) | {"dataset_id", "cell_type"}
        blob = "\n".join(texts)
        need |= {c for c in OBS_COLUMNS if re.search(rf"\b{c}\b", blob, re.IGNORECASE)}
        cols = [c for c in OBS_COLUMNS if c in need]
        cat_cols = [c for c in CATALOG_IN_OBS if c in columns or re.search(rf"\b{c}\b", blob, re.IGNORECASE)]
        obs = read_obs(store, cols)
        return cls(obs, store.catalog(), store, ident, catalog_columns=cat_cols)

    def close(self) -> None:
        self.con.close()

    def load_extras(self, text: str) -> None:
        """Register ``extra_<dataset_id>`` side tables named in ``text`` (once each)."""
        if self.store is None:
            return
        for did in self.catalog["dataset_id"]:
            name = f"extra_{did}"
            if name in self._extra_loaded or not re.search(rf"(?<![\w]){re.escape(name)}(?![\w\-.])", text,
                                                           re.IGNORECASE):
                continue
            df = self.store.obs_extra(did).reset_index()
            if "soma_joinid" not in df.columns:
                df["soma_joinid"] = pd.Series(dtype="int64")
            self.con.register(f"_{name}", pa.Table.from_pandas(df, preserve_index=False))
            self.con.execute(f'CREATE VIEW "{name}" AS SELECT * FROM "_{name}"')
            self._extra_loaded.add(name)

    def query(self, sel: Selection, label: str, columns: list[str] = ()) -> pa.Table:
        """Cells matching ``sel`` (``soma_joinid`` + ``columns``), distinct, visible cells only.

        Raises
        ------
        AtlasmixError
            Refused SQL, a duckdb error (unknown column, syntax), or a query returning ids that are not
            cells of the store.
        """
        key = "where" if sel.where is not None else "sql"
        text = sel.query_text.strip()
        if key == "sql":
            text = re.sub(r";\s*$", "", text)
        check_sql(text, f"{label}.{key}")
        if key == "sql" and not _SELECT_START.match(text):
            raise AtlasmixError(f"refused {label}.sql: must be a SELECT query returning soma_joinid")
        self.load_extras(text)
        extra = "".join(f', o."{c}"' for c in columns)
        if key == "where":
            q = f"SELECT o.soma_joinid{extra} FROM obs o WHERE ({text}\n)"  # \n: a trailing -- comment ends
        else:
            q = (f"SELECT o.soma_joinid{extra} FROM obs o SEMI JOIN ({text}\n) AS _q "
                 "ON o.soma_joinid = _q.soma_joinid")
        try:
            if key == "sql":
                outside = run_bounded(self.con, lambda: self.con.execute(
                    f"SELECT count(*) FROM (SELECT DISTINCT soma_joinid FROM ({text}\n) AS _q) "
                    "AS _q2 ANTI JOIN obs ON obs.soma_joinid = _q2.soma_joinid").fetchall()[0][0], f"{label}.{key}")
                if outside:
                    raise AtlasmixError(f"{label}.sql returns {outside:,} soma_joinids that are not visible cells "
                                        "of the store")
            return run_bounded(self.con, lambda: self.con.sql(q).to_arrow_table(), f"{label}.{key}")
        except duckdb.Error as e:
            msg = str(e).splitlines()[0]
            if key == "sql" and "soma_joinid" in msg:
                msg += " (a sql query must return a column soma_joinid)"
            raise AtlasmixError(f"{label}.{key}: {msg}") from None

    def columns(self) -> list[str]:
        """Columns of the ``obs`` view."""
        return [r[0] for r in self.con.execute("DESCRIBE obs").fetchall()]

    def row_of(self) -> np.ndarray:
        """Row of each soma_joinid in :attr:`obs`, shape (max_joinid + 1,), int32/int64 (-1: not a visible cell)."""
        if self._row_of is None:
            jid = self.obs["soma_joinid"].to_numpy()
            dt = np.int32 if len(jid) < 2**31 else np.int64
            r = np.full(self.max_joinid + 1, -1, dtype=dt)
            r[jid] = np.arange(len(jid), dtype=dt)
            self._row_of = r
        return self._row_of


def read_obs(store, columns: list[str]) -> pa.Table:
    """obs columns of visible cells, one ranged read per complete dataset, *not* sorted.

    Like :meth:`atlasmix.store.Store.obs` but without its final sort (resolution does not need
    sorted obs, and sorting 10M rows costs more than reading them).

    Returns
    -------
    pyarrow.Table
        ``soma_joinid`` (int64) and ``columns``.
    """
    import tiledbsoma as soma

    cols = ["soma_joinid"] + [c for c in columns if c != "soma_joinid"]
    parts = []
    with soma.DataFrame.open(f"{store.uri}/obs", "r", context=store.context) as df:
        schema = pa.schema([df.schema.field(c) for c in cols])
        for start, end in store.complete_ranges():
            if end > start:
                parts.append(df.read(coords=[slice(int(start), int(end) - 1)], column_names=cols).concat())
    if not parts:
        return pa.Table.from_pylist([], schema=schema)
    return pa.concat_tables(parts)


# ---------------------------------------------------------------------------------------------- results
@dataclasses.dataclass
class Resolution:
    """A resolved mixture (before it is written; see :func:`atlasmix.mixing.manifest.write_manifest`).

    Attributes
    ----------
    spec : MixtureSpec
    spec_path : str or None
    spec_hash : str
        sha256 over the canonical spec and the hashes of everything it excludes.
    table : pyarrow.Table
        The manifest: ``soma_joinid`` int64, ``component`` and ``split`` (``train``, ``validation``,
        ``eval``) dictionary-encoded strings, sorted by (soma_joinid, split, component).
    components, eval_sets, excluded : list of dict
        Per-component / eval-set / exclusion reports.
    composition : list of dict
        ``component``, ``split``, ``dataset_id``, ``cell_type``, ``n_cells`` rows.
    disjointness : dict
        The train+validation vs eval check (``disjoint`` true, counts, a sentence); with a store also
        ``copies``: cells held twice under different soma_joinids by count fingerprint
        (``n_train_validation_repeats``, ``n_eval_cells_copied_in_training``, ``copied_from``,
        ``unchecked_datasets``), a warning appended to the sentence when there are any.
    store : dict
        Store identity at resolution time.
    counts : dict
        Rows per split (``train``, ``validation``, ``eval``).
    """

    spec: MixtureSpec
    spec_path: str | None
    spec_hash: str
    table: pa.Table
    components: list[dict]
    eval_sets: list[dict]
    excluded: list[dict]
    composition: list[dict]
    disjointness: dict
    store: dict
    counts: dict


@dataclasses.dataclass
class _Resolved:  # internal, per spec node
    spec_hash: str
    components: dict[str, dict[str, np.ndarray]]  # name -> {"train":, "validation":}
    component_reports: list[dict]
    eval_sets: dict[str, np.ndarray]
    eval_reports: dict[str, dict]
    eval_origin: dict[str, str]
    excluded_reports: list[dict]

    def all_cells(self) -> np.ndarray:
        parts = [a for d in self.components.values() for a in d.values()] + list(self.eval_sets.values())
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


class _Resolver:
    def __init__(self, ctx: ObsContext, root: _Node):
        self.ctx = ctx
        self.root = root
        self.done: dict[int, _Resolved] = {}

    # ------------------------------------------------------------------ drawing
    def _labels(self, t: pa.Table, cols: list[str]) -> np.ndarray:
        codes = []
        for c in cols:
            arr = t[c].combine_chunks()
            enc = pc.dictionary_encode(arr.cast(pa.large_string()) if not pa.types.is_string(arr.type)
                                       and not pa.types.is_large_string(arr.type) else arr)
            idx = enc.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
            # rank codes by value so groups do not depend on row order
            dict_vals = enc.dictionary.to_pylist()
            rank = np.argsort(np.argsort(np.array([str(v) for v in dict_vals], dtype=object), kind="stable"))
            codes.append(np.where(idx < 0, -1, rank[np.maximum(idx, 0)] if len(rank) else -1))
        if len(codes) == 1:
            return codes[0]
        _, inv = np.unique(np.stack(codes, axis=1), axis=0, return_inverse=True)
        return inv.ravel()

    def _draw(self, sel: Selection, label: str, name: str, pool: np.ndarray, labels: np.ndarray | None,
              n: int, seed: int, purpose: str) -> np.ndarray:
        key = sampling.derive_key(seed, purpose, name)
        if n >= len(pool):
            return np.sort(pool)
        if sel.strategy == "random":
            return sampling.bottom_k(pool, n, key)
        if sel.strategy == "balanced":
            assert labels is not None
            groups, inv, sizes = np.unique(labels, return_inverse=True, return_counts=True)
            quota = sampling.balanced_quota(sizes, n, sampling.rng(seed, purpose, name, "balance"))
            keys = sampling.priority_keys(pool, key)
            order = np.lexsort((keys, inv))
            g_sorted = inv[order]
            starts = np.searchsorted(g_sorted, np.arange(len(groups)))
            rank = np.arange(len(order)) - starts[g_sorted]
            take = order[rank < quota[g_sorted]]
            return np.sort(pool[take])
        # geometric_sketch
        store = self.ctx.store
        if store is None:
            raise AtlasmixError(f"{label}.strategy: geometric_sketch needs a store to stream X from")
        from atlasmix.mixing.sketch import geometric_sketch, streamed_pca

        opts = sel.sketch or SketchOptions()
        cells = np.sort(pool)
        var_ids = store.var().index.to_numpy(dtype=np.int64)
        scores = streamed_pca(store.iter_X, cells, var_ids, n_pcs=opts.n_pcs, n_top_genes=opts.n_top_genes,
                              chunk_size=opts.chunk_size)
        gseed = int(sampling.rng(seed, purpose, name, "geosketch").integers(0, 2**32 - 1))
        return cells[geometric_sketch(scores, n, gseed)]

    def _pool(self, sel: Selection, label: str, blocked: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None, int]:
        cols = sel.balance_columns
        if cols:
            have = set(self.ctx.columns())
            for c in cols:
                if c not in have:
                    raise AtlasmixError(f"{label}.balance_by: no column {c!r} in obs")
        t = self.ctx.query(sel, label, cols)
        ids = t["soma_joinid"].to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        n_match = len(ids)
        labels = self._labels(t, cols) if cols else None
        if blocked is not None and len(ids):
            keep = ~blocked[ids]
            ids = ids[keep]
            if labels is not None:
                labels = labels[keep]
        return ids, labels, n_match

    # ------------------------------------------------------------------ one spec
    def resolve(self, node: _Node) -> _Resolved:
        if id(node) in self.done:
            return self.done[id(node)]
        spec = node.spec
        ctx = self.ctx
        blocked = np.zeros(ctx.max_joinid + 1, dtype=bool)
        excluded_reports: list[dict] = []
        eval_sets: dict[str, np.ndarray] = {}
        eval_reports: dict[str, dict] = {}
        eval_origin: dict[str, str] = {}
        dep_hashes: list[Any] = []
        pre = "" if node is self.root else f"{node.where()}: "  # errors in excluded specs name their file

        # 1. eval sets: own, then those of excluded spec files
        for name, ev in spec.eval_sets.items():
            label = f"{pre}eval_sets.{name}"
            pool, labels, n_match = self._pool(ev, label, None)
            n, short = self._quota_fixed(ev, len(pool), label, name, n_match, node)
            cells = self._draw(ev, label, name, pool, labels, n, spec.seed, "eval")
            eval_sets[name] = cells
            eval_reports[name] = {"name": name, "defined_in": node.where(), "strategy": ev.strategy,
                                  "requested": _requested(ev), "n_matching": int(n_match), "n_cells": int(len(cells)),
                                  "took_all_short": short}
            eval_origin[name] = node.where()
        for i, child in node.children:
            sub = self.resolve(child)
            dep_hashes.append({"exclude": spec.exclude[i], "spec_hash": sub.spec_hash})
            cells = sub.all_cells()
            blocked[cells[cells <= ctx.max_joinid]] = True
            excluded_reports.append({"exclude": spec.exclude[i], "kind": "spec", "name": child.spec.name,
                                     "spec_hash": sub.spec_hash, "n_cells": int(len(np.unique(cells))),
                                     "eval_sets": sorted(sub.eval_sets)})
            for name, cells_e in sub.eval_sets.items():
                if name in eval_sets:
                    if not np.array_equal(eval_sets[name], cells_e):
                        raise AtlasmixError(f"{node.where()}: exclude[{i}]: eval set {name!r} of {spec.exclude[i]} "
                                            f"differs from the eval set {name!r} of {eval_origin[name]}; rename one")
                    continue
                eval_sets[name] = cells_e
                eval_reports[name] = dict(sub.eval_reports[name])
                eval_origin[name] = sub.eval_origin[name]
        for i, p in node.manifests:
            from atlasmix.mixing.manifest import read_manifest_cells

            cells, info = read_manifest_cells(p, ctx.identity)
            blocked[cells[cells <= ctx.max_joinid]] = True
            dep_hashes.append({"exclude": spec.exclude[i], "manifest_sha256": info["sha256"]})
            excluded_reports.append({"exclude": spec.exclude[i], "kind": "manifest", "n_cells": int(len(np.unique(cells))),
                                     **info})
        for name, cells in eval_sets.items():
            blocked[cells] = True
        for i, name in node.inline_excludes:
            excluded_reports.append({"exclude": name, "kind": "eval_set", "n_cells": int(len(eval_sets[name]))})

        for i, c in enumerate(spec.components):
            if c.name in eval_sets:
                raise AtlasmixError(f"{pre}components[{i}].name: {c.name!r} is also the name of an eval set "
                                    f"(from {eval_origin[c.name]}); rename one")

        # 2. components: unweighted in order, then weighted
        comps = list(enumerate(spec.components))
        order = [x for x in comps if x[1].weight is None] + [x for x in comps if x[1].weight is not None]
        drawn: dict[int, np.ndarray] = {}
        reports: dict[int, dict] = {}
        fixed_total = 0
        weighted = [(i, c) for i, c in comps if c.weight is not None]
        shares: dict[int, int] = {}
        for i, c in order:
            label = f"{pre}components[{i}]"
            if c.weight is not None and not shares:
                remaining = int(spec.n_cells) - fixed_total  # type: ignore[arg-type]
                if remaining < 0:
                    raise AtlasmixError(f"{node.where()}: n_cells: the components without a weight already take "
                                        f"{fixed_total:,} cells, more than the total {spec.n_cells:,}")
                alloc = sampling.largest_remainder(remaining, np.array([w.weight for _, w in weighted]))
                shares = {j: int(a) for (j, _), a in zip(weighted, alloc)}
            pool, labels, n_match = self._pool(c, label, blocked)
            if c.weight is not None:
                n, short = self._check_short(c, shares[i], len(pool), label, c.name, n_match, node)
            else:
                n, short = self._quota_fixed(c, len(pool), label, c.name, n_match, node)
            cells = self._draw(c, label, c.name, pool, labels, n, spec.seed, "component")
            blocked[cells] = True
            drawn[i] = cells
            if c.weight is None:
                fixed_total += len(cells)
            reports[i] = {"name": c.name, "strategy": c.strategy, "requested": _requested(c),
                          "n_matching": int(n_match), "n_available": int(len(pool)), "n_quota": int(n),
                          "n_cells": int(len(cells)), "took_all_short": short}
        if spec.n_cells is not None and not weighted:
            total = sum(len(v) for v in drawn.values())
            short = any(r["took_all_short"] for r in reports.values())
            if total != spec.n_cells and not short:
                raise AtlasmixError(f"{node.where()}: n_cells: the components give {total:,} cells, not the total "
                                    f"{spec.n_cells:,}; give some components a `weight` or drop the total")

        # 3. train / validation
        components: dict[str, dict[str, np.ndarray]] = {}
        comp_reports = []
        for i, c in comps:
            cells = drawn[i]
            n_val = int(np.floor(spec.validation_fraction * len(cells) + 0.5))
            val = sampling.bottom_k(cells, n_val, sampling.derive_key(spec.seed, "validation", c.name))
            train = cells[~np.isin(cells, val, assume_unique=True)]
            components[c.name] = {"train": train, "validation": val}
            comp_reports.append(reports[i] | {"n_train": int(len(train)), "n_validation": int(len(val))})

        own = spec.canonical()
        spec_hash = hashlib.sha256(canonical_json({"spec": own, "exclude": dep_hashes}).encode()).hexdigest()
        res = _Resolved(spec_hash, components, comp_reports, eval_sets, eval_reports, eval_origin, excluded_reports)
        self.done[id(node)] = res
        return res

    def _quota_fixed(self, sel: Selection, avail: int, label: str, name: str, n_match: int,
                     node: _Node) -> tuple[int, bool]:
        if sel.n_cells is not None:
            return self._check_short(sel, sel.n_cells, avail, label, name, n_match, node)
        if sel.fraction is not None:
            return int(np.floor(sel.fraction * avail + 0.5)), False
        return avail, False

    @staticmethod
    def _check_short(sel: Selection, n: int, avail: int, label: str, name: str, n_match: int,
                     node: _Node) -> tuple[int, bool]:
        """(cells to draw, whether the quota was cut to what is available)."""
        if n <= avail:
            return n, False
        if sel.take_all_if_short:
            return avail, True
        where = "" if ":" in label else f"{node.where()}: "
        why = "" if avail == n_match else f" ({n_match:,} match, {n_match - avail:,} of them are eval, excluded or " \
                                          "drawn by earlier components)"
        raise AtlasmixError(f"{where}{label} {name!r}: asks for {n:,} cells but only {avail:,} are available{why}; "
                            "lower the quota or set take_all_if_short = true")


def _requested(sel: Selection) -> dict:
    for k in ("n_cells", "fraction", "weight"):
        v = getattr(sel, k, None)
        if v is not None:
            return {k: v}
    return {"all": True}


# ---------------------------------------------------------------------------------------------- public
def resolve(spec: MixtureSpec | str | Path, store=None, *, obs: ObsContext | None = None,
            base_dir: str | Path | None = None) -> Resolution:
    """Resolve a mixture spec to exact cell sets.

    Parameters
    ----------
    spec : MixtureSpec or path
        A validated spec, or the path of a TOML spec file.
    store : atlasmix.store.Store or str, optional
        The store (or its URI). Only obs columns named by the spec (plus ``dataset_id`` and
        ``cell_type`` for the composition report) are read; X is read only by ``geometric_sketch``.
    obs : ObsContext, optional
        Instead of ``store``: a prepared context over an arrow obs table (benchmarks, tests).
    base_dir : path, optional
        Directory that relative ``exclude`` paths are resolved against (default: the spec file's
        directory, or the working directory for an in-memory spec).

    Returns
    -------
    Resolution

    Raises
    ------
    SpecError
        Invalid spec, missing or circular exclusions.
    AtlasmixError
        Refused or failing SQL, a quota a component cannot fill (without ``take_all_if_short``), a
        total that does not add up, an excluded manifest from another store, or a store that changed
        while resolving.
    """
    from atlasmix.store import Store

    path = None
    if not isinstance(spec, MixtureSpec):
        path = Path(spec)
        spec = load_spec(path)
    bdir = Path(base_dir) if base_dir is not None else (path.parent if path is not None else Path.cwd())
    root = _build_tree(spec, path, bdir.resolve(), (path.resolve(),) if path else (), {})
    nodes = _all_nodes(root)
    own_ctx = obs is None
    if obs is None:
        if store is None:
            raise AtlasmixError("resolve needs a store")
        store = store if isinstance(store, Store) else Store(str(store))
        texts = [sel.query_text for n in nodes for _, sel in _selections(n.spec)]
        cols = [c for n in nodes for _, sel in _selections(n.spec) for c in sel.balance_columns]
        obs = ObsContext.from_store(store, texts, cols)
    try:
        res = _Resolver(obs, root).resolve(root)
        table, disjoint, counts, rows = _manifest_table(res)
        composition = _composition(obs, rows)
        if obs.store is not None:
            cp = _copies(obs.store, rows)
            disjoint["copies"] = cp["copies"]
            if cp["warning"]:
                disjoint["statement"] += " " + cp["warning"]
        if own_ctx and obs.store is not None:
            now = obs.store.identity()
            if now["state_hash"] != obs.identity["state_hash"]:
                raise AtlasmixError("the store changed while resolving (an ingest finished); resolve again")
    finally:
        if own_ctx:
            obs.close()
    return Resolution(spec=spec, spec_path=str(path) if path else None, spec_hash=res.spec_hash, table=table,
                      components=res.component_reports,
                      eval_sets=[res.eval_reports[k] for k in sorted(res.eval_reports)],
                      excluded=res.excluded_reports, composition=composition, disjointness=disjoint,
                      store=dict(obs.identity), counts=counts)


def _manifest_table(res: _Resolved) -> tuple[pa.Table, dict]:
    names = sorted(set(res.components) | set(res.eval_sets))
    n_names = max(len(names), 1)
    code_of = {n: i for i, n in enumerate(names)}
    ids, codes = [], []
    for name, d in res.components.items():
        for s in ("train", "validation"):
            ids.append(np.asarray(d[s], dtype=np.int64))
            codes.append(np.full(len(d[s]), SPLITS.index(s) * n_names + code_of[name], dtype=np.int64))
    for name, cells in res.eval_sets.items():
        ids.append(np.asarray(cells, dtype=np.int64))
        codes.append(np.full(len(cells), 2 * n_names + code_of[name], dtype=np.int64))
    jid = np.concatenate(ids) if ids else np.empty(0, np.int64)
    code = np.concatenate(codes) if codes else np.empty(0, np.int64)
    size = int(jid.max()) + 1 if len(jid) else 0

    # the guarantee, checked by counting (independently of how cells were drawn): every train /
    # validation cell appears once, and none of them is in an eval set
    is_tv = code < 2 * n_names
    tv_ids = jid[is_tv]
    in_tv = np.zeros(size, dtype=bool)
    in_tv[tv_ids] = True
    in_eval = np.zeros(size, dtype=bool)
    in_eval[jid[~is_tv]] = True
    n_tv, n_ev = int(len(tv_ids)), int(np.count_nonzero(in_eval))
    n_dup = n_tv - int(np.count_nonzero(in_tv))
    overlap = int(np.count_nonzero(in_tv & in_eval))
    if n_dup or overlap:
        raise AssertionError(f"internal error: {n_dup} cells in two components, {overlap} training cells in eval sets")

    # order by (soma_joinid, split, component): one row per cell -> O(max joinid) scatter, else a sort
    if len(jid) == n_tv + n_ev:
        owner = np.full(size, -1, dtype=np.int32)
        owner[jid] = code
        jid = np.flatnonzero(owner >= 0).astype(np.int64)
        code = owner[jid].astype(np.int64)
    else:  # a cell in several eval sets
        k = 3 * n_names
        key = np.sort(jid * k + code)
        jid, code = key // k, key % k
    names_eval = sorted(res.eval_sets)
    disjoint = {
        "disjoint": True, "n_train_validation_cells": n_tv, "n_eval_cells": n_ev,
        "eval_sets": names_eval, "n_overlap": 0, "n_cells_in_two_components": 0,
        "statement": (f"The {n_tv:,} training and validation cells are disjoint from the {n_ev:,} cells of "
                      f"the eval sets {', '.join(names_eval)} (checked at resolution: 0 shared soma_joinids)."
                      if names_eval else f"The mixture declares no eval sets; its {n_tv:,} training and "
                      "validation cells appear once each."),
    }
    comp_idx = (code % n_names).astype(np.int32)
    split_idx = (code // n_names).astype(np.int32)
    table = pa.table({
        "soma_joinid": pa.array(jid, type=pa.int64()),
        "component": pa.DictionaryArray.from_arrays(pa.array(comp_idx), pa.array(names, pa.string())),
        "split": pa.DictionaryArray.from_arrays(pa.array(split_idx), pa.array(SPLITS, pa.string())),
    }, schema=MANIFEST_SCHEMA)
    counts = {k: int(c) for k, c in zip(SPLITS, np.bincount(split_idx, minlength=3))}
    return table, disjoint, counts, (jid, code, names)


def _copies(store, rows: tuple[np.ndarray, np.ndarray, list[str]]) -> dict:
    """Cells the manifest holds twice under different soma_joinids (the same counts on every gene:
    :mod:`atlasmix.store.fingerprint`): among the training + validation cells, and eval-set cells
    whose copies are training cells. Reported, not refused (the evaluation refuses the latter).
    Fingerprints are read only for datasets that ingest found copying each other
    (:func:`~atlasmix.store.fingerprint.copy_suspects`), so mixtures without copies pay nothing."""
    from atlasmix.store.fingerprint import copy_candidates, duplicates_within, fingerprints_of, shared_cells

    jid, code, names = rows  # jid ascending
    is_tv = code < 2 * max(len(names), 1)
    (tv, ev), unchecked = copy_candidates(store, jid[is_tv], np.unique(jid[~is_tv]))
    within, cross = 0, {"n_shared": 0, "datasets": {}, "unchecked": []}
    if len(tv):
        fps, _ = fingerprints_of(store, tv)
        within = duplicates_within(fps)
        if len(ev) and fps.any():
            cross = shared_cells(store, ev, tv)
    out = {"copies": {"n_train_validation_repeats": within, "n_eval_cells_copied_in_training": cross["n_shared"],
                      "copied_from": cross["datasets"], "unchecked_datasets": unchecked}}
    notes = []
    if within:
        notes.append(f"{within:,} training / validation cells repeat the counts of other cells of the mixture "
                     "(the same cells under two dataset ids?)")
    if cross["n_shared"]:
        notes.append(f"{cross['n_shared']:,} eval-set cells have copies among the training cells (in "
                     f"{', '.join(cross['datasets'])}); the evaluation will refuse them")
    out["warning"] = ("Warning: " + "; ".join(notes) + ".") if notes else ""
    return out


#: Manifest columns. ``component`` and ``split`` are dictionary-encoded strings (pandas: categorical).
MANIFEST_SCHEMA = pa.schema([pa.field("soma_joinid", pa.int64(), nullable=False),
                             pa.field("component", pa.dictionary(pa.int32(), pa.string()), nullable=False),
                             pa.field("split", pa.dictionary(pa.int32(), pa.string()), nullable=False)])


def _composition(ctx: ObsContext, rows: tuple[np.ndarray, np.ndarray, list[str]]) -> list[dict]:
    """Cells per (component, split, dataset_id, cell_type): the manifest's row codes are scattered onto
    obs rows (a column appended to the arrow obs, zero-copy) and counted with one duckdb GROUP BY."""
    jid, code, names = rows
    n_names = max(len(names), 1)
    if len(jid) == 0:
        return []
    row_of = ctx.row_of()
    tagged = np.full(ctx.obs.num_rows, -1, dtype=np.int32)
    if np.bincount(jid, minlength=1).max() == 1:
        tagged[row_of[jid]] = code
        extra = None
    else:  # a cell in several eval sets: count those rows separately
        first = np.r_[True, jid[1:] != jid[:-1]]
        tagged[row_of[jid[first]]] = code[first]
        extra = (jid[~first], code[~first])
    t = ctx.obs.select(["dataset_id", "cell_type"]).append_column("_code", pa.array(tagged))
    con = ctx.con
    con.register("_tagged", t)
    try:
        q = ("SELECT _code, dataset_id, coalesce(cell_type, 'NULL'), count(*) FROM _tagged WHERE _code >= 0 "
             "GROUP BY ALL")
        found = con.execute(q).fetchall()
        if extra is not None:
            t2 = ctx.obs.select(["dataset_id", "cell_type"]).take(pa.array(row_of[extra[0]])).append_column(
                "_code", pa.array(extra[1].astype(np.int32)))
            con.register("_tagged", t2)
            found += con.execute(q).fetchall()
    finally:
        con.unregister("_tagged")
    agg: dict[tuple, int] = {}
    for c, d, ct, n in found:
        key = (names[c % n_names], SPLITS[c // n_names], d, ct)
        agg[key] = agg.get(key, 0) + int(n)
    return [{"component": k[0], "split": k[1], "dataset_id": k[2], "cell_type": k[3], "n_cells": v}
            for k, v in sorted(agg.items())]


__all__ = ["CATALOG_IN_OBS", "MANIFEST_SCHEMA", "OBS_COLUMNS", "ObsContext", "Resolution", "read_obs", "resolve"]
