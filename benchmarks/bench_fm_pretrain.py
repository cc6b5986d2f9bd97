"""Pretraining throughput of the foundation models streamed from the store: cells/s and data wait.

Usage::

    python benchmarks/bench_fm_pretrain.py --store STORE --mixture MANIFEST [--models scgpt,scbert,geneformer]
        [--preset paper|tiny] [--steps 20] [--device cpu|cuda]

Each model trains ``--steps`` optimizer steps from the store in this process, one after the other
(same store, same manifest, same device), at its published size (``--preset paper``: scGPT 12
layers / 8 heads / 512 with 1,200 tokens, scBERT dim 200 / depth 6 / heads 10 on a 16,906-gene axis,
Geneformer V1 6 layers / 256 with 2,048 tokens) or ``tiny``. Reported per model: cells/s of the whole
call and the fraction of its wall time the training loop waited for the next encoded batch (the
loader and the encoding run ahead in threads; a fraction near 0 means the model, not the data,
bounds the speed). scBERT's gene axis here is the store's first 16,906 gene symbols (PanglaoDB's
list is not on the machine); its cost does not depend on which genes they are.

Measured (2026-12-06, the project's 2-core CPU machine without a GPU, the shared-data store,
examples/mixtures/shared/base_model.toml resolved there: 7,555 cells; one run each, 2 torch threads)::

    model       preset  batch  steps  cells/s  data wait  notes
    scgpt       tiny    8      200    345      5.7%       2 layers, 32 dims, 256 tokens
    scbert      tiny    3      200    74       1.1%       2 layers, 32 dims, 2,001 tokens (2,000-gene axis)
    geneformer  tiny    12     40     47       0.7%       2 layers, 32 dims, 2,048 tokens
    scgpt       paper   4      3      5.1      13%        12 layers, 512, 1,200 tokens (start-up included)
    scbert      paper   2      3      0.031    0.1%       dim 200, depth 6, 16,907 tokens: 32 s per cell;
                                                          batch 4 exceeded the machine's 24 GiB (OOM)

The data pipeline (loader + encoding in a thread) keeps up with every model on the CPU: the waits
are the first megabatch's read. GPU numbers need a lent device (``--device cuda``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--mixture", required=True)
    ap.add_argument("--models", default="scgpt,scbert,geneformer")
    ap.add_argument("--preset", choices=("paper", "tiny"), default="paper")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=None, help="default: scGPT 8, scBERT 3, Geneformer 12")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_fm_pretrain.json"))
    args = ap.parse_args()

    import torch

    from atlasmix.store import Store

    store = Store(args.store)
    results = {}
    paper = args.preset == "paper"
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "run"
            common = dict(max_steps=args.steps, warmup_steps=2, device=args.device, checkpoint_every=0,
                          log_every=max(1, args.steps // 4), io_batch_size=4096, seed=0)
            t0 = time.perf_counter()
            if name == "scgpt":
                from atlasmix.training.scgpt.pretrain import train_scgpt

                run = train_scgpt(store, args.mixture, out, preset="scgpt" if paper else "tiny",
                                  max_len=1200 if paper else 256, batch_size=args.batch_size or 8, **common)
            elif name == "scbert":
                from atlasmix.training.scbert.pretrain import train_scbert

                genes = Path(tmp) / "genes.txt"
                sym = store.var()["feature_name"].astype(str).drop_duplicates().tolist()[:16_906 if paper else 2_000]
                genes.write_text("\n".join(sym) + "\n")
                run = train_scbert(store, args.mixture, out, genes=genes, preset="scbert" if paper else "tiny",
                                   batch_size=args.batch_size or 3, **common)
            elif name == "geneformer":
                from atlasmix.training.geneformer.pretrain import train_geneformer

                run = train_geneformer(store, args.mixture, out, preset="v1" if paper else "tiny",
                                       batch_size=args.batch_size or 12, **common)
            else:
                ap.error(f"unknown model {name!r}")
            results[name] = {"preset": args.preset, "steps": run["steps"], "cells": run["cells_this_call"],
                             "train_cells_per_s": run["train_cells_per_s"],
                             "data_wait_fraction": run["data_wait_fraction"], "final_loss": run["final_loss"],
                             "loop_wall_s": run["wall_s"], "call_wall_s": round(time.perf_counter() - t0, 1),
                             "device": args.device, "torch_threads": torch.get_num_threads()}
            print(json.dumps({name: results[name]}), flush=True)
    print(f"\n{'model':<12}{'preset':<8}{'cells/s':>10}{'data wait':>11}{'loop s':>9}{'call s':>9}")
    for k, r in results.items():
        print(f"{k:<12}{r['preset']:<8}{r['train_cells_per_s']:>10.1f}{r['data_wait_fraction']:>11.1%}"
              f"{r['loop_wall_s']:>9.1f}{r['call_wall_s']:>9.1f}")
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
