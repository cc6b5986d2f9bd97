"""A study's grid: its cells as tasks, run (serially, in processes or on dask), their tables collected.

:func:`grid_tasks` lists the cells, :func:`execute` runs them with
:func:`atlasmix.study.grid_cell.run_grid_cell`, :func:`collect` reads the results, per-cell and curves
tables of :mod:`atlasmix.study.tables` from their folders.
"""

from __future__ import annotations

import json
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from atlasmix._files import sha256_of
from atlasmix.evaluation.models import N_SAMPLES
from atlasmix.mixing import read_sidecar
from atlasmix.study.grid_cell import run_grid_cell
from atlasmix.study.keys import safe_name, sha
from atlasmix.study.spec import PRETRAINED_KINDS, StudySpec
from atlasmix.study.tables import CURVES, PER_CELL, RESULTS


def grid_tasks(spec: StudySpec, manifests: dict, genes: list[str], eval_entries: list[dict], out: Path, store,
               threads: int, accelerator: str, eval_spec: Path | None = None, root: Path | None = None) -> list[dict]:
    """The grid cells of a study, as tasks for :func:`atlasmix.study.grid_cell.run_grid_cell`.

    One LDVAE task per (manifest, budget); per pretrained model kind of the spec (Geneformer, scGPT,
    scBERT) one task per (full-size manifest of its mixtures, seed). A task's ``train_key`` hashes
    what determines its model, ``score_key`` what determines its scores (module doc of
    :mod:`atlasmix.study.runner`).

    Returns
    -------
    list of dict
        The tasks (keys in :func:`atlasmix.study.grid_cell.run_grid_cell`), LDVAE first.
    """
    gsha = sha(genes)
    # (``decode``: scores from scvi-tools' get_normalized_expression, the mean over N_SAMPLES seeded
    # posterior samples of z per cell; grid cells scored before, from the posterior mean, are scored
    # again, not retrained)
    score_key = sha({"eval": [e["key"] for e in eval_entries], "opts": spec.evaluation.model_dump(mode="json"),
                     "decode": f"scvi_get_normalized_expression_n{N_SAMPLES}"})
    tasks = []
    for (mixture, seed, fraction, strategy), mpath in manifests.items():
        msha = read_sidecar(mpath)["manifest"]["sha256"]
        for b in spec.budget_objects():
            cfg = {"manifest": msha, "genes": gsha, "ldvae": spec.ldvae.model_dump(mode="json"), "budget": b.label,
                   "budget_options": b.model_dump(mode="json"), "seed": seed, "model": "ldvae"}
            key = sha(cfg)
            name = f"{safe_name(mixture)}__{safe_name(b.label)}__s{seed}__{key[:10]}"
            tasks.append({"store": store.uri, "manifest": str(mpath), "run_dir": str(out / "runs" / name),
                          "genes": genes, "ldvae": spec.ldvae.model_dump(mode="json"), "budget": b.label, "seed": seed,
                          "eval": eval_entries, "eval_opts": spec.evaluation.model_dump(mode="json"), "threads": threads,
                          "accelerator": accelerator, "device": "cuda" if accelerator == "gpu" else "cpu",
                          "train_key": key, "score_key": score_key,
                          "labels": {"mixture": mixture, "seed": seed, "budget": b.label, "fraction": fraction,
                                     "strategy": strategy}})
    for kind in PRETRAINED_KINDS:
        opts = getattr(spec, kind)
        if opts is None:
            continue
        names = opts.mixtures or [spec.reference or next(k[0] for k in manifests if k[2] is None)]
        # files named by the options, relative to the study file
        files = {f: getattr(opts, f) for f in ("dictionaries", "vocab", "genes", "gene2vec") if hasattr(opts, f)}
        files = {f: (str((root / v).resolve()) if v and root is not None else v) for f, v in files.items()}
        n_scored = opts.max_rank_cells if kind == "geneformer" else opts.max_scored_cells
        train_opts = opts.model_dump(mode="json")
        digests: dict[str, str] = {}
        if kind != "geneformer":  # (Geneformer's keys stay as they were: existing studies keep their runs)
            # scoring options do not retrain; an edited vocabulary / gene list / gene2vec file does
            train_opts.pop("max_scored_cells")
            digests = {f"{f}_sha256": sha256_of(v) for f, v in files.items() if v and Path(v).is_file()}
        score = sha({"eval_spec": str(eval_spec), "eval": [e["key"] for e in eval_entries],
                      ("max_rank_cells" if kind == "geneformer" else "max_scored_cells"): n_scored,
                      "seed": spec.evaluation.seed})
        for (mixture, seed, fraction, strategy), mpath in manifests.items():
            if fraction is not None or mixture not in names:
                continue
            msha = read_sidecar(mpath)["manifest"]["sha256"]
            key = sha({"manifest": msha, kind: train_opts, **files, **digests, "seed": seed, "model": kind})
            name = f"{kind}__{safe_name(mixture)}__{safe_name(opts.budget)}__s{seed}__{key[:10]}"
            tasks.append({"kind": kind, "store": store.uri, "manifest": str(mpath),
                          "run_dir": str(out / "runs" / name), kind: opts.model_dump(mode="json"), **files,
                          "seed": seed, "eval_spec": str(eval_spec),
                          "eval_opts": spec.evaluation.model_dump(mode="json"), "threads": threads,
                          "device": "cuda" if accelerator == "gpu" else "cpu", "train_key": key, "score_key": score,
                          "labels": {"mixture": mixture, "seed": seed, "budget": opts.budget, "fraction": None,
                                     "strategy": None}})
    return tasks


def execute(tasks: list[dict], jobs: int, log: Callable[[str], None], progress: bool, client=None) -> list[dict]:
    """Run every task (inline, in ``jobs`` spawned processes, or on a dask.distributed ``client``)
    and return their results (:func:`atlasmix.study.grid_cell.run_grid_cell`), in completion order."""
    results = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=False, disable=not progress) as prog:
        bar = prog.add_task("grid cells", total=len(tasks))
        if client is not None:  # dask.distributed workers: one grid cell per task, written to the shared out/
            from distributed import as_completed as dask_completed  # (only with a dask cluster)

            futs = client.map(run_grid_cell, tasks, pure=False)
            names = {f.key: Path(t["run_dir"]).name for f, t in zip(futs, tasks)}
            try:
                for f in dask_completed(futs):
                    r = f.result()  # a failed cell raises here, as in a serial run
                    results.append(r)
                    prog.advance(bar)
                    log(f"   {names[f.key]}: {r['status']} ({r['wall_s']:.1f} s)")
            except BaseException:
                client.cancel(futs)
                raise
        elif jobs <= 1:
            for t in tasks:
                r = run_grid_cell(t)
                results.append(r)
                prog.advance(bar)
                log(f"   {Path(t['run_dir']).name}: {r['status']} ({r['wall_s']:.1f} s)")
        else:
            with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as ex:
                futs = {ex.submit(run_grid_cell, t): t for t in tasks}
                for f in as_completed(futs):
                    r = f.result()
                    results.append(r)
                    prog.advance(bar)
                    log(f"   {Path(futs[f]['run_dir']).name}: {r['status']} ({r['wall_s']:.1f} s)")
    return results


def collect(tasks: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """results, per_cell and curves tables of every grid cell."""
    res, per, cur = [], [], []
    for t in tasks:
        d = Path(t["run_dir"])
        lab = t["labels"]
        kind = t.get("kind", "ldvae")
        base = {"run_key": t["train_key"], "model_kind": kind, "mixture": lab["mixture"], "seed": lab["seed"],
                "budget": lab["budget"], "fraction": lab["fraction"], "strategy": lab["strategy"]}
        run = json.loads((d / kind / "run.json").read_text())
        tr = run["training"]
        s = pd.read_parquet(d / "scores.parquet")
        extra = pd.DataFrame([{"eval_set": "-", "metric": k, "value": float(v)} for k, v in (
            ("train_steps", tr["steps"]), ("train_cells_seen", tr["cells_seen"]), ("train_epochs", tr["epochs"]),
            ("train_final_loss", tr["final_train_loss"]),
            ("validation_final_loss", tr["final_validation_loss"] if tr["final_validation_loss"] is not None else np.nan),
            ("converged", float(tr["convergence"]["converged"] is True)),  # None (too few points to judge): no
            ("convergence_improvement_last_quarter", tr["convergence"]["improvement_last_quarter"]
             if tr["convergence"]["improvement_last_quarter"] is not None else np.nan),
            ("train_wall_s", run["wall_s"]))])
        res.append(pd.concat([s, extra], ignore_index=True).assign(**base))
        per.append(pd.read_parquet(d / "per_cell.parquet").assign(**base))
        c = pd.read_csv(d / kind / "training_curve.csv")
        if kind != "ldvae":  # pretraining loss per logging step; no validation split
            c = pd.DataFrame({"step": c["step"], "cells_seen": c["step"] * t[kind]["batch_size"],
                              "epoch": c["epoch"], "train_loss": c["loss"], "validation_loss": np.nan})
        cur.append(c.assign(**base))
    results = pd.concat(res, ignore_index=True)[RESULTS]
    per_cell = pd.concat(per, ignore_index=True)[PER_CELL]
    curves = pd.concat(cur, ignore_index=True)[CURVES]
    return results, per_cell, curves
