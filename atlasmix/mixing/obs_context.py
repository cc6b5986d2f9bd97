"""The obs context: a sandboxed duckdb connection over the obs columns a resolution needs.

Tables a query can use (duckdb, read-only, no file or network access)
---------------------------------------------------------------------
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
"""

from __future__ import annotations

import re

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from atlasmix.errors import AtlasmixError
from atlasmix.mixing.spec import Selection
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
_SELECT_START = re.compile(r"^\s*(\(\s*)*(SELECT|WITH|FROM|VALUES)\b", re.IGNORECASE)

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

        Catalog columns (:data:`CATALOG_IN_OBS`) are added only when named. obs is read with
        :meth:`atlasmix.store.Store.obs` unsorted (resolution does not need sorted rows).

        Parameters
        ----------
        store : atlasmix.store.Store
        texts : list of str
            The queries (``where`` / ``sql`` texts) the context must answer.
        columns : list of str
            Other columns needed (e.g. ``balance_by`` columns).

        Returns
        -------
        ObsContext
        """
        ident = store.identity()
        need = set(columns) | {"dataset_id", "cell_type"}
        blob = "\n".join(texts)
        need |= {c for c in OBS_COLUMNS if re.search(rf"\b{c}\b", blob, re.IGNORECASE)}
        cols = [c for c in OBS_COLUMNS if c in need]
        cat_cols = [c for c in CATALOG_IN_OBS if c in columns or re.search(rf"\b{c}\b", blob, re.IGNORECASE)]
        obs = store.obs(cols, sort=False)
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


__all__ = ["CATALOG_IN_OBS", "OBS_COLUMNS", "ObsContext"]
