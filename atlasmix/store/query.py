"""SQL over obs with duckdb, locked down, and export of a query to h5ad.

duckdb runs with ``enable_external_access=false`` (no files, no network, no extensions) and
``lock_configuration=true`` (a query cannot switch that back on); the user text is a single
predicate placed inside ``SELECT soma_joinid FROM obs WHERE (...)``, and statements are refused.
Every query runs with a memory limit, a thread limit, no spilling to disk and a wall-clock limit
that interrupts it (:data:`SQL_MEMORY_LIMIT`, :data:`SQL_THREADS`, :data:`SQL_TIMEOUT_S`), and SQL
whose result changes between runs (sampling, random numbers, clocks, LIMIT without ORDER BY) is
refused, so that the same spec on the same store always gives the same manifest
(``tests/test_sql_hostile.py`` holds the corpus of refused queries).
"""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import numpy as np

from atlasmix.errors import AtlasmixError
from atlasmix.store import schema as S
from atlasmix.store.store import Store

FORBIDDEN = re.compile(r";|\b(COPY|ATTACH|DETACH|INSTALL|LOAD|PRAGMA|SET|RESET|CREATE|DROP|ALTER|INSERT|UPDATE|DELETE|"
                       r"EXPORT|IMPORT|CALL|CHECKPOINT|VACUUM|USE)\b|\b(read_\w+|glob|sniff_csv|parquet_\w+|"
                       r"iceberg_\w+|delta_scan|query|query_table|getenv)\s*\(|\b(FROM|JOIN)\s+'", re.IGNORECASE)
#: SQL whose result changes between runs on the same data: sampling, random numbers, clocks, and row
#: choices that depend on the (multi-threaded) scan order.
NONDETERMINISTIC = re.compile(
    r"\bUSING\s+SAMPLE\b|\bTABLESAMPLE\b|\b(reservoir|bernoulli)\b|"
    r"\b(random|setseed|uuid|gen_random_uuid|uuidv4|uuidv7|now|today|get_current_time|get_current_timestamp|"
    r"current_localtimestamp|current_localtime|transaction_timestamp|epoch_ms_now|any_value|arbitrary|first|last|"
    r"reservoir_quantile|approx_quantile|approx_count_distinct|approx_top_k)\s*\(|"
    r"\bcurrent_(timestamp|date|time)\b", re.IGNORECASE)
_LITERAL = re.compile(r"'(?:[^']|'')*'")
_COMMENT = re.compile(r"--[^\n]*|/\*.*?\*/", re.DOTALL)
_WINDOW = re.compile(r"\bOVER\s*\(([^()]*)\)", re.IGNORECASE)

#: Limits of every duckdb query over obs (environment variables override them).
SQL_MEMORY_LIMIT = "2GB"   # ATLASMIX_SQL_MEMORY_LIMIT
SQL_THREADS = 2            # ATLASMIX_SQL_THREADS
SQL_TIMEOUT_S = 120.0      # ATLASMIX_SQL_TIMEOUT_S


def _limits() -> tuple[str, int, float]:
    import os

    return (os.environ.get("ATLASMIX_SQL_MEMORY_LIMIT", SQL_MEMORY_LIMIT),
            int(os.environ.get("ATLASMIX_SQL_THREADS", SQL_THREADS)),
            float(os.environ.get("ATLASMIX_SQL_TIMEOUT_S", SQL_TIMEOUT_S)))


def safe_connection() -> duckdb.DuckDBPyConnection:
    """An in-memory duckdb connection for user SQL: no file or network access, no spilling to disk,
    a memory limit and a thread limit (:data:`SQL_MEMORY_LIMIT`, :data:`SQL_THREADS`), configuration
    locked so that a query cannot lift any of them."""
    mem, threads, _ = _limits()
    return duckdb.connect(config={"enable_external_access": False, "memory_limit": mem, "threads": threads,
                                  "temp_directory": "", "lock_configuration": True})


def _scan_text(text: str) -> str:
    """``text`` without comments and string literals (so that ``cell_type = 'random'`` is not a call)."""
    return _LITERAL.sub("''", _COMMENT.sub(" ", text))


def check_sql(text: str, what: str = "query") -> None:
    """Refuse statements, file/network access and nondeterministic SQL in user text.

    Scanned after removing comments and string literals. Refused: ``;`` (several statements),
    DDL/DML, ``COPY``/``ATTACH``/``INSTALL``/``LOAD``/``PRAGMA``/``SET``/``RESET``/``USE``, table
    functions that read files or run SQL strings (``read_*``, ``glob``, ``sniff_csv``, ``parquet_*``,
    ``query``, ``query_table``...), ``FROM 'file'``; and anything whose result changes between runs
    (:data:`NONDETERMINISTIC`: ``USING SAMPLE``, ``TABLESAMPLE``, ``reservoir``, ``random()``,
    ``setseed()``, ``uuid()``, clocks, ``any_value``/``first``/``last``, approximate aggregates),
    ``LIMIT``/``OFFSET`` without ``ORDER BY`` and window functions without ``ORDER BY``.

    Raises
    ------
    AtlasmixError
        One line naming ``what`` and the refused text.
    """
    bare = _scan_text(text)
    m = FORBIDDEN.search(bare)
    if m:
        raise AtlasmixError(f"refused {what}: {m.group(0).strip()!r} is not allowed (read-only SELECT over obs only)")
    m = NONDETERMINISTIC.search(bare)
    why = "changes between runs, so the manifest would not be reproducible; use a strategy and the spec seed to sample"
    if m:
        raise AtlasmixError(f"refused {what}: {m.group(0).strip()!r} {why}")
    if re.search(r"\b(LIMIT|OFFSET)\b", bare, re.IGNORECASE) and not re.search(r"\bORDER\s+BY\b", bare, re.IGNORECASE):
        raise AtlasmixError(f"refused {what}: LIMIT/OFFSET without ORDER BY picks rows in scan order, which "
                            "changes between runs; add ORDER BY (e.g. soma_joinid)")
    for w in _WINDOW.finditer(bare):
        if not re.search(r"\bORDER\s+BY\b", w.group(1), re.IGNORECASE):
            raise AtlasmixError(f"refused {what}: window {w.group(0)!r} without ORDER BY numbers rows in scan "
                                "order, which changes between runs")


def run_bounded(con: duckdb.DuckDBPyConnection, fn, what: str):
    """Run ``fn()`` (a duckdb call on ``con``) under the wall-clock limit :data:`SQL_TIMEOUT_S`.

    The query is interrupted (``con.interrupt()``) when the time is up; running out of the
    connection's memory limit is reported the same way.

    Raises
    ------
    AtlasmixError
        Interrupted at the time limit, or over the memory limit: one line naming ``what``, the limit
        and the environment variable that raises it.
    """
    import threading

    mem, _, timeout = _limits()
    timer = threading.Timer(timeout, con.interrupt)
    timer.daemon = True
    timer.start()
    try:
        return fn()
    except duckdb.InterruptException:
        raise AtlasmixError(f"{what}: stopped after {timeout:g} s (the query time limit; ATLASMIX_SQL_TIMEOUT_S "
                            "raises it)") from None
    except duckdb.OutOfMemoryException:
        raise AtlasmixError(f"{what}: stopped at the {mem} memory limit of a query (ATLASMIX_SQL_MEMORY_LIMIT "
                            "raises it)") from None
    finally:
        timer.cancel()


def select_joinids(store: Store, where: str) -> np.ndarray:
    """soma_joinids of complete cells matching the SQL predicate ``where`` over obs.

    Only obs columns named in the predicate are read.

    Returns
    -------
    numpy.ndarray of int64, sorted.

    Raises
    ------
    AtlasmixError
        Refused SQL, or duckdb rejected the predicate (unknown column, syntax).
    """
    check_sql(where, "--where")
    names = [f.name for f in S.OBS_SCHEMA]
    cols = [c for c in names if re.search(rf"\b{re.escape(c)}\b", where)]
    obs = store.obs(cols)
    con = safe_connection()
    try:
        con.register("obs", obs)
        res = run_bounded(con, lambda: con.execute(f"SELECT soma_joinid FROM obs WHERE ({where}\n) "
                                                   "ORDER BY soma_joinid").fetchnumpy(), "--where")
    except duckdb.Error as e:
        raise AtlasmixError(f"bad --where {where!r}: {str(e).splitlines()[0]}") from e
    finally:
        con.close()
    return np.asarray(res["soma_joinid"], dtype=np.int64)


def export_h5ad(store: Store, where: str, out: str | Path, genes: str = "measured", chunk_size: int = 8192) -> dict:
    """Write the cells matching ``where`` to an h5ad file, streaming X in chunks.

    Parameters
    ----------
    store : Store
    where : str
        SQL predicate over obs (duckdb), e.g. ``"dataset_id = 'pbmc3k' AND qc_pass"``.
    out : path
        Output ``.h5ad``: X = CSR float32 raw counts; obs = store obs (index ``obs_id``, plus
        ``soma_joinid``); var = store var (index ``feature_id``).
    genes : {"measured", "all"}
        ``measured``: genes present in at least one selected dataset; ``all``: every store gene.

    Returns
    -------
    dict
        ``n_cells``, ``n_genes``, ``path``.

    Raises
    ------
    AtlasmixError
        Refused/bad SQL, no matching cells, or ``out`` exists.
    """
    out = Path(out)
    if out.exists():
        raise AtlasmixError(f"{out} exists; refusing to overwrite")
    ids = select_joinids(store, where)
    if len(ids) == 0:
        raise AtlasmixError(f"no cells match {where!r}")
    obs = store.obs().to_pandas()
    obs = obs[obs["soma_joinid"].isin(ids)].sort_values("soma_joinid")
    var = store.var()
    if genes == "measured":
        cat = store.catalog()
        ds = cat.index[cat["dataset_id"].isin(obs["dataset_id"].unique())].to_numpy()
        pres = store.presence()
        keep = np.asarray(pres[ds].sum(axis=0)).ravel() > 0
        var = var.iloc[np.flatnonzero(keep[: len(var)])]
    var_ids = var.index.to_numpy(dtype=np.int64)
    obs_df = obs.set_index("obs_id")
    obs_df.index.name = None
    var_df = var.reset_index().set_index("feature_id")
    var_df.index.name = None
    tmp = out.with_name(out.name + ".partial")
    try:
        _write(tmp, obs_df, var_df, store.iter_X(ids, var_ids, chunk_size))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.rename(out)
    return {"n_cells": int(len(ids)), "n_genes": int(len(var_ids)), "path": str(out)}


def _write(path: Path, obs_df, var_df, chunks) -> None:
    import anndata as ad
    import h5py

    with h5py.File(path, "w") as f:
        ad.io.write_elem(f, "obs", obs_df)
        ad.io.write_elem(f, "var", var_df)
        for k in ("uns", "obsm", "varm", "obsp", "varp", "layers"):
            ad.io.write_elem(f, k, {})
        first = True
        for _, m in chunks:
            if first:
                ad.io.write_elem(f, "X", m)
                X = ad.io.sparse_dataset(f["X"])
                first = False
            else:
                X.append(m)
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"

