"""annbatch as a peer of ``bench_loader.py``: run in annbatch's own venv (annbatch needs Python >= 3.12).

Usage (``bench_loader.py --methods annbatch`` does this)::

    /tmp/ab312/bin/python benchmarks/peer_annbatch.py --h5ad cells.h5ad --collection DIR \
        [--genes genes.txt] --max-cells 100000 --batch-size 1024

Prepares (timed, once per gene list) annbatch's pre-shuffled collection of the h5ad with
``DatasetCollection.add_adatas`` (its defaults: sharded zarr v3, blosc-lz4, shuffled), then reads
shuffled minibatches with ``annbatch.Loader`` (``shuffle=True``, ``chunk_size`` 512 x
``preload_nchunks`` 32 = 16,384 cells per read, ``preload_to_gpu=False``) and densifies each with
scipy's ``toarray`` (its fastest CPU path; ``to="torch"`` densifies ~7x slower on the CPU). Prints
one JSON line: cells/s, peak RSS (``VmHWM``), the preparation's time and bytes, and the minibatches'
``dataset_id`` codes for the entropy (computed by ``bench_loader.py``). Never imported by atlasmix.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _proc import peak_rss_mib, tree_cpu_s  # noqa: E402  (standard library only: runs in annbatch's venv)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--h5ad", type=Path, required=True)
    ap.add_argument("--collection", type=Path, required=True)
    ap.add_argument("--genes", type=Path, help="var names to keep, one per line (default: all)")
    ap.add_argument("--max-cells", type=int, default=100_000)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dataset-size", default="20GB", help="add_adatas dataset_size (annbatch's default 20GB; "
                    "each output dataset is assembled in memory, so a smaller one bounds the preparation's RSS)")
    a = ap.parse_args()

    import anndata as ad
    import zarr
    from annbatch import DatasetCollection, Loader

    zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})  # annbatch's advice for local disks
    genes = a.genes.read_text().split() if a.genes else None
    prep_s, built = None, False
    if not (a.collection / ".built").exists():

        def load(path):  # X, obs dataset_id and var only (annbatch's documented custom loader)
            lazy = ad.experimental.read_lazy(path)
            return ad.AnnData(X=lazy.X, obs=lazy.obs[["dataset_id"]].to_memory(), var=lazy.var.to_memory())

        t0 = time.perf_counter()
        DatasetCollection(str(a.collection)).add_adatas([str(a.h5ad)], load_adata=load, var_subset=genes,
                                                       shuffle=True, rng=np.random.default_rng(0),
                                                       dataset_size=a.dataset_size)
        prep_s, built = time.perf_counter() - t0, True
        (a.collection / ".built").write_text(json.dumps({"prep_s": prep_s}))
    else:
        prep_s = json.loads((a.collection / ".built").read_text())["prep_s"]
    prep_rss = peak_rss_mib()
    nbytes = sum(f.stat().st_size for f in a.collection.rglob("*") if f.is_file())

    loader = Loader(batch_size=a.batch_size, shuffle=True, chunk_size=512, preload_nchunks=32, preload_to_gpu=False,
                    rng=np.random.default_rng(0)).use_collection(DatasetCollection(str(a.collection)))
    names: dict[str, int] = {}
    codes, n, t0, k, cpu0 = [], 0, None, 0, 0.0
    for b in loader:
        X = b["X"].toarray()
        if k == a.warmup:
            t0, cpu0 = time.perf_counter(), tree_cpu_s()
        if k >= a.warmup:
            n += X.shape[0]
            ds = b["obs"]["dataset_id"].astype(str).to_numpy()
            codes.append([names.setdefault(d, len(names)) for d in ds])
        k += 1
        if n >= a.max_cells:
            break
    dt = time.perf_counter() - (t0 or time.perf_counter())
    cpu = tree_cpu_s() - cpu0 if t0 is not None else float("nan")
    print(json.dumps({"method": "annbatch", "cells": n, "seconds": dt, "cells_per_s": n / dt if dt else float("nan"),
                      "cpu_s": cpu,
                      "prep_s": prep_s, "prep_built_now": built, "prep_peak_rss_mib": prep_rss if built else None,
                      "collection_bytes": nbytes, "peak_rss_mib": peak_rss_mib(), "codes": codes,
                      "n_vars": int(X.shape[1])}))


if __name__ == "__main__":
    main()
