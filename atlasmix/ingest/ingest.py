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

import dataclasses
from collections.abc import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import tiledbsoma as soma
import tiledbsoma.io as sio

from atlasmix.errors import IngestError
from atlasmix.ingest.prepare import Prepared, open_source, prepare
from atlasmix.ingest.request import DatasetRequest
from atlasmix.ingest.request import QCPolicy as QCPolicy  # re-exported: the package and plan.py import it here
from atlasmix.ingest.write import catalog_row, checkpoint, var_rows, write_rest, write_x
from atlasmix.store import Store
from atlasmix.store import schema as S
from atlasmix.store.fingerprint import duplicates_in_store, duplicates_within, first_match


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
    p.reader = open_source(p.req, store.context)
    try:
        return write_x(store, p, ds_jid, start, var_jid_of, chunk_size, None)
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
                    rows = var_rows(p, new)
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
            store.write_catalog_rows([catalog_row(p, j, s, S.STATUS_INGESTING) for p, j, s in plan])
            checkpoint("after_catalog")
            if client is not None:
                # the writers need the request, rows and gene mapping, not the obs or fingerprints
                slim = [dataclasses.replace(p, obs=None, extra=None, fingerprints=None, table_genes=None)
                        for p, _, _ in plan]
                last = _on_workers(client, _write_X_task,
                                   [(store.uri, q, j, s, var_jid_of, chunk_size) for q, (_, j, s) in zip(slim, plan)],
                                   progress, "written", [p.req.dataset_id for p, _, _ in plan])
            else:
                last = _run_parallel([lambda a=a: write_x(store, a[0], a[1], a[2], var_jid_of, chunk_size,
                                                           progress) for a in plan], parallel)
            last = [t for t in last if t is not None]
            with soma.SparseNDArray.open(f"{store.uri}/ms/{S.MEASUREMENT}/X/{S.X_LAYER}", "w",
                                         context=store.context) as X:
                for i, t in enumerate(last):  # the final write also consolidates X's fragment metadata
                    X.write(t, platform_config=S.WRITE_LAST_SORTED if i == len(last) - 1 else
                            soma.TileDBWriteOptions(sort_coords=False))
            for p, j, s in plan:
                write_rest(store, p, j, s, var_jid_of)
            commit = [catalog_row(p, j, s, S.STATUS_COMPLETE) for p, j, s in plan]
            commit += [row | {"soma_joinid": jid, "status": S.STATUS_REPLACED} for jid, row in old.values()]
            store.write_catalog_rows(commit)  # one write: the datasets become visible atomically
            checkpoint("after_commit")
            if old:
                store.recover()  # deletes the replaced datasets' cells
        return [p.report | {"obs_joinid_range": [s, s + len(p.rows)]} for p, j, s in plan]
    finally:
        for p in prepared:
            if p.reader is not None:
                p.reader.close()
