"""LDVAE training throughput end to end: streamed from the store vs scvi-tools in memory vs compute floor.

Usage::

    python benchmarks/bench_ldvae.py --workdir /tmp/bench_loader --n-cells 1000000 --train-cells 200000 --epochs 3

Uses (or builds, cached in ``--workdir``, shared with ``bench_loader.py``) a store from a simulated
atlas (19,907 genes, ~1,700 nonzeros per cell, six sources). A manifest of ``--train-cells`` cells
drawn at random from the store (a mixture spec over every cell, resolved with ``atlasmix.mixing``)
is trained on with LinearSCVI (scFM-datamix settings: n_latent 10, n_layers 2, n_hidden 128, nb,
lr 5e-3; ``dataset_id`` as batch key) for ``--epochs`` epochs, batch ``--batch-size``, all genes:

* ``atlasmix``: :func:`atlasmix.training.ldvae.train_ldvae` -- the :class:`MixtureLoader` streams
  the manifest's cells from the store (on CUDA: IO batches copied once, minibatches densified on the
  GPU), no AnnData of the mixture;
* ``scvi_memory``: the same cells read into an in-memory AnnData (CSR; build time reported
  separately), ``LinearSCVI.setup_anndata`` + ``model.train`` with scvi-tools' own AnnDataLoader
  (``train_size=1``, no validation, same settings);
* ``compute_floor``: the LinearSCVI module's training step (forward, ELBO, backward, Adam) on
  minibatches already dense on the device, cycled: the most any loader can reach.

Throughput is cells per second of *training* after the first epoch (epoch start to epoch end,
timed by a Lightning callback; the first epoch includes set-up and warm-up), and the GPU's busy
fraction sampled with NVML every 50 ms during those epochs (when ``pynvml`` is importable). Each
method runs in its own subprocess so peak RSS (Linux ``VmHWM``) is its own. ``--n-genes N`` trains on
a seeded random N genes (as ``bench_loader.py``); method ``atlasmix:x_cache=1`` / ``=h5`` reads
through an x cache projection (:mod:`atlasmix.training.xcache`, built before the timed epochs). Prints a table and writes
``--workdir/ldvae_results.json``.

Measured (2026-11-23, one NVIDIA H100 80GB, 16 CPU cores; 200,000 random cells of a
1,000,000-cell simulated store, 19,907 genes, batch 1024, 3 epochs, epochs 2-3 timed)::

    method                                  cells/s  x scvi mem  GPU busy %  peak RSS MiB
    atlasmix (io_threads=8, block 64)        14,187       0.77          11        29,348
    atlasmix (read_processes=8)              12,587       0.68           9        26,129
    scvi_memory (AnnData build 31 s)         18,497       1.00          15        15,507
    compute_floor                           120,433       6.51          66         4,806

On a 40,000-cell store (mostly in the page cache) the same LDVAE trained at 22,000 cells/s from the
store; restricting TileDB's compute/IO concurrency to 4, 2, 1 threads gave 15,000, 10,000 and
6,000-8,000 cells/s: training from the store is bound by TileDB's decode (the loader alone reaches
42-58k cells/s but slows ~3x while the training loop shares the machine), not by the GPU or by host
work per minibatch (none: minibatches are cut and densified on the GPU). The issue-5 goal
(>= 2x scvi-tools in memory) was not reached. scvi-tools' own in-memory loop is itself host-bound
(CSR -> dense on the CPU: 18 ms per batch, pageable 80 MB copies: 11 ms).

Measured on the CPU (2026-11-23, 2 cores, no GPU; 100,000 random cells of a 1,000,000-cell store,
2,000 genes (``--n-genes 2000``), batch 1024, 3 epochs, epochs 2-3 timed)::

    method                                  cells/s  x scvi mem  peak RSS MiB
    atlasmix (from the store, io_threads=4)   2,045       0.32        17,220
    atlasmix:x_cache=h5                       5,002       0.77         1,355
    atlasmix:x_cache=1 (tiledb)               5,889       0.91         4,492
    scvi_memory (AnnData build 38 s)          6,472       1.00         7,775
    compute_floor                             6,572       1.02         3,671

Through an x cache, training from the store runs at the CPU's compute floor (the h5 / tiledb
difference is within this machine's ~15 % noise); from the store it decodes ~10x the nonzeros it
uses. The 17 GiB of the store path are its four concurrent 65,536-cell whole-transcriptome reads
(``--io-batch-size`` / ``--io-threads`` bound it).

With the store's x layout (issue 19), 2026-12-05, same 2-core machine: 20,000 random cells of a
200,000-cell simulated store, 2,000 random genes, batch 256, io batch 16,384, 4 epochs (2-4 timed),
two runs (``--methods atlasmix,atlasmix:x_source=tiledb,scvi_memory,compute_floor,atlasmix`` then
``atlasmix:io_threads=1,atlasmix:x_cache=h5,scvi_memory``)::

    method                                  cells/s          x scvi mem   peak RSS MiB
    atlasmix (x layout, default)            4,471 / 4,697    0.63 / 0.66  1,241-1,245
    atlasmix:io_threads=1                   4,548            0.58         1,203
    atlasmix:x_source=tiledb                1,708            0.24         4,455
    atlasmix:x_cache=h5                     8,066            1.03         1,054
    scvi_memory                             7,141 / 7,821    1.00         1,057-1,061
    compute_floor                           8,777            1.23           917

From the layout, training is 2.6x faster than from TileDB X with a quarter of the memory, but still
below scvi-tools in memory (0.6x): the layout decodes whole rows (~10x the nonzeros of 2,000
genes), and on 2 cores that decode competes with the training step. Through the per-mixture h5 x
cache it is level with scvi-tools in memory (the issue-19 goal; AnnData build excluded).

With the split held in memory (``train_ldvae(in_memory="auto")``, the default since 2026-12-05;
:mod:`atlasmix.training.memory`), same machine, 20,000 random cells of a 1,000,000-cell simulated
store, 2,000 random genes, batch 256, io batch 16,384, 4 epochs (2-4 timed), one run
(``--methods atlasmix,atlasmix:in_memory=0,scvi_memory,compute_floor,atlasmix``); set-up = the one
read of the split into memory (atlasmix) or the AnnData build (scvi-tools)::

    method                                  cells/s  x scvi mem  peak RSS MiB  set-up s  train s
    atlasmix (in memory, default)           7,449 / 7,352  1.01 / 1.00  1,164-1,173  5.9 / 3.8  10.9
    atlasmix:in_memory=0 (streamed)         3,520       0.48         1,377         0     22.5
    scvi_memory                             7,354       1.00         1,171       3.7     11.2
    compute_floor                           8,786       1.19         1,053

Streamed from the layout, a 2 % sample of the store decodes whole rows (~10x the nonzeros of 2,000
genes) and, each inner chunk holding ~10 cells, ~10 cells per cell it uses; read once in store
order and held (11 MB here), the split trains level with scvi-tools in memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_loader import build_store  # noqa: E402


class _GpuSampler:
    """Mean NVML utilisation.gpu (percent) between ``start`` and ``stop``; None without NVML/CUDA."""

    def __init__(self, enabled: bool = True):
        self.samples: list[int] = []
        self._run = False
        self._nvml = None
        if not enabled:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._h = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._nvml = pynvml
        except Exception:  # noqa: BLE001
            self._nvml = None

    def _loop(self):
        while self._run:
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._h).gpu)
            time.sleep(0.05)

    def start(self):
        if self._nvml is not None and not self._run:
            self._run = True
            self._t = threading.Thread(target=self._loop, daemon=True)
            self._t.start()

    def stop(self):
        if self._run:
            self._run = False
            self._t.join()

    def mean(self):
        return float(np.mean(self.samples)) if self.samples else None


def _epoch_timer(sampler: _GpuSampler):
    from lightning.pytorch import Callback

    class EpochTimer(Callback):
        def __init__(self):
            self.times: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module):
            self._t0 = time.perf_counter()
            if trainer.current_epoch >= 1:
                sampler.start()

        def on_train_epoch_end(self, trainer, pl_module):
            self.times.append(time.perf_counter() - self._t0)
            if trainer.current_epoch == trainer.max_epochs - 1:
                sampler.stop()

    return EpochTimer()


def make_manifest(uri: str, workdir: Path, n_cells: int) -> Path:
    """A manifest of ``n_cells`` random cells of the store (all train), cached in ``workdir``."""
    from atlasmix.mixing import loads_spec, resolve, write_manifest
    from atlasmix.store import Store

    path = workdir / f"bench_{n_cells}.parquet"
    store = Store(uri)
    ident = store.identity()["state_hash"]
    tag = workdir / f"bench_{n_cells}.state"
    if path.exists() and tag.exists() and tag.read_text() == ident:
        return path
    spec = loads_spec(f'name = "bench_{n_cells}"\nseed = 0\n[[components]]\nname = "all"\n'
                      f'where = "soma_joinid >= 0"\nn_cells = {n_cells}\n', "bench.toml")
    write_manifest(resolve(spec, store), path, overwrite=True)
    tag.write_text(ident)
    return path


def _rss_mib() -> float:
    """Peak RSS of this process's own address space (see ``bench_loader._rss_mib``)."""
    from bench_loader import _rss_mib as own_peak

    return own_peak()


def run_one(method: str, uri: str, manifest: Path, args) -> dict:
    import torch

    from atlasmix.mixing import read_manifest
    from atlasmix.store import Store
    from atlasmix.training.defaults import DEFAULTS

    from bench_loader import gene_axis, method_options

    store = Store(uri)
    table, _ = read_manifest(manifest, store=store)
    cells = np.sort(table["soma_joinid"].to_numpy())
    genes = gene_axis(store, args.n_genes)  # var joinids: every gene, or a seeded random --n-genes
    accel = "gpu" if torch.cuda.is_available() else "cpu"
    sampler = _GpuSampler(enabled=accel == "gpu")
    timer = _epoch_timer(sampler)
    extra: dict = {}
    if method.startswith("atlasmix"):
        import shutil

        from atlasmix.training.ldvae import train_ldvae

        opts = method_options(method, args, args.workdir / "xcache")  # e.g. atlasmix:io_threads=8:x_cache=h5
        extra["options"] = opts
        if len(genes) < len(store.var()):
            opts["genes"] = store.var().loc[genes, "feature_id"].tolist()
        out = args.workdir / "ldvae_run"
        shutil.rmtree(out, ignore_errors=True)
        run = train_ldvae(store, manifest, out, accelerator=accel, batch_size=args.batch_size,
                          max_epochs=args.epochs, validation=False, checkpoint_every=0, progress=False,
                          prior_cells=20_000, callbacks=[timer], **opts)
        extra["wall_s"] = run["wall_s"]
        extra["in_memory"] = run.get("in_memory", {})
        extra["setup_s"] = round(sum(v.get("read_s", 0) for v in extra["in_memory"].values()), 2)
        if run.get("x_cache"):
            extra["x_cache"] = run["x_cache"]
            extra["setup_s"] += round(sum(v.get("build_s", 0) for v in run["x_cache"].values()), 2)
    elif method == "scvi_memory":
        import anndata as ad
        import pandas as pd
        import scipy.sparse as sp
        import scvi

        t0 = time.perf_counter()
        obs = store.obs(["dataset_id"]).to_pandas().set_index("soma_joinid").loc[cells]
        parts = [m for _, m in store.iter_X(cells, genes, chunk_size=65536)]
        adata = ad.AnnData(X=sp.vstack(parts).tocsr(),
                           obs=pd.DataFrame({"batch": pd.Categorical(obs["dataset_id"])}, index=cells.astype(str)))
        del parts
        extra["anndata_build_s"] = extra["setup_s"] = round(time.perf_counter() - t0, 2)
        scvi.settings.seed = 0
        scvi.model.LinearSCVI.setup_anndata(adata, batch_key="batch")
        model = scvi.model.LinearSCVI(adata, n_hidden=DEFAULTS["n_hidden"], n_latent=DEFAULTS["n_latent"],
                                      n_layers=DEFAULTS["n_layers"], dispersion=DEFAULTS["dispersion"],
                                      gene_likelihood=DEFAULTS["gene_likelihood"])
        t1 = time.perf_counter()
        model.train(max_epochs=args.epochs, batch_size=args.batch_size, accelerator=accel, devices=1, train_size=1.0,
                    early_stopping=False, plan_kwargs={"lr": DEFAULTS["lr"]}, callbacks=[timer],
                    enable_progress_bar=False, check_val_every_n_epoch=None)
        extra["wall_s"] = round(time.perf_counter() - t1, 2)
    elif method == "compute_floor":
        import anndata as ad
        import pandas as pd
        import scvi

        dev = torch.device("cuda" if accel == "gpu" else "cpu")
        n_batches = 16
        sub = cells[: n_batches * args.batch_size]
        (_, m), = list(store.iter_X(sub, genes, chunk_size=len(sub)))
        obs = store.obs(["dataset_id"]).to_pandas().set_index("soma_joinid")
        cats = sorted(obs["dataset_id"].unique())
        codes = torch.from_numpy(pd.Categorical(obs.loc[sub, "dataset_id"], categories=cats).codes.astype(np.int64))
        tmpl = ad.AnnData(X=m[:256].tocsr(), obs=pd.DataFrame(
            {"batch": pd.Categorical(np.asarray(cats)[np.arange(256) % len(cats)], categories=cats)},
            index=np.arange(256).astype(str)))
        scvi.model.LinearSCVI.setup_anndata(tmpl, batch_key="batch")
        model = scvi.model.LinearSCVI(tmpl, n_hidden=DEFAULTS["n_hidden"], n_latent=DEFAULTS["n_latent"],
                                      n_layers=DEFAULTS["n_layers"], dispersion=DEFAULTS["dispersion"],
                                      gene_likelihood=DEFAULTS["gene_likelihood"])
        module = model.module.to(dev)
        X = torch.from_numpy(m.toarray()).to(dev)
        B = args.batch_size
        batches = [{"X": X[i * B:(i + 1) * B], "batch": codes[i * B:(i + 1) * B].reshape(-1, 1).to(dev),
                    "labels": torch.zeros((B, 1), dtype=torch.int64, device=dev)} for i in range(n_batches)]
        # scvi-tools' TrainingPlan default optimizer: Adam(lr, eps=0.01, weight_decay=1e-6)
        opt = torch.optim.Adam(module.parameters(), lr=DEFAULTS["lr"], eps=0.01, weight_decay=1e-6)

        def step(b):
            opt.zero_grad(set_to_none=True)
            _, _, loss = module(b, loss_kwargs={"kl_weight": 1.0})
            loss.loss.backward()
            opt.step()

        for b in batches[:4]:
            step(b)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        n_steps = max(n_batches, args.floor_steps)
        sampler.start()
        t0 = time.perf_counter()
        for i in range(n_steps):
            step(batches[i % n_batches])
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        sampler.stop()
        timer.times = [0.0, dt * len(cells) / (n_steps * args.batch_size)]  # as if one epoch of the manifest
    else:
        raise SystemExit(f"unknown method {method}")
    steady = timer.times[1:] if len(timer.times) > 1 else timer.times
    cps = len(cells) * len(steady) / sum(steady) if sum(steady) > 0 else float("nan")
    return {"method": method, "cells": int(len(cells)), "epoch_s": [round(t, 3) for t in timer.times],
            "cells_per_s": cps, "gpu_busy_pct": sampler.mean(), "peak_rss_mib": _rss_mib(),
            "device": torch.cuda.get_device_name(0) if accel == "gpu" else "cpu", **extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-cells", type=int, default=1_000_000, help="cells in the simulated store")
    ap.add_argument("--train-cells", type=int, default=200_000, help="cells in the training manifest")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_loader"))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--n-genes", type=int, default=0, help="gene axis: a seeded random subset of this many genes "
                    "(0: every gene), as bench_loader.py")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--io-batch-size", type=int, default=65536)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--io-threads", type=int, default=4)
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--floor-steps", type=int, default=200)
    ap.add_argument("--methods", default="atlasmix,scvi_memory,compute_floor")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--uri", help=argparse.SUPPRESS)
    ap.add_argument("--manifest", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.uri, args.manifest, args)))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    uri = build_store(args.workdir, args.n_cells)
    manifest = make_manifest(uri, args.workdir, args.train_cells)
    results = []
    for m in args.methods.split(","):
        cmd = [sys.executable, __file__, "--one", m, "--uri", uri, "--manifest", str(manifest)] + [
            a for k, v in vars(args).items() if k not in ("one", "uri", "methods", "manifest")
            for a in (f"--{k.replace('_', '-')}", str(v))]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode:
            print(f"{m} failed:\n{p.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(p.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), file=sys.stderr)
    base = {r["method"]: r["cells_per_s"] for r in results}
    dev = results[0]["device"] if results else "?"
    print(f"LinearSCVI (scFM-datamix settings), {args.train_cells:,} cells x {args.n_genes or 19907:,} genes from a "
          f"{args.n_cells:,}-cell store, batch {args.batch_size}, {args.epochs} epochs, device {dev}")
    print(f"{'method':<36}{'cells/s':>10}{'x scvi mem':>11}{'GPU busy %':>11}{'peak RSS MiB':>13}"
          f"{'set-up s':>10}{'train s':>9}")
    for r in results:
        rel = r["cells_per_s"] / base["scvi_memory"] if base.get("scvi_memory") else float("nan")
        busy = f"{r['gpu_busy_pct']:.0f}" if r["gpu_busy_pct"] is not None else "-"
        setup = f"{r['setup_s']:.1f}" if r.get("setup_s") is not None else "-"
        wall = f"{r['wall_s']:.1f}" if r.get("wall_s") is not None else "-"
        print(f"{r['method']:<36}{r['cells_per_s']:>10,.0f}{rel:>11.2f}{busy:>11}{r['peak_rss_mib']:>13,.0f}"
              f"{setup:>10}{wall:>9}")
    (args.workdir / "ldvae_results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                                 "results": results}, indent=1))


if __name__ == "__main__":
    main()
