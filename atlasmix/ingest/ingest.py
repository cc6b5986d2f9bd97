"""Append datasets to a store: validate, harmonise genes, compute QC, write, commit atomically.

An ingest runs in two phases.

*Prepare* (no store writes; several datasets in parallel with dask threads): open the source, apply
the obs filter, map genes (:mod:`atlasmix.ingest.harmonize`), then stream X once to validate every
value (finite, non-negative, integer unless ``assume_counts``) and compute the per-cell QC metrics.
Any problem raises :class:`~atlasmix.errors.IngestError` here, so refused input never touches the store.

*Write* (under the store's write lock): recover from earlier crashes, allocate a fresh joinid range,
add new genes to var, write a catalog row ``ingesting``, stream X a second time into the store
(datasets in parallel: their joinid ranges are disjoint), write presence, the obs side table and all
obs rows (one atomic write), then flip the catalog rows to ``complete`` in one write. See
:mod:`atlasmix.store.store` for why a crash at any point is invisible and recoverable.

QC follows scanpy's ``calculate_qc_metrics`` (``total_counts``, ``n_genes_by_counts``,
``pct_counts_mt`` over all genes of the source, mitochondrial = symbol starting ``MT-``); the default
policy is the scFM-datamix filter (``pct_counts_mt < 10`` and ``total_counts > 1000``). Cells are
flagged in ``qc_pass``, never dropped.
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from atlasmix._prefetch import prefetch
from atlasmix.errors import IngestError
from atlasmix.ingest.harmonize import GeneMapping, check_usable, harmonize_genes
from atlasmix._files import sha256_of
from atlasmix.ingest.readers import Reader, detect_format, open_reader, provenance_json, read_obs_table
from atlasmix.store import Store
from atlasmix.store import schema as S
from atlasmix.store.fingerprint import (cell_fingerprints, duplicates_in_store, duplicates_within, first_match,
                                        gene_hashes)
from atlasmix.store.genes import ORGANISMS, gene_table, mitochondrial_mask, normalize_organism

DATASET_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
TRUE_STRINGS = {"true", "t", "yes", "y", "1", "malignant", "tumor", "tumour", "cancer"}


def _checkpoint(name: str) -> None:
    """Fault-injection point for the crash-safety tests: ``ATLASMIX_CRASH_AT=name`` kills the process here."""
    if os.environ.get("ATLASMIX_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


class QCPolicy(BaseModel):
    """Declared QC policy; ``qc_pass = pct_counts_mt < max_pct_counts_mt and total_counts > min_total_counts
    and n_genes_by_counts >= min_genes``. Defaults: scFM-datamix (pct mito < 10 %, > 1000 UMIs)."""

    model_config = ConfigDict(extra="forbid")
    max_pct_counts_mt: float = 10.0
    min_total_counts: float = 1000.0
    min_genes: int = 0

    def passes(self, total: np.ndarray, n_genes: np.ndarray, pct_mt: np.ndarray) -> np.ndarray:
        return (pct_mt < self.max_pct_counts_mt) & (total > self.min_total_counts) & (n_genes >= self.min_genes)


class DatasetRequest(BaseModel):
    """One dataset to ingest (a CLI call or one ``[[dataset]]`` of a plan file)."""

    model_config = ConfigDict(extra="forbid")
    dataset_id: str
    source: str
    format: str | None = None
    organism: str = "human"
    tissue: str | None = None
    title: str = ""
    citation: str = ""
    set: dict[str, str] = Field(default_factory=dict)
    obs_map: dict[str, str] = Field(default_factory=dict)
    obs_table: str | None = None
    obs_filter: str | None = None
    gene_id_column: str | None = None
    gene_table: str | None = None
    layer: str | None = None
    genome: str | None = None
    assume_counts: bool = False
    on_duplicate_genes: Literal["sum", "refuse"] = "sum"
    on_duplicate_cells: Literal["warn", "refuse"] = "warn"
    min_mapped_fraction: float = 0.5
    replace: bool = False
    qc: QCPolicy = Field(default_factory=QCPolicy)


@dataclass
class Prepared:
    """A validated dataset, ready to write."""

    req: DatasetRequest
    reader: Reader
    rows: np.ndarray  # selected source rows, sorted, int64
    obs: pd.DataFrame  # store obs columns (no soma_joinid yet)
    extra: pd.DataFrame  # other source obs columns
    mapping: GeneMapping
    organism_label: str
    sha256: str
    provenance: dict
    table_genes: pd.DataFrame
    report: dict = field(default_factory=dict)
    fingerprints: np.ndarray | None = None  # int64 per cell (atlasmix.store.fingerprint)
    source_format: str = ""  # the reader's format (the reader itself does not travel to dask workers)


def _select_rows(src_obs: pd.DataFrame, obs_filter: str | None) -> np.ndarray:
    if not obs_filter:
        return np.arange(len(src_obs), dtype=np.int64)
    df = src_obs.copy()
    for c in df.columns:
        if isinstance(df[c].dtype, pd.CategoricalDtype):
            df[c] = df[c].astype(str)
    df["__row"] = np.arange(len(df), dtype=np.int64)
    df = df.reset_index(names="barcode")
    from atlasmix.store.query import check_sql, run_bounded, safe_connection

    check_sql(obs_filter, "--obs-filter")
    con = safe_connection()
    try:
        con.register("src_obs", df)
        rows = run_bounded(con, lambda: con.execute(f"SELECT __row FROM src_obs WHERE ({obs_filter}\n) "
                                                    "ORDER BY __row").fetchnumpy()["__row"], "--obs-filter")
    except duckdb.Error as e:
        raise IngestError(f"bad --obs-filter {obs_filter!r}: {str(e).splitlines()[0]}") from e
    finally:
        con.close()
    return np.asarray(rows, dtype=np.int64)


def _as_bool(values: pd.Series) -> np.ndarray:
    if values.dtype == bool:
        return values.to_numpy()
    return values.astype(str).str.strip().str.lower().isin(TRUE_STRINGS).to_numpy()


def _build_obs(req: DatasetRequest, src_obs: pd.DataFrame, organism_label: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    n = len(src_obs)
    obs = pd.DataFrame(index=range(n))
    barcodes = src_obs.index.astype(str)
    obs["obs_id"] = (req.dataset_id + ":" + pd.Series(barcodes)).to_numpy()
    obs["dataset_id"] = req.dataset_id
    for c, default in S.OBS_STRING_COLUMNS.items():
        if c not in obs.columns:
            obs[c] = default
    obs["organism"] = organism_label
    obs["is_malignant"] = False
    # precedence: --set / --tissue  >  --obs-map  >  a source column of the same name  >  default
    mapping = {c: c for c in S.SETTABLE_OBS_COLUMNS if c in src_obs.columns and c != "organism"}
    for col, src_col in req.obs_map.items():
        if col not in S.SETTABLE_OBS_COLUMNS:
            raise IngestError(f"--obs-map: {col!r} is not a settable obs column ({', '.join(S.SETTABLE_OBS_COLUMNS)})")
        if src_col not in src_obs.columns:
            raise IngestError(f"--obs-map {col}={src_col}: the source has no obs column {src_col!r} "
                              f"(has: {', '.join(map(str, src_obs.columns[:12]))})")
        mapping[col] = src_col
    constants = dict(req.set)
    if req.tissue:
        constants.setdefault("tissue", req.tissue)
    for col in constants:
        if col not in S.SETTABLE_OBS_COLUMNS:
            raise IngestError(f"--set: {col!r} is not a settable obs column ({', '.join(S.SETTABLE_OBS_COLUMNS)})")
    if "tissue_general" not in mapping and "tissue_general" not in constants:
        if "tissue" in constants:
            constants["tissue_general"] = constants["tissue"]
        elif "tissue" in mapping:
            mapping["tissue_general"] = mapping["tissue"]
    used = set()
    for col, src_col in mapping.items():
        if col in constants:
            continue
        vals = src_obs[src_col]
        if col == "is_malignant":
            obs[col] = _as_bool(vals)
        else:
            obs[col] = vals.astype(object).where(vals.notna(), S.OBS_STRING_COLUMNS[col]).astype(str).to_numpy()
        used.add(src_col)
    for col, val in constants.items():
        obs[col] = bool(_as_bool(pd.Series([val]))[0]) if col == "is_malignant" else val
    for c in S.OBS_STRING_COLUMNS:  # few distinct values: categorical codes, ~1 byte per cell
        if c != "obs_id":
            obs[c] = obs[c].astype(str).astype("category")
    extra = src_obs.drop(columns=[c for c in src_obs.columns if c in used]).reset_index(drop=True)
    for c in list(extra.columns):
        s = extra[c]
        if isinstance(s.dtype, pd.CategoricalDtype) or s.dtype == object:
            extra[c] = s.astype(str)
        elif s.dtype.kind in "iu":
            extra[c] = s.astype(np.int64)
        elif s.dtype.kind == "f":
            extra[c] = s.astype(np.float64)
        elif s.dtype.kind != "b":
            extra[c] = s.astype(str)
    extra.columns = [("source_" + str(c)) if str(c) == "soma_joinid" else str(c) for c in extra.columns]
    return obs, extra


def _open_source(req: DatasetRequest, context=None) -> Reader:
    fmt = req.format or detect_format(req.source)
    # SOMA sources get the filter pushed down as a tiledbsoma value_filter; files filter with duckdb
    return open_reader(req.source, fmt, req.layer, value_filter=req.obs_filter if fmt == "soma" else None,
                       context=context, genome=req.genome)


def prepare(req: DatasetRequest, chunk_size: int = 8192, context=None) -> Prepared:
    """Validate one dataset and compute its obs/QC without writing anything.

    Raises
    ------
    IngestError
        Bad dataset id, unreadable/unknown/empty/truncated source, bad obs filter or mapping,
        duplicate barcodes, no cells, no usable gene identifiers, NaN/inf, negative or non-integer
        values (integers required unless ``assume_counts``).
    """
    if not DATASET_ID_RE.match(req.dataset_id):
        raise IngestError(f"bad dataset id {req.dataset_id!r}: use letters, digits, '_', '.', '-' (max 128)")
    org = normalize_organism(req.organism)
    organism_label = ORGANISMS.get(org, req.organism)
    table = gene_table(org, req.gene_table)
    reader = _open_source(req, context)
    try:
        src_obs = reader.obs()
        if req.obs_table:
            side = read_obs_table(req.obs_table)
            src_obs = src_obs.join(side, how="left", rsuffix="_obs_table")
        is_soma = reader.format == "soma"
        rows = np.arange(len(src_obs), dtype=np.int64) if is_soma else _select_rows(src_obs, req.obs_filter)
        if len(rows) == 0:
            raise IngestError(f"no cells to ingest from {req.source}" + (" after --obs-filter" if req.obs_filter else ""))
        sel_obs = src_obs.iloc[rows]
        dup = sel_obs.index.astype(str).duplicated()
        if dup.any():
            raise IngestError(f"duplicate barcodes in {Path(req.source).name}: {int(dup.sum())} "
                              f"(e.g. {sel_obs.index[dup][0]!r}); make them unique first")
        var = reader.var()
        if req.gene_id_column:
            if req.gene_id_column not in var.columns:
                raise IngestError(f"--gene-id-column {req.gene_id_column!r} not in var "
                                  f"(has: {', '.join(map(str, var.columns[:12]))})")
            names = var[req.gene_id_column].astype(str).to_numpy()
        else:
            names = var.index.astype(str).to_numpy()
        mapping = harmonize_genes(names, table, req.on_duplicate_genes)
        check_usable(mapping, req.min_mapped_fraction)

        # mitochondrial genes: by mapped current symbol, else by the source name
        mapped_sym = table.genes["feature_name"].reindex(
            [f if f is not None else "" for f in mapping.feature_id]).to_numpy()
        sym = np.where(pd.isna(mapped_sym), np.char.strip(names.astype(str)), mapped_sym)
        mt = mitochondrial_mask(sym).to_numpy().astype(np.float64)

        # cell fingerprints over the harmonised genes (the hash is order-free). When no two source
        # genes map to one Ensembl id, the source's own columns are hashed with their genes' hashes
        # (unmapped ones skipped): the same values as over the store's columns, without a product
        # with the mapping matrix (that product, needed to sum duplicates, cost ~15% of an ingest)
        fid = mapping.feature_id
        mapped = np.array([f is not None for f in fid], dtype=bool)
        if mapped.sum() == len(mapping.target_ids):
            M, fp_keep = None, mapped
            fp_hash = np.zeros(len(fid), np.uint64)
            fp_hash[mapped] = gene_hashes(fid[mapped])
        else:
            M = mapping.matrix({f: i for i, f in enumerate(mapping.target_ids)}, len(mapping.target_ids))
            fp_hash, fp_keep = gene_hashes(mapping.target_ids), None

        n = len(rows)
        fps = np.zeros(n, np.int64)
        total = np.zeros(n, np.float64)
        ngenes = np.zeros(n, np.int32)
        mtc = np.zeros(n, np.float64)
        pos = 0
        for block in reader.iter_rows(rows, chunk_size):
            d = block.data
            if d.size:
                if not np.isfinite(d).all():
                    r = pos + int(np.searchsorted(block.indptr, np.flatnonzero(~np.isfinite(d))[0], side="right") - 1)
                    raise IngestError(f"X holds NaN or inf (cell {sel_obs.index[r]!r}); refusing")
                if (d < 0).any():
                    raise IngestError(f"X holds negative values (min {d.min():g}); raw counts cannot be negative")
                if not req.assume_counts and not np.array_equal(d, np.round(d)):
                    bad = d[d != np.round(d)][0]
                    raise IngestError(f"X holds non-integer values (e.g. {bad:g}), not raw counts; pass "
                                      "--layer with the counts layer, or --assume-counts if it does hold counts")
            k = block.shape[0]
            total[pos:pos + k] = np.asarray(block.sum(axis=1)).ravel()
            ngenes[pos:pos + k] = np.diff(block.indptr) if block.has_canonical_format else (block > 0).sum(axis=1).A1
            mtc[pos:pos + k] = block @ mt
            if M is None:
                y = block
                if not y.has_canonical_format:  # repeated (cell, gene) entries are summed, as in X
                    y = y.copy()
                    y.sum_duplicates()
            else:
                y = (block.astype(np.float32) @ M).tocsr()
                y.sum_duplicates()
            fps[pos:pos + k] = cell_fingerprints(y.indptr, y.indices, y.data, fp_hash, keep=fp_keep)
            pos += k
        if pos != n:
            raise IngestError(f"truncated source: read {pos} of {n} cells")
        pct = np.divide(mtc * 100.0, total, out=np.zeros(n), where=total > 0).astype(np.float32)
        obs, extra = _build_obs(req, sel_obs, organism_label)
        obs["total_counts"] = total
        obs["n_genes_by_counts"] = ngenes
        obs["pct_counts_mt"] = pct
        obs["qc_pass"] = req.qc.passes(total, ngenes, pct)
        src = req.source.removeprefix("file://")
        sha = sha256_of(src) if "://" not in src else ""
        prov = reader.provenance()
        report = {"dataset_id": req.dataset_id, "n_cells": n, "gene_mapping": mapping.report,
                  "qc_pass_fraction": float(obs["qc_pass"].mean())}
        return Prepared(req, reader, rows, obs, extra, mapping, organism_label, sha, prov, table.genes, report,
                        fingerprints=fps, source_format=reader.format)
    except BaseException:
        reader.close()
        raise


def _var_rows(p: Prepared, new_ids: list[str]) -> pd.DataFrame:
    g = p.table_genes.reindex(new_ids)
    src_name = pd.Series({f: n.strip() for f, n in zip(p.mapping.feature_id, p.mapping.source_names) if f is not None})
    name = g["feature_name"].fillna(src_name.reindex(new_ids)).fillna(pd.Series(new_ids, index=new_ids))
    return pd.DataFrame({"feature_id": new_ids, "feature_name": name.to_numpy(),
                         "feature_biotype": g["feature_biotype"].fillna("gene").to_numpy(),
                         "species": p.organism_label})


def _catalog_row(p: Prepared, ds_jid: int, start: int, status: str) -> dict:
    from atlasmix import __version__

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


def _write_X(store: Store, p: Prepared, ds_jid: int, start: int, var_jid_of: dict[str, int], chunk_size: int,
             progress: Callable | None) -> pa.Table | None:
    """Write a dataset's X chunks (and its x layout); return the last TileDB chunk unwritten (see :func:`ingest`)."""
    targets = sorted(p.mapping.target_ids, key=var_jid_of.__getitem__)  # ascending global joinid
    local = {f: i for i, f in enumerate(targets)}
    M = p.mapping.matrix(local, len(targets))
    gcols = np.array([var_jid_of[f] for f in targets], dtype=np.int64)
    uri = f"{store.uri}/ms/{S.MEASUREMENT}/X/{S.X_LAYER}"
    import tiledbsoma as soma

    from atlasmix.store import xlayout

    # the read-optimised copy of X (atlasmix.store.xlayout), written in the same pass: local stores only
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
            _checkpoint("x_chunk")
            if progress:
                progress(p.req.dataset_id, "write", done, len(p.rows))
    if layout is not None:
        layout.close()
    return pending  # written by the caller, serially, so X is consolidated once no writer runs


def _write_rest(store: Store, p: Prepared, ds_jid: int, start: int, var_jid_of: dict[str, int]) -> None:
    import tiledbsoma as soma

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
    _checkpoint("before_obs")
    obs = p.obs.copy()
    obs.insert(0, "soma_joinid", joinids)
    t = pa.Table.from_pandas(obs, preserve_index=False)  # categoricals -> dictionary (enumeration) columns
    sch = pa.schema([pa.field("soma_joinid", pa.int64(), nullable=False)] + list(S.OBS_SCHEMA))
    t = pa.table({f.name: t[f.name].cast(f.type) for f in sch})
    with soma.DataFrame.open(f"{store.uri}/obs", "w", context=store.context) as df:
        df.write(t, platform_config=S.WRITE_LAST)  # one write = one fragment: the dataset's cells appear at once
    _checkpoint("before_commit")


def _check_duplicate_cells(store: Store, prepared: list[Prepared], retiring: set[int]) -> None:
    """Find cells whose counts equal those of cells already stored, of an earlier dataset of this
    ingest, or of another cell of the same dataset (by fingerprint); record them in the report and
    the catalog provenance, and refuse where ``on_duplicate_cells="refuse"`` (before any write).

    Raises
    ------
    IngestError
        A dataset with ``on_duplicate_cells="refuse"`` has duplicated cells.
    """
    found = duplicates_in_store(store, [p.fingerprints for p in prepared], exclude=retiring)
    for k, p in enumerate(prepared):
        by = dict(found["by_dataset"][k])
        example = {d: f"{p.obs['obs_id'].iloc[i]!r} = {o!r}" for d, (i, o) in found["example"][k].items()}
        for q in prepared[:k]:
            n, i, j = first_match(p.fingerprints, q.fingerprints)
            if n:
                by[q.req.dataset_id] = n
                example[q.req.dataset_id] = f"{p.obs['obs_id'].iloc[i]!r} = {q.obs['obs_id'].iloc[j]!r}"
        within = duplicates_within(p.fingerprints)
        rec = {"by_dataset": by, "within_dataset": within, "unchecked_datasets": found["unchecked"],
               "fingerprinted_cells": int(np.count_nonzero(p.fingerprints))}
        p.report["duplicate_cells"] = rec
        p.provenance = p.provenance | {"duplicate_cells": rec}
        if p.req.on_duplicate_cells == "refuse" and (by or within):
            what = "; ".join(f"{n:,} equal cells of dataset {d!r} (e.g. {example[d]})" for d, n in by.items())
            if within:
                what = (what + "; " if what else "") + f"{within:,} repeat other cells of the same source"
            raise IngestError(f"dataset {p.req.dataset_id!r}: of its {len(p.rows):,} cells, {what} (same count on "
                              "every gene); refusing (--on-duplicate-cells warn ingests and records them)")


def _run_parallel(fns: list[Callable], parallel: bool) -> list:
    if not parallel or len(fns) < 2:
        return [f() for f in fns]
    import dask

    return list(dask.compute(*[dask.delayed(f)() for f in fns], scheduler="threads"))


# ---------------------------------------------------------------------- dask.distributed workers
def _prepare_task(req: DatasetRequest, chunk_size: int, store_uri: str) -> Prepared:
    """Worker side of a distributed ingest: :func:`prepare` in the worker process; the reader is
    closed and dropped (the writer reopens the source), the rest travels back to the client."""
    store = Store(store_uri)
    p = prepare(req, chunk_size, context=store.context)
    p.reader.close()
    p.reader = None
    return p


def _write_X_task(store_uri: str, p: Prepared, ds_jid: int, start: int, var_jid_of: dict[str, int],
                  chunk_size: int) -> pa.Table | None:
    """Worker side of a distributed ingest: one dataset's X (TileDB fragments of its own joinid
    range, and its x layout group), read again from its source. Idempotent, so dask may rerun it
    on another worker after a worker died: X does not allow duplicate coordinates (a second write
    of a cell supersedes the first) and the layout group is rewritten from scratch."""
    store = Store(store_uri)
    p.reader = _open_source(p.req, store.context)
    try:
        return _write_X(store, p, ds_jid, start, var_jid_of, chunk_size, None)
    finally:
        p.reader.close()
        p.reader = None


def _on_workers(client, fn, args: list[tuple], progress: Callable | None = None, phase: str = "",
                names: list[str] | None = None) -> list:
    """Run ``fn(*a)`` for every ``a`` on the dask.distributed workers of ``client``; results in order.
    The first failure cancels the rest and is raised (a worker's IngestError travels back as such)."""
    from distributed import KilledWorker, as_completed

    futs = [client.submit(fn, *a, pure=False) for a in args]
    index = {f.key: i for i, f in enumerate(futs)}
    try:
        for f in as_completed(futs):
            if f.status == "error":
                try:
                    f.result()  # raises the worker's exception
                except KilledWorker:
                    what = names[index[f.key]] if names else f.key
                    raise IngestError(f"dask workers died running {fn.__name__.strip('_')} of {what!r} (dask's "
                                      "allowed-failures retries spent); nothing was committed: rerun the ingest") from None
            if progress and names:
                progress(names[index[f.key]], phase, 1, 1)
        return client.gather(futs)
    except BaseException:
        client.cancel(futs)
        raise


def ingest(store_uri: str | Store, requests: list[DatasetRequest], chunk_size: int = 8192,
           parallel: bool = True, progress: Callable | None = None, on_wait: Callable | None = None,
           client=None) -> list[dict]:
    """Ingest one or more datasets into a store; all of them become visible together.

    Parameters
    ----------
    store_uri : str or Store
        The store (must exist: ``atlasmix store init``).
    requests : list of DatasetRequest
        Datasets to add; ids must be unique among themselves.
    chunk_size : int
        Cells per read/write chunk (memory ~ chunk_size x genes-per-cell x 16 bytes).
    parallel : bool
        Prepare and write several datasets concurrently (dask threads; TileDB releases the GIL).
    progress : callable, optional
        ``progress(dataset_id, phase, done, total)``.
    client : distributed.Client, optional
        Run validation, QC, gene mapping, fingerprints and X writes in the worker processes of a
        dask.distributed cluster (one task per dataset and phase; the sources and the store must be
        reachable from the workers at the same paths or URIs). The catalog, var, presence and obs
        writes and the commit stay in this process, under the store's write lock, so crash safety
        is that of a serial ingest; a write task lost with its worker is rerun by dask (see
        :func:`_write_X_task`).

    Returns
    -------
    list of dict
        Per dataset: ``dataset_id``, ``n_cells``, ``gene_mapping`` report, ``qc_pass_fraction``,
        ``obs_joinid_range``, ``duplicate_cells`` (``by_dataset``: {dataset_id: cells whose counts
        equal cells of that stored or earlier-ingested dataset}, ``within_dataset``,
        ``unchecked_datasets``, ``fingerprinted_cells``; see :mod:`atlasmix.store.fingerprint`).

    Raises
    ------
    IngestError
        Any refused input (nothing is written), a dataset id that already exists without ``replace``,
        copies of stored cells with ``on_duplicate_cells="refuse"``.
    """
    store = store_uri if isinstance(store_uri, Store) else Store(store_uri)
    ids = [r.dataset_id for r in requests]
    if len(set(ids)) != len(ids):
        raise IngestError(f"dataset ids repeat in one ingest: {sorted({i for i in ids if ids.count(i) > 1})}")
    existing = set(store.catalog()["dataset_id"])
    for r in requests:  # early check (repeated under the lock)
        if r.dataset_id in existing and not r.replace:
            raise IngestError(f"dataset {r.dataset_id!r} already exists in the store; pass --replace to replace it")

    def prep(r):
        p = prepare(r, chunk_size, context=store.context)
        if progress:
            progress(r.dataset_id, "validated", len(p.rows), len(p.rows))
        return p

    prepared: list[Prepared] = []
    try:
        if client is not None:
            prepared = _on_workers(client, _prepare_task, [(r, chunk_size, store.uri) for r in requests], progress,
                                   "validated", [r.dataset_id for r in requests])
        else:
            prepared = _run_parallel([lambda r=r: prep(r) for r in requests], parallel)
        # copies of stored cells: checked before the lock (a refusal leaves every file as it was), and
        # again under it if another ingest completed datasets in between
        cat = store.catalog()
        ids_checked = set(cat.index)
        _check_duplicate_cells(store, prepared, {int(j) for j, d in zip(cat.index, cat["dataset_id"])
                                                 if any(p.req.replace and p.req.dataset_id == d for p in prepared)})
        with store.write_lock(on_wait=on_wait):
            store.recover()
            cat = store.catalog()
            old = {}
            for p in prepared:
                hit = cat[cat["dataset_id"] == p.req.dataset_id]
                if len(hit) and not p.req.replace:
                    raise IngestError(f"dataset {p.req.dataset_id!r} already exists in the store; pass --replace")
                if len(hit):
                    old[p.req.dataset_id] = (int(hit.index[0]), hit.iloc[0].to_dict())
            if set(cat.index) != ids_checked:
                _check_duplicate_cells(store, prepared, {jid for jid, _ in old.values()})
            start = store.next_obs_joinid()
            ds_jid = store.next_dataset_joinid()
            var = store.var()
            var_jid_of = dict(zip(var["feature_id"], var.index.astype(int)))
            new_var = []
            for p in prepared:
                new = [f for f in p.mapping.target_ids if f not in var_jid_of]
                if new:
                    rows = _var_rows(p, new)
                    base = len(var_jid_of)
                    for i, f in enumerate(new):
                        var_jid_of[f] = base + i
                    rows.insert(0, "soma_joinid", np.arange(base, base + len(new), dtype=np.int64))
                    new_var.append(rows)
            plan = []
            for p in prepared:
                plan.append((p, ds_jid, start))
                start += len(p.rows)
                ds_jid += 1
            import tiledbsoma as soma
            import tiledbsoma.io as sio

            sio.resize_experiment(store.uri, nobs=max(start, 1), nvars={S.MEASUREMENT: max(len(var_jid_of), 1)},
                                  context=store.context)
            with soma.SparseNDArray.open(f"{store.uri}/ms/{S.MEASUREMENT}/{S.PRESENCE}", "w",
                                         context=store.context) as P:
                P.resize((max(ds_jid, P.shape[0]), max(len(var_jid_of), P.shape[1])))
            if new_var:
                t = pa.Table.from_pandas(pd.concat(new_var), preserve_index=False,
                                         schema=pa.schema([pa.field("soma_joinid", pa.int64(), nullable=False)]
                                                          + list(S.VAR_SCHEMA)))
                with soma.DataFrame.open(f"{store.uri}/ms/{S.MEASUREMENT}/var", "w", context=store.context) as df:
                    df.write(t, platform_config=S.WRITE_LAST)
            store.write_catalog_rows([_catalog_row(p, j, s, S.STATUS_INGESTING) for p, j, s in plan])
            _checkpoint("after_catalog")
            if client is not None:
                import dataclasses

                # the writers need the request, rows and gene mapping, not the obs or fingerprints
                slim = [dataclasses.replace(p, obs=None, extra=None, fingerprints=None, table_genes=None)
                        for p, _, _ in plan]
                last = _on_workers(client, _write_X_task,
                                   [(store.uri, q, j, s, var_jid_of, chunk_size) for q, (_, j, s) in zip(slim, plan)],
                                   progress, "written", [p.req.dataset_id for p, _, _ in plan])
            else:
                last = _run_parallel([lambda a=a: _write_X(store, a[0], a[1], a[2], var_jid_of, chunk_size,
                                                           progress) for a in plan], parallel)
            last = [t for t in last if t is not None]
            with soma.SparseNDArray.open(f"{store.uri}/ms/{S.MEASUREMENT}/X/{S.X_LAYER}", "w",
                                         context=store.context) as X:
                for i, t in enumerate(last):  # the final write also consolidates X's fragment metadata
                    X.write(t, platform_config=S.WRITE_LAST_SORTED if i == len(last) - 1 else
                            soma.TileDBWriteOptions(sort_coords=False))
            for p, j, s in plan:
                _write_rest(store, p, j, s, var_jid_of)
            commit = [_catalog_row(p, j, s, S.STATUS_COMPLETE) for p, j, s in plan]
            commit += [row | {"soma_joinid": jid, "status": S.STATUS_REPLACED} for jid, row in old.values()]
            store.write_catalog_rows(commit)  # one write: the datasets become visible atomically
            _checkpoint("after_commit")
            if old:
                store.recover()  # deletes the replaced datasets' cells
        return [p.report | {"obs_joinid_range": [s, s + len(p.rows)]} for p, j, s in plan]
    finally:
        for p in prepared:
            if p.reader is not None:
                p.reader.close()
