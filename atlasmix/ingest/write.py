"""Write one prepared dataset into the store: its X (and x layout), presence, obs side table and obs rows.

Called by :func:`atlasmix.ingest.ingest` under the store's write lock; the catalog rows made here
say ``ingesting`` until the ingest commits them.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import tiledbsoma as soma

from atlasmix import __version__
from atlasmix._prefetch import prefetch
from atlasmix.ingest.prepare import Prepared
from atlasmix.ingest.readers import provenance_json
from atlasmix.store import Store, xlayout
from atlasmix.store import schema as S


def checkpoint(name: str) -> None:
    """Fault-injection point for the crash-safety tests: ``ATLASMIX_CRASH_AT=name`` kills the process here."""
    if os.environ.get("ATLASMIX_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)



def var_rows(p: Prepared, new_ids: list[str]) -> pd.DataFrame:
    """var rows (no ``soma_joinid``) for the genes ``new_ids`` that a prepared dataset adds to the store.

    The symbol and biotype come from the gene table, else the source's own name (else the id).
    """
    g = p.table_genes.reindex(new_ids)
    src_name = pd.Series({f: n.strip() for f, n in zip(p.mapping.feature_id, p.mapping.source_names) if f is not None})
    name = g["feature_name"].fillna(src_name.reindex(new_ids)).fillna(pd.Series(new_ids, index=new_ids))
    return pd.DataFrame({"feature_id": new_ids, "feature_name": name.to_numpy(),
                         "feature_biotype": g["feature_biotype"].fillna("gene").to_numpy(),
                         "species": p.organism_label})


def catalog_row(p: Prepared, ds_jid: int, start: int, status: str) -> dict:
    """The catalog row of a prepared dataset (``soma_joinid`` ``ds_jid``, cells from ``start``) with ``status``."""
    req = p.req
    return {
        "soma_joinid": ds_jid, "dataset_id": req.dataset_id, "title": req.title or Path(req.source).name,
        "citation": req.citation or str(p.provenance.get("study", "")),
        "provenance": provenance_json(p.provenance | {"request": req.model_dump(exclude={"qc"})}),
        "source_path": str(Path(req.source).resolve()) if "://" not in req.source else req.source,
        "source_format": p.source_format, "source_sha256": p.sha256, "organism": p.organism_label,
        "n_cells": len(p.rows), "n_genes_measured": len(p.mapping.target_ids),
        "obs_joinid_start": start, "obs_joinid_end": start + len(p.rows),
        "ingest_time": pd.Timestamp.now(tz="UTC").isoformat(), "atlasmix_version": __version__,
        "qc_policy": req.qc.model_dump_json(), "gene_mapping": json.dumps(p.mapping.report),
        "obs_extra_columns": json.dumps(list(p.extra.columns)), "status": status,
    }


def write_x(store: Store, p: Prepared, ds_jid: int, start: int, var_jid_of: dict[str, int], chunk_size: int,
             progress: Callable | None) -> pa.Table | None:
    """Write a dataset's X chunks (and its x layout); return the last TileDB chunk unwritten (see :func:`ingest`)."""
    targets = sorted(p.mapping.target_ids, key=var_jid_of.__getitem__)  # ascending global joinid
    local = {f: i for i, f in enumerate(targets)}
    M = p.mapping.matrix(local, len(targets))
    gcols = np.array([var_jid_of[f] for f in targets], dtype=np.int64)
    uri = f"{store.uri}/ms/{S.MEASUREMENT}/X/{S.X_LAYER}"
    # the read-optimised copy of X (atlasmix.store.xlayout), written in the same pass (local and s3:// stores)
    layout = (xlayout.LayoutWriter(store.uri, ds_jid, len(p.rows), len(var_jid_of))
              if xlayout.layout_root(store.uri) is not None else None)

    def transformed():
        pos = 0
        for block in p.reader.iter_rows(p.rows, chunk_size):
            y = (block.astype(np.float32) @ M).tocsr()
            y.sum_duplicates()
            y.sort_indices()
            y.eliminate_zeros()
            rows = np.repeat(np.arange(pos + start, pos + start + y.shape[0], dtype=np.int64), np.diff(y.indptr))
            # CSR with sorted indices is already TileDB's global order for X's full-width gene tile
            # (schema.X_CREATE_OPTIONS), so the writer skips its sort: ~8x faster writes.
            cols = gcols[y.indices]
            tbl = pa.Table.from_arrays([pa.array(rows), pa.array(cols), pa.array(y.data)],
                                       names=["soma_dim_0", "soma_dim_1", "soma_data"])
            if layout is not None:
                layout.append(y.indptr, cols, y.data)
            pos += y.shape[0]
            yield pos, tbl

    with soma.SparseNDArray.open(uri, "w", context=store.context) as X:
        pending = None  # one chunk of look-ahead so the last write can also consolidate metadata
        for done, tbl in prefetch(transformed(), depth=2, name="atlasmix-ingest"):
            if pending is not None:
                X.write(pending, platform_config=soma.TileDBWriteOptions(sort_coords=False))
            pending = tbl if tbl.num_rows else None
            checkpoint("x_chunk")
            if progress:
                progress(p.req.dataset_id, "write", done, len(p.rows))
    if layout is not None:
        layout.close()
    return pending  # written by the caller, serially, so X is consolidated once no writer runs


def write_rest(store: Store, p: Prepared, ds_jid: int, start: int, var_jid_of: dict[str, int]) -> None:
    """Write a dataset's presence row, obs side table, cell fingerprints and obs rows (one write, last)."""
    n = len(p.rows)
    gcols = np.sort(np.array([var_jid_of[f] for f in p.mapping.target_ids], dtype=np.int64))
    with soma.SparseNDArray.open(f"{store.uri}/ms/{S.MEASUREMENT}/{S.PRESENCE}", "w", context=store.context) as P:
        P.write(pa.Table.from_arrays([pa.array(np.full(len(gcols), ds_jid, np.int64)), pa.array(gcols),
                                      pa.array(np.ones(len(gcols), bool))],
                                     names=["soma_dim_0", "soma_dim_1", "soma_data"]),
                platform_config=S.WRITE_LAST)
    joinids = np.arange(start, start + n, dtype=np.int64)
    extra = p.extra.copy()
    extra.insert(0, "soma_joinid", joinids)
    et = pa.Table.from_pandas(extra, preserve_index=False)
    with soma.Collection.open(f"{store.uri}/{S.ATLASMIX}/{S.OBS_EXTRA}", "w", context=store.context) as coll:
        key = f"d{ds_jid}"
        if key in coll:
            del coll[key]
        sch = pa.schema([f for f in et.schema if f.name != "soma_joinid"])
        with coll.add_new_dataframe(key, schema=sch, index_column_names=["soma_joinid"],
                                    domain=[(start, max(start, start + n - 1))],
                                    platform_config=S.DF_CREATE_OPTIONS) as df:
            if len(extra.columns) > 1:
                df.write(et)
    store.write_x_fingerprints(ds_jid, start, p.fingerprints)
    checkpoint("before_obs")
    obs = p.obs.copy()
    obs.insert(0, "soma_joinid", joinids)
    t = pa.Table.from_pandas(obs, preserve_index=False)  # categoricals -> dictionary (enumeration) columns
    sch = pa.schema([pa.field("soma_joinid", pa.int64(), nullable=False)] + list(S.OBS_SCHEMA))
    t = pa.table({f.name: t[f.name].cast(f.type) for f in sch})
    with soma.DataFrame.open(f"{store.uri}/obs", "w", context=store.context) as df:
        df.write(t, platform_config=S.WRITE_LAST)  # one write = one fragment: the dataset's cells appear at once
    checkpoint("before_commit")

