"""Property-based ingest (hypothesis): generated AnnData files, h5ad and zarr, modern and pre-0.7
encodings, with random shapes (empty included), dtypes, sparse/dense X, NaN/inf/negative/non-integer
values, duplicate barcodes and genes and odd obs columns. Invariant: either a clean ingest whose X
round-trips exactly, or a one-line refusal (AtlasmixError) with the store byte-identical.

CI runs a few dozen examples; ``benchmarks/fuzz_ingest.py --examples N`` runs the long version."""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atlasmix.errors import AtlasmixError
from atlasmix.ingest import DatasetRequest, ingest
from atlasmix.store import Store
from tests.conftest import tree_digest
from tests.test_readers_legacy import _by_symbol, write_legacy_anndata

SYMBOLS = ["CD3E", "MS4A1", "LYZ", "NKG7", "GNLY", "ACTB", "CD14", "MT-CO1", "HBB", "PTPRC"]
DTYPES = ["int32", "int64", "uint16", "float32", "float64"]
BAD = ["none", "nan", "inf", "negative", "fraction"]
OBS_KINDS = ["none", "int", "float", "bool", "str", "category", "mixed_object"]


@st.composite
def anndata_files(draw):
    n = draw(st.integers(0, 25))
    genes = draw(st.lists(st.sampled_from(SYMBOLS), min_size=1, max_size=8))  # repeats: duplicate var names
    X = draw(st.lists(st.integers(0, 40), min_size=n * len(genes), max_size=n * len(genes)))
    X = np.asarray(X, dtype=np.float64).reshape(n, len(genes))
    bad = draw(st.sampled_from(BAD)) if n else "none"
    if bad != "none":
        i, j = draw(st.integers(0, n - 1)), draw(st.integers(0, len(genes) - 1))
        X[i, j] = {"nan": np.nan, "inf": np.inf, "negative": -3.0, "fraction": 2.5}[bad]
    dtype = draw(st.sampled_from(DTYPES)) if bad == "none" else "float32"
    layout = draw(st.sampled_from(["csr", "csc", "dense"]))
    fmt = draw(st.sampled_from(["h5ad", "zarr", "legacy_h5ad", "legacy_zarr"]))
    dup_barcodes = draw(st.booleans()) and n > 1
    obs_kind = draw(st.sampled_from(OBS_KINDS))
    return dict(X=X, genes=genes, bad=bad, dtype=dtype, layout=layout, fmt=fmt, dup_barcodes=dup_barcodes,
                obs_kind=obs_kind)


def write(case: dict, path: Path) -> Path:
    X, genes = case["X"], case["genes"]
    n = X.shape[0]
    if case["fmt"].startswith("legacy"):
        fmt = case["fmt"].split("_")[1]
        path = path.with_suffix("." + fmt)
        write_legacy_anndata(path, fmt, X.astype(np.float32), genes)
        return path
    barcodes = [f"bc{i}" for i in range(n)]
    if case["dup_barcodes"]:
        barcodes[-1] = barcodes[0]
    obs = pd.DataFrame(index=pd.Index(barcodes))
    k = case["obs_kind"]
    if k != "none":
        col = {"int": np.arange(n), "float": np.linspace(0, 1, n), "bool": np.arange(n) % 2 == 0,
               "str": [f"t{i % 3}" for i in range(n)], "category": pd.Categorical([f"c{i % 2}" for i in range(n)]),
               "mixed_object": np.array([(i if i % 2 else f"s{i}") for i in range(n)], dtype=object).astype(str)}[k]
        obs["extra"] = col
    Xd = X.astype(case["dtype"]) if case["bad"] == "none" else X.astype(np.float32)
    Xm = {"csr": sp.csr_matrix, "csc": sp.csc_matrix, "dense": np.asarray}[case["layout"]](Xd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = ad.AnnData(X=Xm, obs=obs, var=pd.DataFrame(index=pd.Index(genes)))
    path = path.with_suffix(".h5ad" if case["fmt"] == "h5ad" else ".zarr")
    a.write_h5ad(path) if case["fmt"] == "h5ad" else a.write_zarr(path)
    return path


def check_case(case: dict, store: Store, workdir: Path, did: str) -> str:
    """Ingest one generated file and assert the invariant; return the outcome ('ok' or the refusal)."""
    src = write(case, workdir / did)
    before = tree_digest(Path(store.uri))
    try:
        ingest(store, [DatasetRequest(dataset_id=did, source=str(src))], chunk_size=7)
    except AtlasmixError as e:
        msg = str(e)
        assert "\n" not in msg and msg, msg
        assert tree_digest(Path(store.uri)) == before, f"store changed by a refused ingest: {msg}"
        return msg
    assert case["bad"] == "none", f"{case['bad']} value accepted as a count"
    got = _by_symbol(store, did)
    X, genes = case["X"], np.asarray(case["genes"])
    want = {s: X[:, genes == s].sum(1) for s in set(case["genes"]) if X[:, genes == s].any()}
    assert set(got) == set(want)
    for s in want:
        np.testing.assert_array_equal(got[s], want[s])
    return "ok"


_ids = itertools.count()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow], derandomize=True)
@given(case=anndata_files())
def test_ingest_is_exact_or_a_clean_refusal(tmp_path_factory, case):
    global _STORE
    if "_STORE" not in globals():
        d = tmp_path_factory.mktemp("prop")
        _STORE = (Store.create(str(d / "store")), d)
    store, d = _STORE
    check_case(case, store, d, f"d{next(_ids)}")
