"""A source's obs as the store's: the ``--obs-filter`` row selection, the obs columns and the side table.

Column precedence: ``--set`` / ``--tissue`` over ``--obs-map`` over a source column of the same name
over the default; source columns not mapped go to the obs side table (``obs_extra``).
"""

from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd

from atlasmix.errors import IngestError
from atlasmix.ingest.request import DatasetRequest
from atlasmix.store import schema as S
from atlasmix.store.query import check_sql, run_bounded, safe_connection

TRUE_STRINGS = {"true", "t", "yes", "y", "1", "malignant", "tumor", "tumour", "cancer"}


def select_rows(src_obs: pd.DataFrame, obs_filter: str | None) -> np.ndarray:
    """Source rows passing ``--obs-filter`` (a duckdb SQL condition over the source obs and ``barcode``).

    Returns
    -------
    numpy.ndarray of int64
        Ascending row positions; all rows when ``obs_filter`` is empty.

    Raises
    ------
    IngestError
        A filter duckdb refuses.
    AtlasmixError
        A filter the SQL sandbox rejects, or one that runs too long
        (:func:`atlasmix.store.query.check_sql`, :func:`~atlasmix.store.query.run_bounded`).
    """
    if not obs_filter:
        return np.arange(len(src_obs), dtype=np.int64)
    df = src_obs.copy()
    for c in df.columns:
        if isinstance(df[c].dtype, pd.CategoricalDtype):
            df[c] = df[c].astype(str)
    df["__row"] = np.arange(len(df), dtype=np.int64)
    df = df.reset_index(names="barcode")
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


def build_obs(req: DatasetRequest, src_obs: pd.DataFrame, organism_label: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The store obs columns of the selected cells, and the source columns left for the side table.

    Parameters
    ----------
    req : DatasetRequest
        Its ``obs_map``, ``set`` and ``tissue`` say where each settable column comes from.
    src_obs : pandas.DataFrame
        The selected cells' source obs (index: barcodes).
    organism_label : str
        The ``organism`` value of every cell.

    Returns
    -------
    obs : pandas.DataFrame
        One row per cell (``obs_id`` = ``dataset_id:barcode``), string columns categorical, no
        ``soma_joinid`` and no QC columns yet.
    extra : pandas.DataFrame
        The unmapped source columns, as str, int64, float64 or bool (``soma_joinid`` renamed
        ``source_soma_joinid``).

    Raises
    ------
    IngestError
        ``--obs-map`` or ``--set`` naming a column that is not settable, or a source column that
        does not exist.
    """
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

