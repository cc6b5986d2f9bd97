"""Geneformer gene medians: exact, streamed, in memory that follows the bound and not the corpus.

Usage::

    python benchmarks/bench_medians.py --store /tmp/bl1m/store --sizes 100000,1000000

For each corpus size N (the first N cells of the store, in store order) each method runs in a fresh
subprocess over every gene of the store and reports wall seconds, passes over X and the peak RSS
(``ru_maxrss``):

* ``atlasmix`` -- :func:`atlasmix.training.geneformer.medians.gene_medians` with its default bound
  (``MAX_VALUES``, 16M kept values), and with ``--small-bound`` (default 1M) to show the extra
  refinement passes a tight bound costs;
* ``two-pass, unbounded`` -- the same with no bound (``max_values`` = 2^62): the previous method,
  which keeps every value of the median bins (a few percent of all nonzeros, so it grows with N);
* ``numpy in memory`` (the named baseline: what one does with scanpy, ``X.tocsc()`` then
  ``numpy.median`` of each gene's nonzero CP10k values) -- only where X fits (``--in-memory-max``
  cells, default 200,000); its medians are the reference every other method must equal exactly.

Measured 2026-12-06, 2 CPU cores, one run each, the 1,000,000-cell simulated store of
``bench_loader.py`` (19,907 genes, ~1,800 nonzeros per cell), every gene::

         cells  method                         s  passes  peak RSS MiB  equal to first row
       100,000  numpy in memory             16.6       1         3,111  True
       100,000  atlasmix (bound 16M)        35.4       3         2,889  True
       100,000  atlasmix (bound 1M)         33.5       3         2,911  True
       100,000  two-pass, unbounded         26.4       2         2,926  True
     1,000,000  atlasmix (bound 16M)       344.4       3         3,219  True
     1,000,000  atlasmix (bound 1M)        437.5       4         3,219  True
     1,000,000  two-pass, unbounded        242.1       2         6,888  True

The unbounded two-pass method keeps every value of the median bins: in scRNA-seq most nonzeros are
counts of 1, so a gene's median bin holds a large share of its values, and its memory grew 2.4x
from 100k to 1M cells (it would not fit at ~10M here); with the bound, memory stays at the chunk
processing's ~3 GiB (``chunk_size`` 8,192 whole-transcriptome cells) and each extra pass costs one
read of X. (numpy in memory at 1M cells would need ~22 GB for X and was not run.) After computing
each value's cell total with ``np.repeat`` and taking the maximum only in the last bin, the same
100k row took 24.9 s (numpy 13.2 s in that run).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CHILD = r"""
import json, resource, sys, time
import numpy as np
from atlasmix.store import Store
from atlasmix.training.geneformer import medians as M

uri, n, method, bound = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
s = Store(uri)
cells = np.sort(s.obs([])["soma_joinid"].to_numpy())[:n]
vj = s.var().index.to_numpy(dtype=np.int64)
t = time.perf_counter()
if method == "numpy":
    import scipy.sparse as sp
    X = sp.vstack([m for _, m in s.iter_X(cells, vj, chunk_size=16384)]).tocsc()
    tc = s.obs(["total_counts"]).to_pandas().set_index("soma_joinid").loc[cells, "total_counts"].to_numpy()
    med = np.full(len(vj), np.nan)
    for j in range(len(vj)):
        a, b = X.indptr[j], X.indptr[j + 1]
        if b > a:
            v = X.data[a:b].astype(np.float64)
            med[j] = np.median(v / tc[X.indices[a:b]] * 1e4)
    passes = 1
else:
    df = M.gene_medians(s, cells, "train", vj, max_values=bound)
    med, passes = df["median"].to_numpy(), df.attrs["passes"]
wall = time.perf_counter() - t
np.save(sys.argv[5], med)
print(json.dumps({"wall_s": round(wall, 1), "passes": int(passes),
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--small-bound", type=int, default=1_000_000)
    ap.add_argument("--in-memory-max", type=int, default=200_000)
    ap.add_argument("--out", default=None, help="JSON results")
    a = ap.parse_args()
    import tempfile

    import numpy as np

    rows = []
    tmp = tempfile.mkdtemp()
    for n in (int(x) for x in a.sizes.split(",")):
        ref = None
        methods = [("numpy in memory", "numpy", 0)] if n <= a.in_memory_max else []
        methods += [("atlasmix (bound 16M)", "atlasmix", 16_000_000),
                    (f"atlasmix (bound {a.small_bound / 1e6:g}M)", "atlasmix", a.small_bound),
                    ("two-pass, unbounded", "atlasmix", 2**62)]
        for label, method, bound in methods:
            f = f"{tmp}/med_{n}_{len(rows)}.npy"
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-c", CHILD, a.store, str(n), method, str(bound), f],
                               capture_output=True, text=True)
            if r.returncode:
                print(r.stderr[-2000:], file=sys.stderr)
                continue
            res = json.loads(r.stdout.strip().splitlines()[-1])
            med = np.load(f)
            if ref is None:
                ref = med
            res.update(cells=n, method=label, equal_to_first=bool(np.array_equal(med, ref, equal_nan=True)),
                       process_s=round(time.perf_counter() - t0, 1))
            rows.append(res)
            print(f"{n:>10,}  {label:<24} {res['wall_s']:>7.1f} s  {res['passes']:>2} passes  "
                  f"{res['peak_rss_mib']:>6,} MiB  equal={res['equal_to_first']}", flush=True)
    print()
    print(f"{'cells':>10}  {'method':<24} {'s':>7}  {'passes':>6}  {'peak RSS MiB':>12}  equal to first row")
    for r in rows:
        print(f"{r['cells']:>10,}  {r['method']:<24} {r['wall_s']:>7.1f}  {r['passes']:>6}  {r['peak_rss_mib']:>12,}"
              f"  {r['equal_to_first']}")
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
