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

``--workers 1,2`` (issue 20): one simulated plan (200,000 cells in 4 datasets) ingested with the
threaded scheduler in process and with 1 and 2 dask.distributed worker processes (``ingest(...,
client=...)``), measured 2026-12-06 on the 2-core machine (second of two runs; the first, disturbed
by a test run, gave 65.5 / 72.1 / 58.2 s)::

    mode                        seconds   cells/s  peak RSS GiB: ingest process       per worker
    threads, in process            52.7     3,795                          4.21                -
    1 dask worker process(es)      69.1     2,893                          1.55             2.64
    2 dask worker process(es)      54.3     3,684                          1.54       2.31, 2.56

    per-stage times with 1 worker: ingest process 9.1 s; prepare_task: 4 tasks, 9.5 s;
    write_X_task: 4 tasks, 50.6 s
    projection:  2 workers 43.1 s (4,638 cells/s); 4+ workers 31.1 s (6,426 cells/s, one task per
    dataset and phase: the largest dataset's write bounds it)

On 2 cores, 2 worker processes are no faster than the threads of one process (both already use
both cores; a worker also reads its source a second time to write it), but the ingest process
itself drops from 4.2 to 1.5 GiB. The projection is for workers with cores of their own.
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


def _inner_workers(workers: int, plan: str, out: str) -> None:
    """One plan ingest: in-process threads (``workers`` = 0) or a LocalCluster of ``workers`` worker
    processes (one thread each); prints seconds, per-task durations and peak RSS per process."""
    import resource

    from atlasmix.ingest import QCPolicy, ingest, read_plan
    from atlasmix.store import Store

    store = Store.create(out)
    reqs = read_plan(Path(plan), {"qc": QCPolicy()})
    res: dict = {}
    if workers == 0:
        t0 = time.perf_counter()
        ingest(store, reqs)
        res["seconds"] = time.perf_counter() - t0
        res["worker_peak_rss_gib"] = []
    else:
        from distributed import Client, LocalCluster, get_task_stream

        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as c, \
                Client(c) as client:
            with get_task_stream(client) as ts:
                t0 = time.perf_counter()
                ingest(store, reqs, client=client)
                res["seconds"] = time.perf_counter() - t0
            tasks = []
            for t in ts.data:
                start = min(x["start"] for x in t["startstops"] if x["action"] == "compute")
                stop = max(x["stop"] for x in t["startstops"] if x["action"] == "compute")
                key = t["key"][0] if isinstance(t["key"], tuple) else str(t["key"])
                tasks.append({"name": key.split("-")[0].strip("_"), "start": start, "stop": stop})
            res["tasks"] = tasks
            rss = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
            res["worker_peak_rss_gib"] = sorted(rss.values())
    res["client_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps(res))


def _makespan(durations: list[float], n: int) -> float:
    """Longest-processing-time-first schedule of ``durations`` on ``n`` workers: its finish time."""
    load = [0.0] * n
    for d in sorted(durations, reverse=True):
        load[load.index(min(load))] += d
    return max(load) if durations else 0.0


def bench_workers(a) -> None:
    """The same plan with in-process threads, 1 and 2 (``--workers``) dask worker processes."""
    from atlasmix.simulate import simulate_atlas

    work = Path(a.workdir)
    sim = work / f"plan_{a.plan_cells}"
    if not (sim / "plan.toml").exists():
        simulate_atlas(sim, a.plan_cells, sources=a.plan_sources, seed=0)
    rows = []
    for w in [0] + [int(x) for x in a.workers.split(",")]:
        out = work / "store_w"
        shutil.rmtree(out, ignore_errors=True)
        r = subprocess.run([sys.executable, __file__, "--inner-workers", str(w), str(sim / "plan.toml"), str(out)],
                           capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(r.stderr[-3000:])
        res = json.loads(r.stdout.strip().splitlines()[-1])
        shutil.rmtree(out, ignore_errors=True)
        res["workers"] = w
        rows.append(res)
    print(f"\nplan: {a.plan_cells:,} cells in {len(a.plan_sources.split(','))} datasets ({a.plan_sources})")
    hdr = (f"{'mode':26s} {'seconds':>8s} {'cells/s':>9s} {'peak RSS GiB: ingest process':>29s} "
           f"{'per worker':>16s}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        mode = "threads, in process" if r["workers"] == 0 else f"{r['workers']} dask worker process(es)"
        wr = ", ".join(f"{x:.2f}" for x in r["worker_peak_rss_gib"]) or "-"
        print(f"{mode:26s} {r['seconds']:8.1f} {a.plan_cells / r['seconds']:9,.0f} {r['client_peak_rss_gib']:29.2f} "
              f"{wr:>16s}")
    # projection: the ingest process's own (serial) time plus each phase's tasks spread over N workers
    one = next((r for r in rows if r["workers"] == 1), None)
    if one is not None:
        by = {}
        for t in one["tasks"]:
            by.setdefault(t["name"], []).append(t)
        phases = {k: [t["stop"] - t["start"] for t in v] for k, v in by.items()}
        span = {k: max(t["stop"] for t in v) - min(t["start"] for t in v) for k, v in by.items()}
        serial = one["seconds"] - sum(span.values())
        print(f"\nper-stage times with 1 worker: ingest process (locks, var/obs/catalog commit) {serial:.1f} s; "
              + "; ".join(f"{k}: {len(v)} tasks, {sum(v):.1f} s" for k, v in phases.items()))
        print("projection (measured task times, longest first onto N workers, + the serial part):")
        for n in (1, 2, 4, 8, 16):
            tn = serial + sum(_makespan(v, n) for v in phases.values())
            capped = n >= max(len(v) for v in phases.values())
            print(f"  {n:3d} workers: {tn:7.1f} s  {a.plan_cells / tn:9,.0f} cells/s"
                  + ("   (no faster beyond: one task per dataset and phase)" if capped else ""))
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))


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
    ap.add_argument("--workers", default=None,
                    help="instead: ingest one simulated plan with in-process threads and with these numbers of "
                         "dask worker processes (e.g. 1,2)")
    ap.add_argument("--plan-cells", type=int, default=200_000, help="cells of the --workers plan")
    ap.add_argument("--plan-sources", default="blood_a,blood_b,malignant,bone_marrow",
                    help="datasets of the --workers plan (simulator presets)")
    ap.add_argument("--out", default=None, help="JSON results (--workers)")
    ap.add_argument("--inner", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--inner-workers", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.inner:
        _inner(*a.inner)
        return
    if a.inner_workers:
        _inner_workers(int(a.inner_workers[0]), a.inner_workers[1], a.inner_workers[2])
        return
    if a.workers:
        bench_workers(a)
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
