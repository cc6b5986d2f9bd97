"""Prepare one dataset for the store, writing nothing: validate, map genes, compute QC and fingerprints.

*Prepare* (no store writes; several datasets in parallel with dask threads): open the source, apply
the obs filter, map genes (:mod:`atlasmix.ingest.harmonize`), then stream X once to validate every
value (finite, non-negative, integer unless ``assume_counts``) and compute the per-cell QC metrics.
Any problem raises :class:`~atlasmix.errors.IngestError` here, so refused input never touches the store.

QC follows scanpy's ``calculate_qc_metrics`` (``total_counts``, ``n_genes_by_counts``,
``pct_counts_mt`` over all genes of the source, mitochondrial = symbol starting ``MT-``); the default
policy is the scFM-datamix filter (``pct_counts_mt < 10`` and ``total_counts > 1000``). Cells are
flagged in ``qc_pass``, never dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from atlasmix._files import sha256_of
from atlasmix.errors import IngestError
from atlasmix.ingest.harmonize import GeneMapping, check_usable, harmonize_genes
from atlasmix.ingest.obs import build_obs, select_rows
from atlasmix.ingest.readers import Reader, detect_format, open_reader, read_obs_table
from atlasmix.ingest.request import DatasetRequest
from atlasmix.store.fingerprint import cell_fingerprints, gene_hashes
from atlasmix.store.genes import ORGANISMS, gene_table, mitochondrial_mask, normalize_organism

DATASET_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


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


def open_source(req: DatasetRequest, context=None) -> Reader:
    """Open the request's source with the reader of its format (detected when not given).

    Raises
    ------
    IngestError
        As :func:`atlasmix.ingest.readers.open_reader`.
    """
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
    reader = open_source(req, context)
    try:
        src_obs = reader.obs()
        if req.obs_table:
            side = read_obs_table(req.obs_table)
            src_obs = src_obs.join(side, how="left", rsuffix="_obs_table")
        is_soma = reader.format == "soma"
        rows = np.arange(len(src_obs), dtype=np.int64) if is_soma else select_rows(src_obs, req.obs_filter)
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
        obs, extra = build_obs(req, sel_obs, organism_label)
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

