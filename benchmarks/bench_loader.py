"""Loader throughput, peak RSS and shuffle quality: atlasmix vs tiledbsoma-ml vs scvi-tools in memory.

Usage::

    python benchmarks/bench_loader.py --n-cells 1000000 --workdir /tmp/bench_loader --max-cells 200000

Builds (once, cached in ``--workdir``) a store from a simulated atlas (``atlasmix.simulate``: all
presets, 19,907 protein-coding genes, several sources = several ``dataset_id`` values), ingested
with ``atlasmix.ingest`` through the simulator's plan. Then, each loader in its own subprocess (so
peak RSS is that process's ``ru_maxrss``), over the same cells (every cell of the store) and genes
(every gene of the store), with the same minibatch size:

* ``atlasmix``: :class:`atlasmix.training.loader.MixtureLoader` (dense float32 batch ready on
  ``--device``), shuffled;
* ``tiledbsoma_ml``: ``tiledbsoma_ml.ExperimentDataset`` 0.1.0 (``shuffle=True``, its default
  ``shuffle_chunk_size=64``, same ``io_batch_size``), batches converted to dense torch tensors on
  the device;
* ``scvi_memory``: scvi-tools' own ``AnnDataLoader`` over an in-memory AnnData of the same cells
  (the AnnData is read from the store first; its build time is reported separately, its memory is
  in the peak RSS).

Each run reads minibatches until ``--max-cells`` cells (after ``--warmup`` batches) and reports
cells/s, CPU time per cell (the process and its live workers, over the same window; ``cores / CPU
per cell`` is the most cells/s that loader can reach on this machine's cores, printed as its ceiling),
peak RSS (MiB) and the per-minibatch ``dataset_id`` entropy against i.i.d. sampling
(:func:`atlasmix.training.loader.shuffle_entropy`). Prints a table and writes JSON to
``--workdir/results.json``.

Measured (2026-11-23, 2 shared CPU cores, no GPU, device cpu; 400,000 simulated cells x 19,907
genes, ~1,700 nonzeros per cell, batch 1024, io batch 16,384, 40-60k cells timed; other jobs were
running, so cells/s varied by ~30% between repeats)::

    method                  cells/s   peak RSS MiB   entropy ratio (1 = i.i.d.)
    atlasmix (block 64)     6,300-8,300    4,400-5,600    0.996
    atlasmix (block 512)    13,500         2,800          0.969
    atlasmix (block 2048)   11,400         2,700          0.820
    atlasmix (1 IO thread)  4,200          3,000          0.997
    tiledbsoma_ml           5,000-7,200    3,400-5,600    0.995
    scvi_memory             50,800         13,800         1.000   (+ the AnnData build)

At equal shuffle settings the atlasmix loader is at parity with tiledbsoma-ml on this machine (both
spend their time in TileDB's decode of the same tiles); the 10x goal of issue 5 was not reached
here. Peak RSS does not grow during an epoch; it is set by io_batch_size x reads in flight.

The same 2-core machine, later (io batch 16,384, 60,000 cells timed), a 400,000-cell store built
with small data tiles (``capacity`` 2^13 nonzeros instead of 2^17, see ``atlasmix/store/schema.py``)
next to the store above, same loader code in one session::

    method                     cells/s (2^17 tiles)   cells/s (2^13 tiles)   entropy ratio
    atlasmix (block 64)        7,400                  10,600                 0.996
    atlasmix (block 16)        3,600                  10,000                 0.999
    tiledbsoma_ml              6,100                   9,900                 0.995

and, after ``read_csr`` moved its per-nonzero work to int32 (2^13 store): atlasmix 9,800 (block
64; 9,600 with one IO thread, 2.4 GiB peak RSS), tiledbsoma_ml 10,400, scvi-tools in memory 62,700
(after 66 s and 13.9 GiB to build the AnnData). Both TileDB loaders are bound by TileDB's read of
the nonzeros: ~37-47 ns of CPU per nonzero with one TileDB thread, the same with zstd level 1 or
LZ4 instead of zstd 3 (so not the codec), which on 2 cores caps any loader of this store at ~15-20k
cells/s of 1,700 genes.

A gene-subset axis (``--n-genes 2000``: a seeded random 2,000 of the 19,907 genes, ~10 % of the
nonzeros, like the top 2,000 HVGs of ``../shared/data``'s whole-transcriptome files at 6-17 %), same
2-core machine, io batch 16,384, 100,000 cells timed, dense batch on the CPU;
``atlasmix:x_cache=1`` reads a projection of X onto the cells x these genes
(:mod:`atlasmix.training.xcache`), built once before timing::

    400,000-cell store (2^13 tiles)     cells/s   x tdbml   peak RSS MiB   entropy ratio
    atlasmix (from the store)           10,102     3.87      3,828          0.995
    atlasmix:x_cache=1                  56,381    21.59      2,039          0.995
    tiledbsoma_ml (var_query = genes)    2,611     1.00      1,781          0.995
    x cache: 400,000 cells x 2,000 genes, 68.9M nonzeros, built in 42 s (one pass), 116 MB on disk

    1,000,000-cell store (2^13 tiles)   cells/s   x tdbml   peak RSS MiB   entropy ratio
    atlasmix (from the store)           11,194      8.46     4,137          0.997
    atlasmix:x_cache=1                  55,447     41.90     2,126          0.997
    tiledbsoma_ml (var_query = genes)    1,323      1.00     1,939          0.997
    x cache: 1,000,000 cells x 2,000 genes, 172.3M nonzeros, built in 150 s (another job was
    running; ~105 s expected from the 400k build)
    same store, every gene:  atlasmix 9,854 cells/s (3,607 MiB), tiledbsoma_ml 6,766 (3,136 MiB): 1.46x
    atlasmix:x_cache=h5 (uncompressed CSR in HDF5, 2^16-element chunks; built in 81 s, 1.4 GB):
    124,155 cells/s, 2,144 MiB -- 94x tiledbsoma_ml on these genes; the compressed tiledb cache
    read 58,079 in the same run. scvi-tools in memory on these genes: 390,218 cells/s after a
    173 s AnnData build, 5,607 MiB.

Every gene through the h5 x cache (400,000-cell store, one run, after the CPU densify moved to
scipy's ``toarray``)::

    method                  cells/s   x tdbml   peak RSS MiB   entropy ratio
    atlasmix (store)         8,284     1.24      3,298          0.995
    atlasmix:x_cache=h5     28,407     4.25      1,354          0.995
    tiledbsoma_ml            6,689     1.00      2,970          0.995
    scvi_memory             51,273     7.67     13,859          1.000
    h5 x cache: 400,000 cells x 19,907 genes, 684M nonzeros, built in 38 s, 5.2 GB

Through the h5 cache the read itself costs ~0.2 s per 16,384 whole-transcriptome cells (~80k
cells/s); the rest is the CPU densify of 81 MB minibatches, which the GPU path does on the GPU.

After the h5 cache read moved from h5py to ``os.preadv`` at HDF5's chunk offsets (2026-11-23, same
machine, io batch 16,384, alternating runs of the old and new code): 1,000,000 cells x 2,000 genes,
400,000 cells timed, 103,190 -> 119,439 cells/s; 400,000 cells x 19,907 genes, 100,000 timed,
28.9k / 33.2k / 29.0k / 28.0k -> 27.2k / 46.8k / 31.9k / 34.9k cells/s. The read alone got 12x
(2,000 genes) and 2.5x / 4.2x (every gene, 1 / 2 threads) faster (``atlasmix.training.xcache``);
on 2 cores the CPU densify and the minibatch gathers now bound the loader.

After dense CPU minibatches moved to one compiled gather + densify + library-size pass into reused
buffers (``atlasmix.training._dense``; before: scipy ``m[rows]`` then ``toarray()`` into a fresh
81 MB array per minibatch, 4 + 13-14 us per cell), same 2-core machine, io batch 16,384, every gene
(19,907) through the h5 x cache. 400,000 cells, 100,000 timed, the old and new code alternating:
39,182 / 34,862 -> 75,172 / 74,218 cells/s (peak RSS 1,359 -> 1,450 MiB). 1,000,000 cells (1.71
billion nonzeros; the h5 x cache is 13.7 GB, built in 143 s), 200,000 cells timed, two runs
(``--n-cells 1000000 --io-batch-size 16384 --max-cells 200000 --methods
atlasmix:x_cache=h5,tiledbsoma_ml,atlasmix``)::

    method                               cells/s   x tdbml   peak RSS MiB   entropy ratio
    run 1  atlasmix:x_cache=h5            50,237     9.07        2,367        0.995   (first read after the build)
           tiledbsoma_ml                   5,537     1.00        3,179        0.995
           atlasmix (from the store)       8,820     1.59        3,953        0.995
    run 2  atlasmix:x_cache=h5            56,257    10.08        1,502        0.995
           tiledbsoma_ml                   5,583     1.00        3,150        0.995
           atlasmix:x_cache=h5            63,407    11.36        1,503        0.995   (same method, again)
           atlasmix:x_cache=h5,io_threads=1  60,841  10.90     1,496        0.995
           atlasmix:x_cache=h5,io batch 65,536  41,539  7.44   3,425        0.999

The same 1M-cell store on 2,000 genes (``--n-genes 2000``, 100,000 cells timed, one run):
atlasmix:x_cache=h5 346,865 cells/s (762 MiB), tiledbsoma_ml 1,475 (1,925 MiB), atlasmix from the
store 9,926 (3,901 MiB); entropy ratio 0.997 for all three: 235x and 6.7x. Alternating the old and
new dense path there (400,000 cells timed, page cache warm): 336k / 391k / 494k -> 455k / 464k /
492k / 500k cells/s.

One epoch of these 1M cells takes tiledbsoma-ml ~180 s; the x cache build (143 s) costs less than
that, so over E epochs the x cache path is 180 E / (143 + 17 E) times faster (5.7x at 10 epochs,
10.1x at 250, the scFM-datamix LDVAE protocol; 17 s per epoch at 58k cells/s).

tiledbsoma-ml hands the gene coordinates to TileDB, whose point ranges on ``soma_dim_1`` make the
read far slower; the atlasmix loader reads whole rows and maps genes afterwards, and with the x
cache TileDB only decodes the genes the model uses.

Measured (2026-11-23, one NVIDIA H100 80GB, 16 CPU cores, Python 3.12, torch 2.11+cu130; a
1,000,000-cell simulated store (simulate 26-41 s, ingest 68-86 s there), 19,907 genes, batch 1024,
io batch 65,536, dense float32 batch on the GPU, 300,000-400,000 cells timed; the atlasmix loader
copies each IO batch's CSR to the GPU once and cuts/densifies minibatches there)::

    method                                   cells/s  x tdbml  peak RSS MiB  entropy ratio
    atlasmix:io_threads=4  (block 64)         41,810     1.83        24,423    0.999
    atlasmix:io_threads=8  (block 64)         44,953     1.96        23,409    0.999
    atlasmix:io_threads=12:block_size=256     58,471     2.55        15,256    0.998
    atlasmix:read_processes=4 (block 64)      33,414     1.46        14,087 (+ 8,938 per read process)
    tiledbsoma_ml (num_workers=0)             22,904     1.00        14,349    0.999

1.8-2.6x tiledbsoma-ml at equal shuffle quality, short of the 10x goal: both loaders are bound by
TileDB's decode of the same data tiles, which did not scale past ~4 read threads (4 -> 8 threads:
+8 %); larger locality blocks (fewer tiles decoded per cell) helped most. Peak RSS is dominated by
TileDB's result buffers for 65,536-cell reads (lower ``--io-batch-size`` / ``read_buffer_bytes``
to trade speed for memory); it is set by the IO batch, not the corpus size.

The numbers above were taken with TileDB's "preprocess tile merge" on (TileDB 2.30's default).
atlasmix turns it off since 2026-11-23 because it crashed multi-fragment reads
(``atlasmix.store.store.TILEDB_DEFAULTS``). Cost, same 2-core machine, 400,000-cell 2^13 store,
every gene, io batch 16,384, 60,000 cells timed, two alternating runs each: atlasmix from the store
11,050 / 10,980 cells/s off vs 12,240 / 11,960 on (-9 %), peak RSS 3.3 vs 3.6 GiB; the tiledb x
cache (1,000,000 cells x 2,000 genes, 62 fragments, 200,000 cells timed) 49,300 / 59,200 off vs
55,400 / 63,400 on (-7 to -11 %). The h5 x cache does not read through TileDB, and tiledbsoma-ml
shares the store's context (so it pays the same). ``ATLASMIX_TILEDB_CONFIG`` turns it back on.

The store's x layout (issue 19; ``atlasmix.store.xlayout``, zarr v3 CSR written by the ingest),
2026-12-05, the same 2-core machine, 200,000 simulated cells (342M nonzeros), batch 1024, io batch
16,384, 100,000 cells timed, dense float32 on the CPU, two rounds (methods alternating in each);
``atlasmix`` reads the layout (the default), ``x_source=tiledb`` TileDB X, both with no preparation::

    every gene (19,907)              round 1   round 2   peak RSS MiB   entropy ratio
    atlasmix (x layout, block 64)     81,945    46,093     1,451          0.992
    atlasmix:block_size=128           89,060    81,995     1,441-1,448    0.993
    atlasmix:x_source=tiledb          15,551    17,666     3,213-3,417    0.992
    tiledbsoma_ml                      5,425     5,785     2,867-2,901    0.992
    atlasmix:x_cache=h5               63,828    43,644     1,444-1,454    0.992   (2.7 GB copy, 20 s build)

    2,000 random genes               round 1   round 2   peak RSS MiB
    atlasmix (x layout)               54,418    59,564     1,059-1,075
    atlasmix:x_source=tiledb          12,346    12,991     3,297-3,363
    tiledbsoma_ml                      5,658     5,397     1,690-1,754
    atlasmix:x_cache=h5              713,362   269,688       683-886   (34M nonzeros, 5 s build)

Earlier runs in the same session: atlasmix 65,719-79,031 and 66,857 (layout with 65,536-nonzero
chunks, then 16,384), x_cache=h5 123,687 then 25,057: this shared machine's throughput varies ~2x
between identical runs, so compare within a round. Straight from the lake the default path is
3-5x TileDB X and 8-15x tiledbsoma-ml, at or above the uncompressed per-mixture h5 copy for the
whole transcriptome, with 0.6 GB of layout (vs 0.61 GB TileDB X) instead of 2.7 GB per mixture.
It decodes every nonzero of a row, so a small gene axis costs as much as the whole
transcriptome: for 2,000 genes the per-mixture x cache stays 5-13x faster and remains an option.
The goal of >= 90,000 cells/s was reached only with 128-cell blocks in round 1.

With annbatch 0.3.1 (``--methods annbatch``: its own Python 3.12 venv, zarrs codec pipeline; input
an h5ad export of the store, 2.76 GB, ~1 min; its pre-shuffled collection timed as preparation;
CSR batches densified with scipy ``toarray``, its fastest CPU path), same machine and settings, one
run each, methods alternating::

    every gene                      cells/s (two runs)   peak RSS MiB   entropy ratio   preparation
    atlasmix (x layout)             70,053 / 86,641      1,443-1,454    0.992           none
    atlasmix:block_size=128         60,740               1,383          0.993           none
    annbatch                        51,064 / 37,616        790          1.000           41 s, 9.2 GiB RSS, 0.87 GB
    tiledbsoma_ml                    6,468               2,817          0.992           none

    2,000 random genes              cells/s (two runs)   peak RSS MiB                   preparation
    atlasmix (x layout)             73,912 / 66,786      1,082-1,087                    none
    atlasmix:x_cache=h5            257,147                 669                          5 s, 0.28 GB
    annbatch                       412,044 / 365,159       267                          9 s, 1.3 GiB RSS, 0.09 GB
    tiledbsoma_ml                    4,261               1,704

Every gene: 1.4-2.3x annbatch with no per-mixture preparation (the issue-19 goal was 3.5x). On a
2,000-gene axis a gene-subset copy wins by 3.5-6x (annbatch's collection more than atlasmix's h5
x cache), because the layout decodes whole rows. scDataset and BioNeMo SCDL were not run.

1,000,000 simulated cells (2026-12-05, same machine, io batch 16,384, 100,352 cells timed, one run
per cell; ``--cache as-is|warm|cold``), every gene, cells/s::

    method                     as-is    warm    cold   peak RSS MiB  preparation
    atlasmix (x layout)       45,214  62,463  39,928   1,505-1,548   none
    annbatch 0.3.1            55,401  54,971  42,567       885       105 s, 20.9 GiB RSS, 4.36 GB
    bionemo_scdl 0.1.3        10,819  25,094   8,099   9,120-11,735  104 s conversion, 10.3 GB
    scdataset 0.3.0 (2 wkr)    3,083  12,211   2,190       782       (13.8 GB h5ad export, 86 s)
    tiledbsoma_ml 0.1.0        7,209   5,633   4,072   3,117-3,134   none

Larger than RAM (2026-12-05, same store): a balloon process held 19.5 GiB of anonymous memory (the
machine has no swap), leaving 3.5 GiB for the loader and the page cache, less than the layout
(2.8 GB), TileDB X (2.9 GB) or annbatch's collection (4.36 GB); ``--cache cold``; 900,000 cells
timed (0.9 epoch) for atlasmix and annbatch in one run, 200,000 for tiledbsoma_ml and atlasmix in
a second::

    method              cells/s (run 1 / run 2)   peak RSS MiB   entropy ratio
    atlasmix (layout)   39,990 / 43,129           1,465          0.995
    annbatch 0.3.1      24,859                      904          1.000
    tiledbsoma_ml        6,464                    3,017          0.995

With the page cache unable to hold the corpus, the layout keeps its cold-start speed (1.6x annbatch,
6.7x tiledbsoma-ml); annbatch, whose collection is 1.6x the layout's bytes, loses more.

2026-12-06, 1,000,000 cells, io batch 16,384, warm, after in-memory IO batches became views of the
held split and two threads densify them (``--methods atlasmix:in_memory=1,annbatch,...``; methods
in run order, one invocation per row)::

    2,000 genes, 300,000 timed     atlasmix:in_memory=1     annbatch
    run 1                          1,351,185 / 1,514,060    573,071 / 530,761   (2.4-2.9x)
    run 2                          1,287,464 / 1,273,054    374,238 / 571,207   (2.2-3.4x)
    2,000 genes, 900,000 timed     1,726,682 / 1,835,064    345,111 / 391,562   (4.4-5.3x)

    every gene, 300,000 timed      atlasmix (layout)   annbatch          scdataset   tiledbsoma_ml
                                   125,211 / 115,909   69,773 / 68,051   12,415      9,340

Before (same machine, same day): in memory 1.0-1.1M cells/s, 1.38-1.57x annbatch.

CPU per cell (2026-12-06, same setting, every gene, 300,000 timed; three invocations; the ceiling
is 2 cores / CPU per cell)::

    method              cells/s                      CPU us/cell         cores busy  ceiling
    atlasmix (layout)   98,826 / 121,951 / 111,125   16.2 / 14.1 / 15.3  1.60-1.72   123-142k
    annbatch 0.3.1      53,347 /  39,460 /  61,807   21.3 / 29.2 / 19.6  1.14-1.21    68-102k
    scdataset 0.3.0      8,577                       180                 1.55          11k
    tiledbsoma_ml        7,413                       214                 1.59           9k

2,000 genes: atlasmix in memory 1,729,336 (1.1 us/cell, 1.90 cores), annbatch 351,177 (2.9 us/cell,
1.01 cores). 3.5x annbatch's best every-gene run here (216k cells/s) would need <= 9.3 us/cell with
both cores busy (see docs/benchmarks.md for the per-thread split).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _proc import peak_rss_mib, tree_cpu_s  # noqa: E402


def build_store(workdir: Path, n_cells: int, seed: int = 0) -> str:
    """Simulate + ingest into ``workdir/store`` unless it exists; returns the store URI."""
    uri = workdir / "store"
    if (uri / ".built").exists():
        return str(uri)
    import shutil

    from atlasmix.ingest import QCPolicy, ingest, read_plan
    from atlasmix.simulate import simulate_atlas
    from atlasmix.store import Store

    shutil.rmtree(uri, ignore_errors=True)
    t0 = time.perf_counter()
    info = simulate_atlas(workdir / "sim", n_cells=n_cells, seed=seed)
    t1 = time.perf_counter()
    store = Store.create(str(uri))
    ingest(store, read_plan(Path(info["plan"]), {"qc": QCPolicy()}))
    t2 = time.perf_counter()
    shutil.rmtree(workdir / "sim", ignore_errors=True)
    (uri / ".built").write_text(json.dumps({"n_cells": n_cells, "simulate_s": t1 - t0, "ingest_s": t2 - t1}))
    print(f"built {n_cells:,} cells: simulate {t1 - t0:.0f} s, ingest {t2 - t1:.0f} s", file=sys.stderr)
    return str(uri)


def _rss_mib() -> float:
    """Peak RSS (MiB) of this process (:func:`_proc.peak_rss_mib`; ``ru_maxrss`` off Linux)."""
    v = peak_rss_mib()
    return v if v == v else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure(batches, n_warm: int, max_cells: int, codes_of, dense_of) -> dict:
    """Iterate ``batches``; time from after ``n_warm`` batches until ``max_cells`` cells.

    ``cpu_s`` is the CPU time of this process and its live workers over the same window
    (:func:`_proc.tree_cpu_s`)."""
    import torch

    codes, n, t0, k, cpu0 = [], 0, None, 0, 0.0
    for b in batches:
        X = dense_of(b)
        if X.is_cuda:
            torch.cuda.synchronize()
        if k == n_warm:
            t0, cpu0 = time.perf_counter(), tree_cpu_s()
        if k >= n_warm:
            n += X.shape[0]
            codes.append(codes_of(b))
        k += 1
        if n >= max_cells:
            break
    dt = time.perf_counter() - (t0 or time.perf_counter())
    cpu = tree_cpu_s() - cpu0 if t0 is not None else float("nan")
    return {"cells": n, "seconds": dt, "cells_per_s": n / dt if dt > 0 else float("nan"), "cpu_s": cpu, "codes": codes}


def gene_axis(store, n_genes: int) -> np.ndarray:
    """The benchmark's gene axis (var joinids, ascending): every gene, or a seeded random ``n_genes``.

    A random 2,000 of the simulated 19,907 genes hold ~10 % of the nonzeros, about what the top
    2,000 seurat HVGs hold in ``../shared/data``'s whole-transcriptome files (6-17 %).
    """
    allv = store.var().index.to_numpy()
    if not n_genes or n_genes >= len(allv):
        return allv
    return np.sort(np.random.default_rng(0).choice(allv, n_genes, replace=False))


def method_options(method: str, args, x_cache_dir) -> dict:
    """MixtureLoader options of a method ``atlasmix[:key=value...]`` over the command line's defaults.

    e.g. ``atlasmix:io_threads=8:block_size=512``; ``x_cache=1`` (tiledb) or ``x_cache=h5`` reads
    through an x cache projection in ``x_cache_dir``. Shared with ``bench_ldvae.py``.
    """
    opts = dict(io_batch_size=args.io_batch_size, block_size=args.block_size, io_threads=args.io_threads,
                prefetch_io=args.prefetch)
    for kv in method.split(":")[1:]:
        k, v = kv.split("=")
        opts[k] = int(v) if v.lstrip("-").isdigit() else v
    xc = opts.pop("x_cache", 0)
    if xc:
        opts["x_cache"] = str(x_cache_dir)
        opts["x_cache_format"] = "h5" if xc == "h5" else "tiledb"
    return opts


def run_one(method: str, uri: str, args) -> dict:
    import torch

    from atlasmix.store import Store
    from atlasmix.training.loader import MixtureLoader, shuffle_entropy

    store = Store(uri)
    dev = torch.device(args.device)
    cells = store.obs([]).column("soma_joinid").to_numpy()
    genes = gene_axis(store, args.n_genes)
    dsnames = sorted(set(store.obs(["dataset_id"]).column("dataset_id").to_pylist()))
    extra: dict = {}
    t_setup = time.perf_counter()
    if method.split(":")[0] == "atlasmix":
        opts = method_options(method, args, args.x_cache_dir)
        extra["options"] = opts
        L = MixtureLoader(store, cells, batch_size=args.batch_size, seed=0, device=dev, var_joinids=genes, **opts)
        if "x_cache" in opts:
            extra["x_cache"] = L.ensure_x_cache()
        extra["setup_s"] = time.perf_counter() - t_setup
        r = _measure(L, args.warmup, args.max_cells, lambda b: b["dataset_id"].numpy(), lambda b: b["X"])
        L.close()  # joins read processes, so their peak RSS is in RUSAGE_CHILDREN
        extra["read_process_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    elif method == "tiledbsoma_ml":
        import tiledbsoma as soma
        from tiledbsoma_ml import ExperimentDataset

        lut = {d: i for i, d in enumerate(dsnames)}
        exp = soma.Experiment.open(uri, context=store.context)
        q = exp.axis_query("RNA", obs_query=soma.AxisQuery(coords=(cells,)), var_query=soma.AxisQuery(coords=(genes,)))
        ds = ExperimentDataset(q, layer_name="raw", obs_column_names=["dataset_id"], batch_size=args.batch_size,
                               io_batch_size=args.io_batch_size, shuffle=True, seed=0)
        extra["setup_s"] = time.perf_counter() - t_setup

        def dense(b):
            return torch.from_numpy(np.asarray(b[0], dtype=np.float32)).to(dev)

        r = _measure(iter(ds), args.warmup, args.max_cells,
                     lambda b: np.asarray([lut[d] for d in b[1]["dataset_id"]]), dense)
    elif method == "scvi_memory":
        import anndata as ad
        import pandas as pd
        import scipy.sparse as sp
        import scvi
        from scvi.dataloaders import AnnDataLoader

        obs = store.obs(["dataset_id"]).to_pandas()
        parts = [m for _, m in store.iter_X(cells, genes, chunk_size=65536)]
        adata = ad.AnnData(X=sp.vstack(parts).tocsr(), obs=pd.DataFrame({"batch": pd.Categorical(obs["dataset_id"])},
                                                                       index=obs["soma_joinid"].astype(str)))
        extra["anndata_build_s"] = time.perf_counter() - t_setup
        scvi.model.LinearSCVI.setup_anndata(adata, batch_key="batch")
        mgr = scvi.model.LinearSCVI._get_most_recent_anndata_manager(adata)
        dl = AnnDataLoader(mgr, batch_size=args.batch_size, shuffle=True)
        r = _measure(iter(dl), args.warmup, args.max_cells, lambda b: b["batch"].numpy().ravel().astype(np.int64),
                     lambda b: b["X"].to(dev))
    elif method == "scdataset":
        r = _scdataset(store, uri, genes, dsnames, args, dev)
        extra.update({k: r.pop(k) for k in ("h5ad_export_s", "setup_s")})
    elif method == "bionemo_scdl":
        r = _bionemo(store, uri, genes, dsnames, args, dev)
        extra.update({k: r.pop(k) for k in ("h5ad_export_s", "prep_s", "collection_bytes", "setup_s")})
    elif method == "annbatch":
        r = _annbatch(store, uri, genes, args)
        extra.update({k: r.pop(k) for k in ("prep_s", "collection_bytes", "prep_peak_rss_mib", "h5ad_export_s")})
        r.pop("method")
        ent = shuffle_entropy([np.asarray(c) for c in r.pop("codes")], n_categories=len(dsnames))
        return {"method": method, **{k: r[k] for k in ("cells", "seconds", "cells_per_s", "cpu_s")}, **extra,
                "peak_rss_mib": r["peak_rss_mib"], "entropy": ent}
    else:
        raise SystemExit(f"unknown method {method}")
    ent = shuffle_entropy(r.pop("codes"), n_categories=len(dsnames))
    return {"method": method, **r, **extra, "peak_rss_mib": _rss_mib(), "entropy": ent}


def _export(store, uri: str) -> tuple[Path, float | None]:
    """An h5ad of every cell and gene of the store (``atlasmix store export``), cached in the workdir;
    the peers that read files of their own start from it. Returns its path and the export time
    (None when it was there already)."""
    from atlasmix.store.query import export_h5ad

    h5ad = Path(uri).parent / "all_cells.h5ad"
    if h5ad.exists():
        return h5ad, None
    t0 = time.perf_counter()
    export_h5ad(store, "TRUE", h5ad, genes="all")
    return h5ad, time.perf_counter() - t0


def _scdataset(store, uri: str, genes: np.ndarray, dsnames: list, args, dev) -> dict:
    """scDataset 0.3.0 as its README shows for a backed AnnData: ``BlockShuffling`` (its default
    block of 8 cells), ``fetch_factor`` 16, ``adata_to_mindex`` (materialise and densify each fetch),
    a torch ``DataLoader`` with 2 worker processes. No preparation beyond the h5ad; a gene subset is
    taken from each fetch's rows once in memory (a backed AnnData cannot be viewed twice)."""
    from functools import partial

    import anndata as ad
    import torch
    from scdataset import BlockShuffling, scDataset
    from scdataset.transforms import adata_to_mindex

    h5ad, export_s = _export(store, uri)
    t0 = time.perf_counter()
    adata = ad.read_h5ad(h5ad, backed="r")
    var_pos = pd_index_positions(adata.var_names, store.var().loc[genes, "feature_id"].astype(str))
    subset = None if len(var_pos) == adata.n_vars else var_pos
    lut = {d: i for i, d in enumerate(dsnames)}

    def fetch(c, idx):  # a backed AnnData cannot be viewed twice: rows first, then the gene columns
        rows = c[idx].to_memory()
        return rows if subset is None else rows[:, subset]

    ds = scDataset(adata, BlockShuffling(), batch_size=args.batch_size, fetch_factor=16, seed=0, fetch_callback=fetch,
                   fetch_transform=partial(adata_to_mindex, columns=["dataset_id"]),
                   batch_transform=lambda b: (torch.from_numpy(np.ascontiguousarray(b["X"], dtype=np.float32)),
                                              np.asarray([lut[d] for d in b["dataset_id"]])))
    dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, prefetch_factor=2, persistent_workers=False)
    setup_s = time.perf_counter() - t0
    r = _measure(iter(dl), args.warmup, args.max_cells, lambda b: b[1], lambda b: b[0].to(dev))
    return {**r, "h5ad_export_s": export_s, "setup_s": setup_s}


def pd_index_positions(index, names) -> np.ndarray:
    """Positions of ``names`` in a pandas ``index`` (all must be there)."""
    pos = index.get_indexer(list(names))
    if (pos < 0).any():
        raise SystemExit("a benchmark gene is missing from the h5ad export")
    return pos


def _bionemo(store, uri: str, genes: np.ndarray, dsnames: list, args, dev) -> dict:
    """BioNeMo SCDL 0.1.3: ``SingleCellMemMapDataset`` converts the h5ad once into its memory-mapped
    CSR (paginated, 100,000 rows per block; timed as preparation, cached), then a torch ``DataLoader`` with a shuffled sampler and its
    ``collate_sparse_matrix_batch`` (its documented use), densified on the device. Rows come back
    whole: a gene subset is taken from the dense batch."""
    import anndata as ad
    import torch
    from bionemo.scdl.io.single_cell_memmap_dataset import SingleCellMemMapDataset
    from bionemo.scdl.util.torch_dataloader_utils import collate_sparse_matrix_batch

    h5ad, export_s = _export(store, uri)
    path = Path(uri).parent / "bionemo_scdl"
    prep_s = None
    if not (path / ".done").exists():
        import shutil

        shutil.rmtree(path, ignore_errors=True)
        t0 = time.perf_counter()
        # its paginated conversion, 100,000 rows at a time: the default block of 1M rows held a whole
        # 1M-cell h5ad in memory and was killed at 24 GiB
        SingleCellMemMapDataset(str(path), h5ad_path=str(h5ad), use_X_not_raw=True, paginated_load_cutoff=1000,
                                load_block_row_size=100_000)
        prep_s = time.perf_counter() - t0
        (path / ".done").write_text(str(prep_s))
    t0 = time.perf_counter()
    ds = SingleCellMemMapDataset(str(path))
    a = ad.read_h5ad(h5ad, backed="r")
    lut = {d: i for i, d in enumerate(dsnames)}
    codes = np.asarray([lut[d] for d in a.obs["dataset_id"].astype(str)])
    var_pos = torch.from_numpy(pd_index_positions(a.var_names, store.var().loc[genes, "feature_id"].astype(str)))
    n_all = a.n_vars
    a.file.close()
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()
    dl = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, sampler=order,
                                     collate_fn=collate_sparse_matrix_batch, num_workers=0)
    setup_s = time.perf_counter() - t0
    seen = [0]  # batches densified so far (every batch, warm-up included; codes only after it)

    def dense(b):
        seen[0] += 1
        d = b.to(dev).to_dense().float()
        if d.shape[1] < n_all:  # the collate sizes columns to the largest index in the batch
            d = torch.nn.functional.pad(d, (0, n_all - d.shape[1]))
        return d if len(var_pos) == n_all else d[:, var_pos.to(dev)]

    def code(_):
        s = (seen[0] - 1) * args.batch_size
        return codes[order[s:s + args.batch_size]]

    r = _measure(iter(dl), args.warmup, args.max_cells, code, dense)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {**r, "h5ad_export_s": export_s, "prep_s": prep_s, "collection_bytes": size, "setup_s": setup_s}


def _annbatch(store, uri: str, genes: np.ndarray, args) -> dict:
    """annbatch 0.3 in its own Python >= 3.12 venv (``--annbatch-python``) via ``peer_annbatch.py``.

    Its input is an h5ad of every cell of the store (``atlasmix store export``, cached in the
    workdir, export time reported); its pre-shuffled collection per gene list is its preparation,
    timed (and its peak RSS reported) in a first call, then read in a second process."""
    wd = Path(uri).parent
    h5ad, export_s = _export(store, uri)
    var = store.var()
    tag = f"g{len(genes)}"
    cmd = [args.annbatch_python, str(Path(__file__).with_name("peer_annbatch.py")), "--h5ad", str(h5ad),
           "--collection", str(wd / f"annbatch_{tag}.zarr"), "--max-cells", str(args.max_cells),
           "--batch-size", str(args.batch_size), "--warmup", str(args.warmup),
           "--dataset-size", args.annbatch_dataset_size]
    if len(genes) < len(var):
        gfile = wd / f"annbatch_{tag}.txt"
        gfile.write_text("\n".join(var.loc[genes, "feature_id"].astype(str)) + "\n")
        cmd += ["--genes", str(gfile)]
    first = None
    for _ in range(2):  # the first call may build the collection (its RSS is the preparation's)
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(f"annbatch failed: {p.stderr[-2000:]}")
        r = json.loads(p.stdout.strip().splitlines()[-1])
        if not r["prep_built_now"]:
            break
        first = r
    r["prep_peak_rss_mib"] = first["prep_peak_rss_mib"] if first else None
    r["h5ad_export_s"] = export_s
    return r


def evict_page_cache(root: Path) -> int:
    """Drop every file under ``root`` from the page cache (``posix_fadvise(POSIX_FADV_DONTNEED)``; clean
    pages only, hence the fsync first). Returns the bytes of the files visited."""
    total = 0
    for f in root.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)  # dirty pages are not dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                total += os.fstat(fd).st_size
            finally:
                os.close(fd)
    return total


def method_files(method: str, args) -> list[Path]:
    """The files a method reads while timed (for ``--cache warm``)."""
    wd, name = args.workdir, method.split(":")[0]
    tag = f"g{args.n_genes}" if args.n_genes else "g19907"
    if name == "atlasmix":
        if "x_cache" in method:
            return [Path(args.x_cache_dir)]
        return [wd / "store" / "x_layout"] if "x_source=tiledb" not in method else [wd / "store" / "ms"]
    return {"tiledbsoma_ml": [wd / "store" / "ms"], "scvi_memory": [wd / "store" / "ms"],
            "annbatch": [wd / f"annbatch_{tag}.zarr"], "scdataset": [wd / "all_cells.h5ad"],
            "bionemo_scdl": [wd / "bionemo_scdl"]}.get(name, [])


def warm_page_cache(paths: list[Path]) -> int:
    """Read every file under ``paths`` once (into the page cache); returns the bytes read."""
    total = 0
    for root in paths:
        for f in ([root] if root.is_file() else sorted(root.rglob("*"))):
            if f.is_file():
                with open(f, "rb", buffering=0) as fh:
                    while chunk := fh.read(1 << 24):
                        total += len(chunk)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-cells", type=int, default=1_000_000)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_loader"))
    ap.add_argument("--max-cells", type=int, default=200_000, help="cells timed per loader")
    ap.add_argument("--warmup", type=int, default=2, help="minibatches before timing starts")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--io-batch-size", type=int, default=65536)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--io-threads", type=int, default=2)
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--methods", default="atlasmix,tiledbsoma_ml,scvi_memory",
                    help="comma-separated; atlasmix options as atlasmix:io_threads=8:block_size=512")
    ap.add_argument("--n-genes", type=int, default=0, help="gene axis: a seeded random subset of this many "
                    "genes (0: every gene)")
    ap.add_argument("--annbatch-python", default="/tmp/ab312/bin/python",
                    help="python of a venv with annbatch[zarrs] 0.3 (Python >= 3.12) for method annbatch")
    ap.add_argument("--annbatch-dataset-size", default="20GB",
                    help="annbatch add_adatas dataset_size (its default; 4GB keeps a 1M-cell preparation in RAM)")
    ap.add_argument("--x-cache-dir", default=None, help="folder of atlasmix:x_cache=1 (default: WORKDIR/xcache)")
    ap.add_argument("--cache", choices=("as-is", "warm", "cold"), default="as-is",
                    help="page cache before each method: as-is (whatever earlier methods left), cold (the "
                    "workdir's files evicted with posix_fadvise DONTNEED: every read comes from the disk, as "
                    "for a corpus larger than RAM) or warm (evicted, then the method's own files read once)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--uri", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.uri, args)))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    uri = build_store(args.workdir, args.n_cells)
    if args.x_cache_dir is None:
        args.x_cache_dir = str(args.workdir / "xcache")
    built = json.loads((Path(uri) / ".built").read_text())
    results = []
    for m in args.methods.split(","):
        cmd = [sys.executable, __file__, "--one", m, "--uri", uri] + [
            a for k, v in vars(args).items() if k not in ("one", "uri", "workdir", "methods", "n_cells", "cache")
            for a in (f"--{k.replace('_', '-')}", str(v))]
        if args.cache != "as-is":
            evict_page_cache(args.workdir)
        if args.cache == "warm":
            print(f"{m}: read {warm_page_cache(method_files(m, args)) / 1e9:.1f} GB into the page cache", file=sys.stderr)
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode:
            print(f"{m} failed:\n{p.stderr[-2000:]}", file=sys.stderr)
            continue
        results.append(json.loads(p.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), file=sys.stderr)
    base = {r["method"]: r["cells_per_s"] for r in results}
    print(f"store: {built['n_cells']:,} simulated cells (19,907 genes; gene axis "
          f"{args.n_genes or 'all'}); batch {args.batch_size}, "
          f"io batch {args.io_batch_size}, device {args.device}, {args.max_cells:,} cells timed")
    cores = len(os.sched_getaffinity(0))
    print(f"{'method':<36}{'cells/s':>12}{'x tdbml':>9}{'CPU us/cell':>12}{'cores busy':>11}"
          f"{f'ceiling {cores} cores':>17}{'peak RSS MiB':>14}{'entropy':>9}{'iid':>7}{'ratio':>7}")
    for r in results:
        e = r["entropy"]
        rel = r["cells_per_s"] / base["tiledbsoma_ml"] if base.get("tiledbsoma_ml") else float("nan")
        cpu = r.get("cpu_s", float("nan"))  # results of an older run have no CPU time
        per_cell = cpu / r["cells"] if r["cells"] else float("nan")
        print(f"{r['method']:<36}{r['cells_per_s']:>12,.0f}{rel:>9.2f}{per_cell * 1e6:>12.1f}"
              f"{cpu / r['seconds'] if r['seconds'] else float('nan'):>11.2f}{cores / per_cell:>17,.0f}"
              f"{r['peak_rss_mib']:>14,.0f}{e['entropy_bits']:>9.3f}{e['iid_entropy_bits']:>7.3f}{e['ratio']:>7.3f}")
    print(f"CPU us/cell: CPU time (user + system, all threads, live worker processes included) per timed cell; "
          f"ceiling: {cores} cores / that, the most cells/s the method can reach on these cores")
    for r in results:
        if r["method"] == "annbatch":
            rss = (f"peak RSS {r['prep_peak_rss_mib']:,.0f} MiB" if r["prep_peak_rss_mib"]
                   else "built by an earlier run")
            print(f"annbatch: pre-shuffled collection {r['collection_bytes'] / 1e9:.2f} GB, prepared in "
                  f"{r['prep_s']:.0f} s ({rss}) from an h5ad export of the store")
        if r["method"] == "bionemo_scdl":
            prep = f"converted in {r['prep_s']:.0f} s" if r["prep_s"] else "converted by an earlier run"
            print(f"bionemo_scdl: memory-mapped copy {r['collection_bytes'] / 1e9:.2f} GB, {prep}, from the h5ad export")
        if r.get("h5ad_export_s"):
            print(f"{r['method']}: h5ad export of the store took {r['h5ad_export_s']:.0f} s (shared by the peers)")
        if "x_cache" in r:
            xc = r["x_cache"]
            print(f"{r['method']}: x cache {xc['n_obs']:,} cells x {xc['n_vars']:,} genes, {xc['nnz']:,} nonzeros, "
                  f"{'built in ' + str(xc['build_s']) + ' s' if xc['built'] else 'found (built earlier)'}")
    (args.workdir / "results.json").write_text(json.dumps({"store": built, "args": {k: str(v) for k, v in vars(args).items()},
                                                            "results": results}, indent=1))


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


if __name__ == "__main__":
    main()
