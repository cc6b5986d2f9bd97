"""SQL over obs with duckdb, locked down, and export of a query to h5ad.

duckdb runs with ``enable_external_access=false`` (no files, no network, no extensions) and
``lock_configuration=true`` (a query cannot switch that back on); the user text is a single
predicate placed inside ``SELECT soma_joinid FROM obs WHERE (...)``, and statements are refused.
"""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import numpy as np

from atlasmix.errors import AtlasmixError
from atlasmix.store import schema as S
from atlasmix.store.store import Store

FORBIDDEN = re.compile(r";|\b(COPY|ATTACH|DETACH|INSTALL|LOAD|PRAGMA|SET|CREATE|DROP|ALTER|INSERT|UPDATE|DELETE|"
                       r"EXPORT|IMPORT|CALL)\b|read_\w+\s*\(|\bglob\s*\(", re.IGNORECASE)


def safe_connection() -> duckdb.DuckDBPyConnection:
    """An in-memory duckdb connection with external access disabled and its configuration locked."""
    return duckdb.connect(config={"enable_external_access": False, "lock_configuration": True})


def check_sql(text: str, what: str = "query") -> None:
    """Refuse statements and file/network access in user SQL.

    Raises
    ------
    AtlasmixError
        ``text`` contains ``;``, DDL/DML, ``COPY``/``ATTACH``/``INSTALL``/``LOAD``/``PRAGMA``/``SET`` or a
        ``read_*(...)``/``glob(...)`` table function.
    """
    m = FORBIDDEN.search(text)
    if m:
        raise AtlasmixError(f"refused {what}: {m.group(0).strip()!r} is not allowed (read-only SELECT over obs only)")


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
        res = con.execute(f"SELECT soma_joinid FROM obs WHERE ({where}) ORDER BY soma_joinid").fetchnumpy()
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

