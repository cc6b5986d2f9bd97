"""Benchmark ``atlasmix simulate``: cells/s and peak RSS for a larger run.

Usage::

    python benchmarks/bench_simulate.py --cells 200000 [--sources blood_a,...] [--genes G]
        [--format h5ad|zarr|mex] [--chunk-size C] [--threads T] [--out DIR] [--keep]

Prints one row per source (cells, non-zeros, detected genes per cell, seconds, cells/s) and a total
row with the CPU time (cells per CPU-second is the per-core throughput, robust to other load on
the machine) and the peak resident set size of the process (``resource.getrusage``, includes the Python
interpreter, numpy/scipy/anndata and the gene table, ~0.5 GiB before any simulation).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=lambda s: int(s.replace("_", "")), default=200_000)
    ap.add_argument("--sources", default=None, help="comma-separated presets (default: all)")
    ap.add_argument("--genes", type=int, default=None, help="gene-space size (default: all protein-coding)")
    ap.add_argument("--format", default="h5ad", choices=["h5ad", "zarr", "mex"])
    ap.add_argument("--chunk-size", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=None, help="numba threads (default: all cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output directory (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the output directory")
    args = ap.parse_args()

    import numba

    from atlasmix.simulate import simulate_atlas
    from atlasmix.simulate import model

    if args.threads:
        numba.set_num_threads(args.threads)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_simulate_"))
    t0 = time.perf_counter()
    model.gene_space(args.genes, args.seed)  # load the gene table outside the timed run
    warm = tempfile.mkdtemp(prefix="bench_simulate_warm_")  # JIT warm-up (compiles once, then cached)
    simulate_atlas(warm, 200, sources="blood_a", n_genes=args.genes, seed=args.seed)
    shutil.rmtree(warm)
    setup = time.perf_counter() - t0
    cpu0 = time.process_time()
    info = simulate_atlas(out, args.cells, sources=args.sources, seed=args.seed, n_genes=args.genes,
                          chunk_size=args.chunk_size, fmt=args.format)
    cpu = time.process_time() - cpu0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**30
    print(f"atlasmix simulate benchmark: {args.cells:,} cells x {info['n_genes']:,} genes, format {args.format}, "
          f"chunk {args.chunk_size:,}, numba threads {numba.get_num_threads()}, setup {setup:.1f} s")
    print(f"{'source':<14}{'cells':>10}{'nnz':>15}{'genes/cell':>12}{'seconds':>10}{'cells/s':>10}")
    for s in info["sources"]:
        print(f"{s['dataset_id']:<14}{s['n_cells']:>10,}{s['nnz']:>15,}{s['nnz'] / s['n_cells']:>12,.0f}"
              f"{s['seconds']:>10.1f}{s['n_cells'] / s['seconds']:>10,.0f}")
    nnz = sum(s["nnz"] for s in info["sources"])
    print(f"{'total':<14}{args.cells:>10,}{nnz:>15,}{nnz / args.cells:>12,.0f}{info['seconds']:>10.1f}"
          f"{info['cells_per_s']:>10,.0f}")
    print(f"CPU time {cpu:.1f} s (all threads): {args.cells / cpu:,.0f} cells per CPU-second; "
          f"peak RSS {rss:.2f} GiB; output {size:.2f} GiB in {out}")
    if not args.keep and not args.out:
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
