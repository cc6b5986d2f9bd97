"""The simulated corpus looks to the ingest exactly like real sources: plan.toml ingests it as is."""

from __future__ import annotations

from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

from atlasmix.ingest import read_plan
from atlasmix.ingest import QCPolicy, ingest
from atlasmix.simulate import simulate_atlas
from atlasmix.store import Store


def test_simulated_plan_ingests_with_metadata_and_counts_intact(tmp_path):
    info = simulate_atlas(tmp_path / "sim", 3000, seed=3, n_genes=1500)
    store = Store.create(str(tmp_path / "store"))
    reps = ingest(store, read_plan(Path(info["plan"]), {"qc": QCPolicy()}), chunk_size=500)
    assert {r["dataset_id"]: r["n_cells"] for r in reps} == {s["dataset_id"]: s["n_cells"] for s in info["sources"]}
    assert all(r["gene_mapping"]["mapped_fraction"] == 1.0 for r in reps)  # real Ensembl ids
    obs = store.obs().to_pandas()
    assert obs.loc[obs.dataset_id == "malignant", "is_malignant"].any()
    assert not obs.loc[obs.dataset_id == "blood_a", "is_malignant"].any()
    assert (obs.loc[obs.dataset_id == "perturbation", "perturbation"] != "none").any()
    assert obs["qc_pass"].mean() > 0.9 and obs["pct_counts_mt"].between(0.5, 30).mean() > 0.95
    # X of one source round-trips exactly
    src = next(s for s in info["sources"] if s["dataset_id"] == "bone_marrow")
    a = ad.read_h5ad(src["path"])
    cat = store.catalog().set_index("dataset_id").loc["bone_marrow"]
    var = store.var()
    jid = var.reset_index().set_index("feature_id").loc[a.var_names, "soma_joinid"].to_numpy()
    got = sp.vstack([m for _, m in store.iter_X(np.arange(cat.obs_joinid_start, cat.obs_joinid_end), jid)])
    assert (got != sp.csr_matrix(a.X)).nnz == 0
    sub = obs[obs.dataset_id == "bone_marrow"]
    assert list(sub.cell_type) == list(a.obs.cell_type.astype(str))
