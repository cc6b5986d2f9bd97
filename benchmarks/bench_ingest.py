"""Ingest throughput and peak RSS: ``atlasmix ingest`` vs ``tiledbsoma.io.from_h5ad`` on the same h5ad.

Usage::

    python benchmarks/bench_ingest.py --sizes 100000,500000 --workdir /tmp/bench_ingest

For each size, a simulated blood source (``atlasmix.simulate``, 19,907 protein-coding genes) is
written to h5ad, then ingested (each method in its own subprocess, so peak RSS is that process's
``ru_maxrss``) by

* ``atlasmix``: ``atlasmix.ingest.ingest`` into a fresh store (validation pass, gene mapping, QC,
  chunked X write);
* ``from_h5ad``: plain ``tiledbsoma.io.from_h5ad`` into a fresh experiment (the baseline named in
  issue 2; it reads the whole AnnData into memory).

Prints one table: cells, nonzeros, seconds, cells/s, M nonzeros/s, peak RSS, and the throughput
ratio atlasmix / from_h5ad at the same size.

Measured (2026-11-23, 2 shared CPU cores, ``--sizes 100000 --skip-baseline``, 100k cells, 99.9M
nonzeros, 0.76 GiB h5ad), the cost of the cell fingerprints ingest now computes (copies of stored
cells, :mod:`atlasmix.store.fingerprint`), runs alternating with the code before them::

    with fingerprints, source columns hashed directly    27.8 s, 25.3 s    peak RSS 1.90 / 1.91 GiB
    without fingerprints                                 27.2 s, 27.3 s    peak RSS 1.87 / 1.87 GiB
    with fingerprints through the mapping-matrix product 28.8 s, 32.8 s    (first version; earlier
    without, same session                                27.9 s, 25.3 s     pair of runs)

i.e. within the machine's run-to-run noise once the product is skipped (sources whose genes map
one-to-one; sources with duplicated genes still take it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def _inner(method: str, h5ad: str, out: str) -> None:
    t0 = time.perf_counter()
    if method == "atlasmix":
        from atlasmix.ingest import DatasetRequest, ingest
        from atlasmix.store import Store

        store = Store.create(out)
        ingest(store, [DatasetRequest(dataset_id="bench", source=h5ad)])
    else:
        import tiledbsoma.io

        tiledbsoma.io.from_h5ad(out, h5ad, measurement_name="RNA")
    secs = time.perf_counter() - t0
    print(json.dumps({"seconds": secs, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def _measure(method: str, h5ad: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    r = subprocess.run([sys.executable, __file__, "--inner", method, str(h5ad), str(out)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{method} failed:\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,500000", help="comma-separated cell counts")
    ap.add_argument("--workdir", default="/tmp/atlasmix_bench_ingest")
    ap.add_argument("--library-median", type=float, default=2500.0,
                    help="median UMIs per cell of the simulated source (sets nonzeros per cell)")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--inner", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.inner:
        _inner(*a.inner)
        return
    import h5py

    from atlasmix.simulate import preset, simulate_atlas

    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in [int(s) for s in a.sizes.split(",")]:
        src_dir = work / f"sim_{n}"
        h5ad = src_dir / "bench.h5ad"
        if not h5ad.exists():
            t0 = time.perf_counter()
            spec = dataclasses.replace(preset("blood_a"), name="bench", library_median=a.library_median)
            simulate_atlas(src_dir, n, sources=[spec], seed=0)
            print(f"simulated {n:,} cells in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        with h5py.File(h5ad) as f:
            nnz = int(f["X/indptr"][-1])
        res = {"atlasmix": _measure("atlasmix", h5ad, work / "store")}
        if not a.skip_baseline:
            res["from_h5ad"] = _measure("from_h5ad", h5ad, work / "exp")
        for m, r in res.items():
            rows.append({"method": m, "cells": n, "nnz": nnz, "seconds": r["seconds"], "cells_per_s": n / r["seconds"],
                         "mnnz_per_s": nnz / r["seconds"] / 1e6, "peak_rss_gib": r["peak_rss_gib"],
                         "file_gib": h5ad.stat().st_size / 2**30,
                         "ratio": (res["from_h5ad"]["seconds"] / r["seconds"]) if "from_h5ad" in res else float("nan")})
    hdr = f"{'method':10s} {'cells':>9s} {'nnz':>12s} {'h5ad GiB':>8s} {'seconds':>8s} {'cells/s':>9s} {'Mnnz/s':>7s} {'peak RSS GiB':>12s} {'x from_h5ad':>11s}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['method']:10s} {r['cells']:9,d} {r['nnz']:12,d} {r['file_gib']:8.2f} {r['seconds']:8.1f} "
              f"{r['cells_per_s']:9,.0f} {r['mnnz_per_s']:7.2f} {r['peak_rss_gib']:12.2f} {r['ratio']:11.2f}")


if __name__ == "__main__":
    main()
