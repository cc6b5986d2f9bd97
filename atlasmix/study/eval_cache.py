"""The eval cache of a study: each eval set read from the store once, every run scored on its cells.

Per set: its counts on the study's gene axis (a seeded subsample when ``max_cells_per_set``), its top
HVGs over all its cells and its cells' obs (:func:`build_eval_cache`, :func:`load_eval`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from atlasmix.evaluation import metrics as M
from atlasmix.study.keys import safe_name, sha


def build_eval_cache(eval_sets, genes: list[str], opts, out: Path) -> list[dict]:
    """Read every eval set once: counts on ``genes`` (a seeded subsample), top HVGs, obs.

    Parameters
    ----------
    eval_sets : sequence of atlasmix.evaluation.evalsets.EvalSet
    genes : list of str
        The study's gene axis (Ensembl ids).
    opts : atlasmix.study.spec.EvaluationOptions
        ``n_hvg``, ``max_cells_per_set`` (None: every cell) and ``seed`` (of the subsample).
    out : path
        The cache folder: per set ``<name>.npz`` (CSR counts float32, ``hvg`` column indices,
        ``pick`` the subsampled rows), ``<name>.obs.parquet`` and ``<name>.json`` (its key); a set
        whose key is unchanged is not read again.

    Returns
    -------
    list of dict
        Per set: ``name``, ``npz``, ``obs`` (paths) and ``key``.
    """
    out.mkdir(parents=True, exist_ok=True)
    gsha = sha(genes)
    entries = []
    for e in eval_sets:
        key = sha({"joinids": sha(e.joinids.tolist()), "genes": gsha, "n_hvg": opts.n_hvg,
                    "max_cells": opts.max_cells_per_set, "seed": opts.seed})
        f = out / f"{safe_name(e.name)}.npz"
        meta = out / f"{safe_name(e.name)}.json"
        if not (f.is_file() and meta.is_file() and json.loads(meta.read_text()).get("key") == key):
            n = e.n_cells
            pick = np.arange(n)
            if opts.max_cells_per_set is not None and n > opts.max_cells_per_set:
                rng = np.random.default_rng([opts.seed, int(hashlib.sha256(e.name.encode()).hexdigest()[:8], 16)])
                pick = np.sort(rng.choice(n, opts.max_cells_per_set, replace=False))
            h = M.HVGStats(len(genes))
            parts = []
            for sl, m in e.iter_counts(genes, 4096):  # one pass: HVG moments over all cells + the picked rows
                h.update(m)
                sel = pick[(pick >= sl.start) & (pick < sl.stop)] - sl.start
                if len(sel):
                    parts.append(m[sel])
            counts = sp.vstack(parts).tocsr() if parts else sp.csr_matrix((0, len(genes)), dtype=np.float32)
            hv = h.top_genes(opts.n_hvg)
            obs = e.obs.iloc[pick].reset_index(drop=True)
            np.savez(f, data=counts.data.astype(np.float32), indices=counts.indices, indptr=counts.indptr,
                     shape=np.array(counts.shape), hvg=np.asarray(hv, dtype=np.int64), pick=pick)
            obs[["cell_id", "soma_joinid", "dataset_id", "cell_type"]].astype(
                {"cell_id": str, "dataset_id": str, "cell_type": str}).to_parquet(out / f"{safe_name(e.name)}.obs.parquet")
            meta.write_text(json.dumps({"key": key, "name": e.name, "n_cells": int(len(pick)),
                                        "n_cells_in_set": int(n), "n_hvg": int(len(hv))}))
        entries.append({"name": e.name, "npz": str(f), "obs": str(out / f"{safe_name(e.name)}.obs.parquet"), "key": key})
    return entries


def load_eval(entry: dict) -> tuple[sp.csr_matrix, np.ndarray, pd.DataFrame]:
    """(counts CSR float32 (n_cells, n_genes), HVG column indices int64, obs) of a cache entry."""
    d = np.load(entry["npz"])
    counts = sp.csr_matrix((d["data"], d["indices"], d["indptr"]), shape=tuple(d["shape"]))
    return counts, d["hvg"], pd.read_parquet(entry["obs"])
