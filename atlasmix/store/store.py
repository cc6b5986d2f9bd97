"""The atlasmix store: one TileDB-SOMA Experiment holding every ingested dataset.

Visibility and crash safety
---------------------------
A dataset becomes visible in one atomic step. An ingest (see :mod:`atlasmix.ingest`) takes the
store's write lock, allocates a fresh ``soma_joinid`` range (ranges are never reused), writes a
catalog row with status ``ingesting``, then X, the presence row, the side table and, last, all obs
rows of the dataset in a single write (one TileDB fragment, atomic), and finally flips the catalog
row to ``complete``. Readers of this module only return cells inside the joinid ranges of
``complete`` datasets, so a killed ingest is never seen. The next writer that takes the lock runs
:meth:`Store.recover`, which deletes the cells of any ``ingesting`` (crashed) or ``replaced`` dataset
(``delete_cells``) and marks crashed ones ``failed``.

The lock is an exclusive ``fcntl.flock`` on ``STORE/.atlasmix.lock`` (local stores). Object-store
URIs (``s3://``) have no lock: use one writer at a time there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import uuid
from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp
import tiledbsoma as soma

from atlasmix._ids import unique_ids
from atlasmix.errors import StoreError
from atlasmix.store import schema as S
from atlasmix.store import writers, xlayout
from atlasmix.store.context import TILEDB_DEFAULTS as TILEDB_DEFAULTS  # re-exported: README, docs, tests
from atlasmix.store.context import is_local, local_path, make_context
from atlasmix.store.writers import LOCK_NAME as LOCK_NAME  # re-exported: defined here before writers.py


def _empty_table(schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist([], schema=schema)


class Store:
    """Handle on an atlasmix store (a SOMA Experiment at ``uri``).

    Parameters
    ----------
    uri : str
        Local path or ``s3://`` URI of the store.
    context : tiledbsoma.SOMATileDBContext, optional
        TileDB context (configuration for object stores).

    Raises
    ------
    StoreError
        ``uri`` is not an atlasmix store (use :meth:`create` first).
    """

    def __init__(self, uri: str, context: soma.SOMATileDBContext | None = None):
        self.uri = str(uri).rstrip("/")
        self.context = context or make_context()
        if not soma.Experiment.exists(self.uri, context=self.context):
            raise StoreError(f"no atlasmix store at {self.uri} (create it with `atlasmix store init`)")
        with self.open_experiment() as exp:
            if exp.metadata.get("atlasmix_store_schema") is None:
                raise StoreError(f"{self.uri} is a SOMA experiment but not an atlasmix store")

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(cls, uri: str, context: soma.SOMATileDBContext | None = None) -> "Store":
        """Create an empty store at ``uri`` and return it.

        Creates the Experiment with ``obs``, measurement ``RNA`` (``var``, X layer ``raw`` float32,
        the presence matrix) and the ``atlasmix`` collection with the dataset catalog.

        Raises
        ------
        StoreError
            Something already exists at ``uri``.
        """
        uri = str(uri).rstrip("/")
        ctx = context or make_context()
        if soma.Experiment.exists(uri, context=ctx) or (is_local(uri) and local_path(uri).exists()
                                                        and any(local_path(uri).iterdir())):
            raise StoreError(f"{uri} already exists; refusing to overwrite it")
        from atlasmix import __version__

        with soma.Experiment.create(uri, context=ctx) as exp:
            exp.metadata["atlasmix_store_schema"] = S.STORE_SCHEMA_VERSION
            exp.metadata["atlasmix_version"] = __version__
            exp.metadata["created"] = pd.Timestamp.now(tz="UTC").isoformat()
            exp.metadata["store_id"] = str(uuid.uuid4())
            exp.add_new_dataframe("obs", schema=S.OBS_SCHEMA, index_column_names=["soma_joinid"],
                                  domain=[(0, 0)], platform_config=S.DF_CREATE_OPTIONS)
            ms = exp.add_new_collection("ms")
            rna = ms.add_new_collection(S.MEASUREMENT, soma.Measurement)
            rna.add_new_dataframe("var", schema=S.VAR_SCHEMA, index_column_names=["soma_joinid"],
                                  domain=[(0, 0)], platform_config=S.DF_CREATE_OPTIONS)
            X = rna.add_new_collection("X")
            X.add_new_sparse_ndarray(S.X_LAYER, type=pa.float32(), shape=(1, 1),
                                     platform_config=S.X_CREATE_OPTIONS)
            rna.add_new_sparse_ndarray(S.PRESENCE, type=pa.bool_(), shape=(1, 1))
            am = exp.add_new_collection(S.ATLASMIX)
            am.add_new_dataframe(S.CATALOG, schema=S.CATALOG_SCHEMA, index_column_names=["soma_joinid"],
                                 domain=[(0, S.MAX_DATASETS - 1)], platform_config=S.DF_CREATE_OPTIONS)
            am.add_new_collection(S.OBS_EXTRA)
            am.add_new_collection(S.X_FINGERPRINTS)
        return cls(uri, ctx)

    # ------------------------------------------------------------------ opening
    def open_experiment(self, mode: str = "r") -> soma.Experiment:
        """Open the underlying SOMA Experiment (``mode`` ``"r"`` or ``"w"``)."""
        return soma.Experiment.open(self.uri, mode, context=self.context)

    def _open(self, path: str, mode: str = "r"):
        return soma.open(f"{self.uri}/{path}", mode, context=self.context)

    # ------------------------------------------------------------------ catalog
    def catalog(self, include_all: bool = False) -> pd.DataFrame:
        """The dataset catalog, one row per dataset.

        Parameters
        ----------
        include_all : bool
            Also return ``ingesting``/``failed``/``replaced`` rows (default: ``complete`` only).

        Returns
        -------
        pandas.DataFrame
            Index ``soma_joinid`` (dataset joinid, int64); columns of ``CATALOG_SCHEMA``.
        """
        with self._open(f"{S.ATLASMIX}/{S.CATALOG}") as df:
            t = df.read().concat()
        cat = t.to_pandas().set_index("soma_joinid").sort_index() if t.num_rows else \
            _empty_table(S.CATALOG_SCHEMA).to_pandas().rename_axis("soma_joinid")
        if not include_all:
            cat = cat[cat["status"] == S.STATUS_COMPLETE]
        return cat

    def write_catalog_rows(self, rows: Sequence[dict]) -> None:
        """Write (insert or overwrite by ``soma_joinid``) catalog rows in one atomic write."""
        t = pa.Table.from_pylist(list(rows), schema=pa.schema([pa.field("soma_joinid", pa.int64(), nullable=False)]
                                                                + list(S.CATALOG_SCHEMA)))
        with self._open(f"{S.ATLASMIX}/{S.CATALOG}", "w") as df:
            df.write(t, platform_config=S.WRITE_LAST)

    def complete_ranges(self) -> np.ndarray:
        """Joinid ranges of complete datasets, shape (n_datasets, 2), int64, ``[start, end)``, sorted."""
        cat = self.catalog()
        r = cat[["obs_joinid_start", "obs_joinid_end"]].to_numpy(dtype=np.int64).reshape(-1, 2)
        return r[np.argsort(r[:, 0])]

    def next_obs_joinid(self) -> int:
        """First joinid never allocated (ranges of failed ingests are never reused)."""
        cat = self.catalog(include_all=True)
        return int(cat["obs_joinid_end"].max()) if len(cat) else 0

    def next_dataset_joinid(self) -> int:
        cat = self.catalog(include_all=True)
        return int(cat.index.max()) + 1 if len(cat) else 0

    # ------------------------------------------------------------------ var / presence
    def var(self) -> pd.DataFrame:
        """All genes of the store: index ``soma_joinid``; ``feature_id``, ``feature_name``, ``feature_biotype``, ``species``."""
        with self._open(f"ms/{S.MEASUREMENT}/var") as df:
            t = df.read().concat()
        if not t.num_rows:
            return _empty_table(S.VAR_SCHEMA).to_pandas().rename_axis("soma_joinid")
        return t.to_pandas().set_index("soma_joinid").sort_index()

    def presence(self) -> sp.csr_matrix:
        """Gene-presence matrix, shape (n_dataset_joinids, n_var), bool: gene measured in dataset.

        Rows of datasets that are not complete are zeroed, so "not measured" is never "zero".
        """
        n_ds = self.next_dataset_joinid()
        n_var = len(self.var())
        with self._open(f"ms/{S.MEASUREMENT}/{S.PRESENCE}") as arr:
            t = arr.read().tables().concat()
        rows = t["soma_dim_0"].to_numpy()
        cols = t["soma_dim_1"].to_numpy()
        keep = np.isin(rows, self.catalog().index.to_numpy())
        m = sp.coo_matrix((np.ones(int(keep.sum()), dtype=bool), (rows[keep], cols[keep])),
                          shape=(max(n_ds, 1), max(n_var, 1)))
        return m.tocsr()[:n_ds, :n_var]

    # ------------------------------------------------------------------ obs
    def obs(self, column_names: Sequence[str] | None = None, value_filter: str | None = None,
            joinids: np.ndarray | None = None, sort: bool = True) -> pa.Table:
        """obs rows of complete datasets only, one read per dataset.

        Parameters
        ----------
        column_names : list of str, optional
            Columns to read (``soma_joinid`` is always included). Default: all.
        value_filter : str, optional
            A tiledbsoma value filter pushed down to the read (e.g. ``"cell_type == 'B cell'"``).
        joinids : numpy.ndarray of int64, optional
            Read only these cells (point coordinates; those not in a complete dataset are left out),
            so memory follows the cells asked for, not the store.
        sort : bool
            Sort the rows by ``soma_joinid``. False: datasets in joinid order, each dataset's rows
            in TileDB's read order (a mixture resolution does not need sorted obs, and sorting 10M
            rows costs more than reading them).

        Returns
        -------
        pyarrow.Table
            ``soma_joinid`` (int64) and the columns read, with the store's obs schema. Memory is
            O(cells x columns read): read few columns at scale.
        """
        cols = None if column_names is None else ["soma_joinid"] + [c for c in column_names if c != "soma_joinid"]
        ranges = self.complete_ranges()
        parts = []
        ids = None if joinids is None else unique_ids(joinids)
        with self._open("obs") as df:
            for start, end in ranges:  # one read per dataset: a crash's rows are never returned
                if end <= start:
                    continue
                if ids is None:
                    coords = slice(int(start), int(end) - 1)
                else:
                    coords = ids[np.searchsorted(ids, start):np.searchsorted(ids, end)]
                    if not len(coords):
                        continue
                    if len(coords) == int(end) - int(start):  # every cell of the dataset: a range, not
                        coords = slice(int(start), int(end) - 1)  # points (10M points: ~4 s in TileDB)
                parts.append(df.read(coords=[coords], column_names=cols, value_filter=value_filter).concat())
            empty_schema = df.schema if cols is None else pa.schema([df.schema.field(c) for c in cols])
        if not parts:
            return _empty_table(empty_schema)
        t = pa.concat_tables(parts)
        return t.sort_by("soma_joinid") if sort else t

    def obs_extra(self, dataset_id: str) -> pd.DataFrame:
        """The source's other obs columns for ``dataset_id``, indexed by cell ``soma_joinid``."""
        cat = self.catalog()
        hit = cat[cat["dataset_id"] == dataset_id]
        if hit.empty:
            raise StoreError(f"no complete dataset {dataset_id!r} in {self.uri}")
        key = f"d{int(hit.index[0])}"
        with self._open(f"{S.ATLASMIX}/{S.OBS_EXTRA}/{key}") as df:
            return df.read().concat().to_pandas().set_index("soma_joinid")

    # ------------------------------------------------------------------ cell fingerprints
    def x_fingerprints(self, dataset_joinid: int) -> np.ndarray | None:
        """Count fingerprints of one dataset's cells (:mod:`atlasmix.store.fingerprint`).

        Parameters
        ----------
        dataset_joinid : int
            The dataset's catalog ``soma_joinid``.

        Returns
        -------
        numpy.ndarray of int64, shape (n_cells,), or None
            One per cell in cell ``soma_joinid`` order (0: too few genes to fingerprint); None for a
            dataset ingested before atlasmix wrote fingerprints.
        """
        key = f"d{int(dataset_joinid)}"
        with self._open(S.ATLASMIX) as am:
            if S.X_FINGERPRINTS not in am or key not in am[S.X_FINGERPRINTS]:
                return None
        with self._open(f"{S.ATLASMIX}/{S.X_FINGERPRINTS}/{key}") as df:
            t = df.read(column_names=["soma_joinid", "x_fingerprint"]).concat()
        order = np.argsort(t["soma_joinid"].to_numpy(), kind="stable")
        return t["x_fingerprint"].to_numpy()[order]

    def write_x_fingerprints(self, dataset_joinid: int, start: int, fingerprints: np.ndarray) -> None:
        """Write one dataset's fingerprints (cells ``start ..``); call with the write lock held.

        Creates ``atlasmix/x_fingerprints`` in stores made before it existed.
        """
        fps = np.asarray(fingerprints, dtype=np.int64)
        key = f"d{int(dataset_joinid)}"
        with self._open(S.ATLASMIX) as am:
            missing = S.X_FINGERPRINTS not in am
        if missing:
            with self._open(S.ATLASMIX, "w") as am:
                am.add_new_collection(S.X_FINGERPRINTS)
        with self._open(f"{S.ATLASMIX}/{S.X_FINGERPRINTS}", "w") as coll:
            if key in coll:
                del coll[key]
            with coll.add_new_dataframe(key, schema=pa.schema([pa.field("x_fingerprint", pa.int64(), nullable=False)]),
                                        index_column_names=["soma_joinid"],
                                        domain=[(start, max(start, start + len(fps) - 1))],
                                        platform_config=S.DF_CREATE_OPTIONS) as df:
                if len(fps):
                    df.write(pa.table({"soma_joinid": np.arange(start, start + len(fps), dtype=np.int64),
                                       "x_fingerprint": fps}))

    # ------------------------------------------------------------------ X
    def iter_X(self, joinids: np.ndarray, var_joinids: np.ndarray | None = None,
               chunk_size: int = 8192) -> Iterator[tuple[np.ndarray, sp.csr_matrix]]:
        """Stream X rows of ``joinids`` in chunks.

        Parameters
        ----------
        joinids : numpy.ndarray of int64
            Cell soma_joinids, ascending and unique.
        var_joinids : numpy.ndarray of int64, optional
            Genes to return (columns in this order). Default: all var.
        chunk_size : int
            Cells per chunk.

        Yields
        ------
        (numpy.ndarray, scipy.sparse.csr_matrix)
            The chunk's joinids and its counts, shape (len(chunk), len(var_joinids)), float32.

        Raises
        ------
        StoreError
            ``joinids`` not ascending and unique (TileDB returns each cell once, in its order: a
            repeated or out-of-order id would come back as an empty or another cell's row).

        Notes
        -----
        Read from the store's x layout (:mod:`atlasmix.store.xlayout`) when every dataset holding
        ``joinids`` has one (local stores), else from TileDB X; the values are the same.
        """
        joinids = np.asarray(joinids, dtype=np.int64)
        if np.any(np.diff(joinids) <= 0):
            raise StoreError("iter_X: joinids must be ascending and unique")
        if var_joinids is None:
            var_joinids = self.var().index.to_numpy(dtype=np.int64)
        var_joinids = np.asarray(var_joinids, dtype=np.int64)
        col_of = np.full(int(var_joinids.max(initial=-1)) + 1, -1, dtype=np.int64)
        col_of[var_joinids] = np.arange(len(var_joinids))
        layout = xlayout.reader_for(self, joinids) if len(joinids) else None
        if layout is not None:
            col32 = col_of.astype(np.int32)
            try:
                for s in range(0, len(joinids), chunk_size):
                    ids = np.asarray(joinids[s:s + chunk_size], dtype=np.int64)
                    m = layout.read(ids, col32, len(var_joinids))
                    m.sort_indices()
                    yield ids, m
            finally:
                layout.close()
            return
        with self._open(f"ms/{S.MEASUREMENT}/X/{S.X_LAYER}") as X:
            for s in range(0, len(joinids), chunk_size):
                ids = np.asarray(joinids[s:s + chunk_size], dtype=np.int64)
                t = X.read(coords=(pa.array(ids), pa.array(var_joinids))).tables().concat()
                r = np.searchsorted(ids, t["soma_dim_0"].to_numpy())
                c = col_of[t["soma_dim_1"].to_numpy()]
                m = sp.csr_matrix((t["soma_data"].to_numpy(), (r, c)), shape=(len(ids), len(var_joinids)),
                                  dtype=np.float32)
                m.sort_indices()
                yield ids, m

    # ------------------------------------------------------------------ locking & recovery
    def write_lock(self, timeout: float = 3600.0, on_wait=None) -> contextlib.AbstractContextManager[None]:
        """Hold the store's exclusive write lock (blocks up to ``timeout`` seconds).

        A context manager (:func:`atlasmix.store.writers.write_lock`).

        Raises
        ------
        StoreError
            The lock could not be taken within ``timeout``.
        """
        return writers.write_lock(self.uri, timeout, on_wait)

    def delete_dataset_cells(self, dataset_joinid: int, start: int, end: int) -> None:
        """Delete obs, X, presence and side-table rows and the x layout of one dataset (``[start, end)`` cell joinids)."""
        xlayout.delete_dataset(self.uri, dataset_joinid)
        if end > start:
            with self._open("obs", "d") as df:
                df.delete_cells(coords=[slice(start, end - 1)])
            with self._open(f"ms/{S.MEASUREMENT}/X/{S.X_LAYER}", "d") as X:
                X.delete_cells(coords=[slice(start, end - 1)])
        with self._open(f"ms/{S.MEASUREMENT}/{S.PRESENCE}", "d") as P:
            if dataset_joinid < P.shape[0]:
                P.delete_cells(coords=[slice(dataset_joinid, dataset_joinid)])
        key = f"d{dataset_joinid}"
        with self._open(f"{S.ATLASMIX}/{S.OBS_EXTRA}", "w") as coll:
            if key in coll:
                del coll[key]
        with self._open(S.ATLASMIX) as am:
            has_fps = S.X_FINGERPRINTS in am and key in am[S.X_FINGERPRINTS]
        if has_fps:
            with self._open(f"{S.ATLASMIX}/{S.X_FINGERPRINTS}", "w") as coll:
                del coll[key]

    def recover(self) -> list[str]:
        """Clean up after killed ingests; call with the write lock held.

        Deletes the cells of ``ingesting`` datasets (an ingest that holds no lock is dead) and marks
        them ``failed``; deletes leftover cells of ``replaced`` datasets. Idempotent.

        Returns
        -------
        list of str
            dataset_ids that were rolled back.
        """
        return writers.recover(self)

    def identity(self) -> dict:
        """What a manifest must record so that a later ingest cannot silently change its meaning.

        Returns
        -------
        dict
            ``store_id`` (UUID written at ``store init``), ``uri``, ``n_cells`` and ``state_hash``: sha256
            over the complete datasets' (joinid, dataset_id, joinid range, source sha256, ingest time).
            Any ingest, replace or failure recovery that changes visible cells changes ``state_hash``.
        """
        with self.open_experiment() as exp:
            sid = str(exp.metadata.get("store_id", ""))
        cat = self.catalog()
        h = hashlib.sha256()
        for jid, r in cat.sort_index().iterrows():
            h.update(f"{jid}|{r.dataset_id}|{r.obs_joinid_start}|{r.obs_joinid_end}|{r.source_sha256}|"
                     f"{r.ingest_time}\n".encode())
        return {"store_id": sid, "uri": self.uri, "n_cells": int(cat["n_cells"].sum()), "state_hash": h.hexdigest()}

    # ------------------------------------------------------------------ info
    def size_on_disk(self) -> int | None:
        """Bytes used by the store directory, or None for object-store URIs."""
        if not is_local(self.uri):
            return None
        return sum(p.stat().st_size for p in local_path(self.uri).rglob("*") if p.is_file())

    def info(self) -> dict:
        """Summary of the store for ``atlasmix store info``.

        Returns
        -------
        dict
            ``uri``, ``n_cells`` (complete datasets only), ``n_genes`` (var rows),
            ``n_genes_measured`` (genes present in >= 1 complete dataset), ``size_bytes``,
            ``datasets`` (list of dicts: ``dataset_id``, ``n_cells``, ``n_genes_measured``,
            ``status``, ``organism``, ``source_format``, ``qc_pass_fraction``, ``gene_mapping``,
            ``duplicate_cells`` (cells with the same counts as cells of datasets stored before, as
            found at ingest; None for datasets ingested before atlasmix fingerprinted cells),
            ``x_layout`` (the dataset has its read-optimised copy, :mod:`atlasmix.store.xlayout`), ...).
        """
        cat = self.catalog(include_all=True)
        var = self.var()
        pres = self.presence()
        qc = {}
        obs = self.obs(["dataset_id", "qc_pass"])
        if obs.num_rows:
            qdf = obs.to_pandas().groupby("dataset_id", observed=True)["qc_pass"].mean()
            qc = qdf.to_dict()
        datasets = []
        for jid, row in cat.iterrows():
            if row["status"] == S.STATUS_RETIRED:
                continue
            datasets.append({
                "dataset_id": row["dataset_id"], "dataset_joinid": int(jid), "status": row["status"],
                "n_cells": int(row["n_cells"]) if row["status"] == S.STATUS_COMPLETE else 0,
                "n_genes_measured": int(row["n_genes_measured"]), "organism": row["organism"],
                "source_format": row["source_format"], "title": row["title"],
                "obs_joinid_range": [int(row["obs_joinid_start"]), int(row["obs_joinid_end"])],
                "qc_pass_fraction": float(qc[row["dataset_id"]]) if row["status"] == S.STATUS_COMPLETE
                and row["dataset_id"] in qc else None,
                "gene_mapping": json.loads(row["gene_mapping"]), "ingest_time": row["ingest_time"],
                "duplicate_cells": json.loads(row["provenance"] or "{}").get("duplicate_cells"),
                "x_layout": xlayout.dataset_ready(self.uri, int(jid)) if row["status"] == S.STATUS_COMPLETE else None,
            })
        complete = [d for d in datasets if d["status"] == S.STATUS_COMPLETE]
        return {
            "uri": self.uri,
            "n_cells": int(sum(d["n_cells"] for d in complete)),
            "n_genes": int(len(var)),
            "n_genes_measured": int((np.asarray(pres.sum(axis=0)).ravel() > 0).sum()) if pres.shape[0] else 0,
            "n_datasets": len(complete),
            "size_bytes": self.size_on_disk(),
            "identity": self.identity(),
            "datasets": datasets,
        }
