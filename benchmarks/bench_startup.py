"""Loader start-up and memory against manifest size: does memory follow the manifest?

Usage::

    python benchmarks/bench_startup.py --store /tmp/bl10m/store --sizes 100000,1000000,10000000

For each manifest size N (a mixture of N random cells of the store, ``where = "TRUE"``, resolved
with :func:`atlasmix.mixing.resolve` and written with :func:`atlasmix.mixing.write_manifest` in a
subprocess, timed, peak RSS reported), each loader runs in a fresh subprocess over the manifest's
training cells, every gene of the store, batch ``--batch-size``, and reports:

* ``start_s``: construction (manifest + obs of its rows read, gene axis, layout lookup);
* ``rss_start_mib``: resident memory after construction (``VmRSS``);
* ``first_batch_s``: from ``iter()`` to the first dense minibatch (epoch order + first read);
* ``cells_per_s`` over ``--max-cells`` cells after the first batch, and ``peak_rss_mib``
  (``VmHWM`` of the process over the whole run).

``--start-only`` (atlasmix only) constructs the loader and draws one epoch's order without reading X,
for a store that has obs but no X (``benchmarks/bench_mixing.py --keep`` builds a 10M-cell one in
about a minute; a 10M-cell store with X is ~60 GB here); its "1st batch s" column is then the time to
draw the epoch order.

Loaders: ``atlasmix`` (:class:`atlasmix.training.loader.MixtureLoader`, defaults: io batch 16,384,
block 64, the x layout) and, as the named baseline, ``tiledbsoma_ml`` 0.1.0 (``ExperimentDataset``
over an ``axis_query`` of the same cells, ``shuffle=True``, same io batch), which is also what
``tiledbsoma-ml`` users run on a CELLxGENE Census-sized manifest.

Results are printed as a table and written to ``--out`` (JSON).

Measured 2026-12-05, 2 CPU cores, one run each. A 1,000,000-cell simulated store with X (19,907
genes), 50,000 cells timed::

    manifest   method         resolve s  start s  RSS start  1st batch s  cells/s  peak RSS MiB
      100,000  atlasmix            0.3     0.40        523         4.82     9,879     1,335
      100,000  tiledbsoma_ml       0.3     0.20        463        17.63     2,096     5,029
    1,000,000  atlasmix            0.4     0.44        588         1.89    39,567     1,536
    1,000,000  tiledbsoma_ml       0.4     0.49        495         8.86     6,491     3,019

A 10,000,000-cell obs-only store (``bench_mixing.py --keep``), ``--start-only``::

    manifest    resolve s  resolve RSS  start s  RSS start  epoch order s  peak RSS MiB
    1,000,000        2.4          992     1.66        589           0.24           626
    10,000,000       3.9        1,228     2.89        855           4.18         1,293

Before ``atlasmix._ids`` (same day) the 10M start took 55.9 s (1,277 MiB): six ``np.unique`` calls
on 10M ids and a sort of 10M obs strings. Memory at start grows ~30 B per manifest cell (ids,
int32 codes, positions), the epoch order 4 B per cell. A 10 % sample of the store (the 100,000 row)
streams at a quarter of the whole store's speed: each inner chunk of the layout (16,384 nonzeros,
~10 cells) is decoded for ~1 cell used; ``in_memory`` (``atlasmix.training.memory``) reads such a
split once in store order instead.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _status() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0]) / 1024
    return out


def resolve_manifest(store_uri: str, n: int, out: Path) -> dict:
    """Resolve and write a manifest of ``n`` random cells (no validation split); runs in a subprocess."""
    from atlasmix.mixing import loads_spec, resolve, write_manifest
    from atlasmix.store import Store

    t0 = time.perf_counter()
    spec = loads_spec(f'name = "startup_{n}"\nseed = 1\nvalidation_fraction = 0\n[[components]]\nname = "all"\n'
                      f'where = "TRUE"\nn_cells = {n}\n', "startup.toml")
    res = resolve(spec, Store(store_uri))
    write_manifest(res, out)
    return {"resolve_s": time.perf_counter() - t0, "resolve_peak_rss_mib": _status()["VmHWM"]}


def run_loader(method: str, store_uri: str, manifest: Path, args) -> dict:
    import torch

    from atlasmix.store import Store

    t0 = time.perf_counter()
    store = Store(store_uri)
    if method == "atlasmix":
        from atlasmix.training.loader import MixtureLoader

        var = np.sort(store.var().index.to_numpy())
        L = MixtureLoader(store, manifest, "train", batch_size=args.batch_size, io_batch_size=args.io_batch_size,
                          var_joinids=var if len(var) else np.zeros(1, dtype=np.int64), seed=0)
        start_s, rss = time.perf_counter() - t0, _status()["VmRSS"]
        t1 = time.perf_counter()
        if args.start_only:  # a store without X (benchmarks/bench_mixing.py): the epoch order, no read
            n = len(L.shard_positions(0))
            order_s = time.perf_counter() - t1
            return {"start_s": start_s, "rss_start_mib": rss, "order_s": order_s, "order_cells": n,
                    "first_batch_s": order_s, "cells": 0, "cells_per_s": float("nan"),
                    "peak_rss_mib": _status()["VmHWM"]}
        it = iter(L)
        x = next(it)["X"]
        batches = (b["X"] for b in it)
    elif method == "tiledbsoma_ml":
        import pyarrow.parquet as pq
        import tiledbsoma as soma
        from tiledbsoma_ml import ExperimentDataset

        cells = np.sort(pq.read_table(manifest, columns=["soma_joinid"])["soma_joinid"].to_numpy())
        exp = soma.Experiment.open(store_uri, context=store.context)
        q = exp.axis_query("RNA", obs_query=soma.AxisQuery(coords=(cells,)))
        ds = ExperimentDataset(q, layer_name="raw", obs_column_names=["dataset_id"], batch_size=args.batch_size,
                               io_batch_size=args.io_batch_size, shuffle=True, seed=0)
        start_s, rss = time.perf_counter() - t0, _status()["VmRSS"]
        t1 = time.perf_counter()
        it = iter(ds)
        x = torch.from_numpy(np.asarray(next(it)[0], dtype=np.float32))
        batches = (torch.from_numpy(np.asarray(b[0], dtype=np.float32)) for b in it)
    else:
        raise SystemExit(f"unknown method {method}")
    first_s = time.perf_counter() - t1
    n, t2 = 0, time.perf_counter()
    for x in batches:
        n += x.shape[0]
        if n >= args.max_cells:
            break
    dt = time.perf_counter() - t2
    return {"start_s": start_s, "rss_start_mib": rss, "first_batch_s": first_s, "cells": n,
            "cells_per_s": n / dt if dt > 0 else float("nan"), "peak_rss_mib": _status()["VmHWM"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--sizes", default="100000,1000000,10000000")
    ap.add_argument("--methods", default="atlasmix,tiledbsoma_ml")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--io-batch-size", type=int, default=16384)
    ap.add_argument("--max-cells", type=int, default=100_000)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_startup"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--start-only", action="store_true", help="construct the loader and draw one epoch's order, "
                    "read no X (for the obs-only 10M-cell store of benchmarks/bench_mixing.py --keep)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--manifest", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one == "resolve":
        print(json.dumps(resolve_manifest(args.store, int(args.sizes), args.manifest)))
        return
    if args.one:
        print(json.dumps(run_loader(args.one, args.store, args.manifest, args)))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    common = ["--store", args.store, "--batch-size", str(args.batch_size), "--io-batch-size", str(args.io_batch_size),
              "--max-cells", str(args.max_cells)] + (["--start-only"] if args.start_only else [])
    rows = []
    for n in map(int, args.sizes.split(",")):
        manifest = args.workdir / f"m{n}.parquet"
        p = subprocess.run([sys.executable, __file__, "--one", "resolve", "--sizes", str(n), "--manifest",
                            str(manifest), *common], capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(f"resolve {n} failed: {p.stderr[-2000:]}")
        res = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"manifest {n:,}: {json.dumps(res)}", file=sys.stderr)
        for m in args.methods.split(","):
            p = subprocess.run([sys.executable, __file__, "--one", m, "--manifest", str(manifest), *common],
                               capture_output=True, text=True)
            if p.returncode:
                print(f"{m} at {n:,} failed: {p.stderr[-1500:]}", file=sys.stderr)
                continue
            r = {"n_cells": n, "method": m, **res, **json.loads(p.stdout.strip().splitlines()[-1])}
            rows.append(r)
            print(json.dumps(r), file=sys.stderr)
    print(f"store {args.store}; batch {args.batch_size}, io batch {args.io_batch_size}, every gene, "
          f"{args.max_cells:,} cells timed after the first batch")
    print(f"{'manifest':>11} {'method':<14}{'resolve s':>10}{'resolve RSS':>12}{'start s':>9}{'RSS start':>10}"
          f"{'1st batch s':>12}{'cells/s':>10}{'peak RSS':>10}")
    for r in rows:
        print(f"{r['n_cells']:>11,} {r['method']:<14}{r['resolve_s']:>10.1f}{r['resolve_peak_rss_mib']:>12,.0f}"
              f"{r['start_s']:>9.2f}{r['rss_start_mib']:>10,.0f}{r['first_batch_s']:>12.2f}{r['cells_per_s']:>10,.0f}"
              f"{r['peak_rss_mib']:>10,.0f}")
    (args.out or args.workdir / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
