"""``atlasmix study run``: resolve, train, evaluate and summarise a study grid, resumably.

Stages (each timed in ``study.json``)::

    manifests/    one manifest per (mixture, seed) -- the seed replaces the mixture spec's seed --
                  and per (scaling strategy, fraction, seed); reused while the spec and the store
                  are unchanged
    genes.txt     the models' shared gene axis (:func:`atlasmix.mixing.genes.choose_genes` or a file)
    eval_cache/   each eval set read from the store ONCE per study: its counts on the gene axis
                  (a seeded subsample when ``max_cells_per_set``), its top HVGs, its cells' obs;
                  every run is scored on exactly these cells
    runs/<id>/    one grid cell: ``ldvae/`` (the trained model, its run.json with the budget,
                  steps, cells seen and convergence), ``scores.parquet`` (per-cell r), ``done.json``
    results.parquet, per_cell.parquet, summary.parquet, deltas.parquet, curves.parquet,
    scaling*.parquet, checks.json, study.json, report.html   (see :mod:`atlasmix.study.tables`)

A grid cell's id is the sha256 of what determines its model -- the manifest's sha256, the gene
axis, the LDVAE options, the budget and the seed -- plus, for its scores, the eval cache's key. A
cell whose ``done.json`` carries the same ids is never recomputed; a cell interrupted mid-way is
started again from scratch. With ``jobs > 1`` grid cells train in that many spawned processes
(torch threads split between them); with a dask.distributed client (``study run --scheduler`` /
``--workers``) they are tasks on its workers, each running torch with its worker's thread count.
The results are the same as a serial run's when each task has the same number of torch threads:
torch's CPU kernels sum in an order that depends on it (1 thread instead of 2 moved the scores in
the 4th decimal in the tests).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from atlasmix.errors import AtlasmixError
from atlasmix.study import stats
from atlasmix.study.spec import PRETRAINED_KINDS, StudySpec, load_study
from atlasmix.study.tables import CURVES, DELTAS, PER_CELL, RESULTS, SCALING, SCALING_SMALLEST, SUMMARY

HEADLINE = "recon_pearson_median"
#: share of the best score that scFM-dataselection's "smallest sufficient subset" must reach
SCALING_THRESHOLD = 0.95


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in s)


# ---------------------------------------------------------------------------------------------- manifests
def scaled_spec(spec, fraction: float, strategy: str, balance_by: str):
    """A mixture spec whose every component keeps ``fraction`` of its cells, drawn by ``strategy``.

    Components with a ``fraction`` get it multiplied, with ``n_cells`` get ``round(n_cells x
    fraction)`` (at least 1), without a size get ``fraction``; a spec-level ``n_cells`` (weighted
    components) is scaled the same way. ``balanced`` balances by ``balance_by``; ``geometric_sketch``
    uses the sketch defaults unless the component set its own.

    Returns
    -------
    atlasmix.mixing.MixtureSpec
        Named ``<name>.<strategy>.f<fraction>`` (e.g. ``base_full.balanced.f0.25``).
    """
    from atlasmix.mixing.spec import MixtureSpec

    d = spec.model_dump()
    for c in d["components"]:
        if c.get("weight") is None:
            if c.get("n_cells") is not None:
                c["n_cells"] = max(1, int(round(c["n_cells"] * fraction)))
            else:
                c["fraction"] = (c.get("fraction") or 1.0) * fraction
        c["strategy"] = strategy
        c["balance_by"] = balance_by if strategy == "balanced" else None
        if strategy != "geometric_sketch":
            c["sketch"] = None
        if fraction < 1:
            c["take_all_if_short"] = True
    if d.get("n_cells") is not None:
        d["n_cells"] = max(1, int(round(d["n_cells"] * fraction)))
    d["name"] = f"{spec.name}.{strategy}.f{fraction:g}"
    return MixtureSpec.model_validate(d)


def _resolve_cached(spec, base_dir: Path, store, path: Path) -> Path:
    from atlasmix.mixing import resolve, write_manifest

    key = {"spec_hash": spec.spec_hash(), "state": store.identity()["state_hash"]}
    marker = path.with_suffix(".key.json")
    if path.is_file() and marker.is_file() and json.loads(marker.read_text()) == key:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(resolve(spec, store, base_dir=base_dir), path, overwrite=True)
    marker.write_text(json.dumps(key))
    return path


# ---------------------------------------------------------------------------------------------- eval cache
def _build_eval_cache(eval_sets, genes: list[str], opts, out: Path) -> list[dict]:
    """Read every eval set once: counts on ``genes`` (a seeded subsample), top HVGs, obs."""
    import scipy.sparse as sp

    from atlasmix.evaluation import metrics as M

    out.mkdir(parents=True, exist_ok=True)
    gsha = _sha(genes)
    entries = []
    for e in eval_sets:
        key = _sha({"joinids": _sha(e.joinids.tolist()), "genes": gsha, "n_hvg": opts.n_hvg,
                    "max_cells": opts.max_cells_per_set, "seed": opts.seed})
        f = out / f"{_safe(e.name)}.npz"
        meta = out / f"{_safe(e.name)}.json"
        if not (f.is_file() and meta.is_file() and json.loads(meta.read_text()).get("key") == key):
            n = e.n_cells
            pick = np.arange(n)
            if opts.max_cells_per_set is not None and n > opts.max_cells_per_set:
                rng = np.random.default_rng([opts.seed, int(hashlib.sha256(e.name.encode()).hexdigest()[:8], 16)])
                pick = np.sort(rng.choice(n, opts.max_cells_per_set, replace=False))
            h = M.HVGStats(len(genes))
            parts = []
            for sl, m in e.iter_counts(genes, 4096):  # one pass: HVG moments over all cells + the picked rows
                h.update(m)
                sel = pick[(pick >= sl.start) & (pick < sl.stop)] - sl.start
                if len(sel):
                    parts.append(m[sel])
            counts = sp.vstack(parts).tocsr() if parts else sp.csr_matrix((0, len(genes)), dtype=np.float32)
            hv = h.top_genes(opts.n_hvg)
            obs = e.obs.iloc[pick].reset_index(drop=True)
            np.savez(f, data=counts.data.astype(np.float32), indices=counts.indices, indptr=counts.indptr,
                     shape=np.array(counts.shape), hvg=np.asarray(hv, dtype=np.int64), pick=pick)
            obs[["cell_id", "soma_joinid", "dataset_id", "cell_type"]].astype(
                {"cell_id": str, "dataset_id": str, "cell_type": str}).to_parquet(out / f"{_safe(e.name)}.obs.parquet")
            meta.write_text(json.dumps({"key": key, "name": e.name, "n_cells": int(len(pick)),
                                        "n_cells_in_set": int(n), "n_hvg": int(len(hv))}))
        entries.append({"name": e.name, "npz": str(f), "obs": str(out / f"{_safe(e.name)}.obs.parquet"), "key": key})
    return entries


def _load_eval(entry: dict):
    import scipy.sparse as sp

    d = np.load(entry["npz"])
    counts = sp.csr_matrix((d["data"], d["indices"], d["indptr"]), shape=tuple(d["shape"]))
    return counts, d["hvg"], pd.read_parquet(entry["obs"])


# ---------------------------------------------------------------------------------------------- one grid cell
def _start_training(run_dir: Path, model_dir: Path, train_key: str) -> bool:
    """True (and ``run_dir`` emptied) unless ``model_dir`` holds a model trained for ``train_key``."""
    run = model_dir / "run.json"
    if run.is_file() and json.loads(run.read_text()).get("study_train_key") == train_key:
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    return True


def _finish(task: dict, rows: list[dict], per: list[pd.DataFrame], status: str, t0: float) -> dict:
    """Write a grid cell's scores and per-cell table, then ``done.json`` (last: it marks the cell finished)."""
    run_dir = Path(task["run_dir"])
    pd.DataFrame(rows).to_parquet(run_dir / "scores.parquet", index=False)
    pd.concat(per, ignore_index=True).to_parquet(run_dir / "per_cell.parquet", index=False)
    (run_dir / "done.json").write_text(json.dumps({"train_key": task["train_key"], "score_key": task["score_key"],
                                                   "labels": task["labels"]}))
    return {"run_key": task["train_key"], "status": status, "wall_s": round(time.perf_counter() - t0, 2)}


def _train_or_explain(fn, name: str, *args, **kwargs):
    """Call a trainer; a run whose loss diverged (NaN parameters, which torch reports as a ValueError of
    a distribution's arguments) becomes one AtlasmixError naming the run and the remedy."""
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        if "nan" in str(e).lower() or "invalid values" in str(e):
            raise AtlasmixError(f"grid cell {name}: training diverged (NaN): lower [ldvae] lr in the study spec, or leave out "
                                f"cells with no counts on the gene axis "
                                f"(finished grid cells are kept: run again to continue)") from None
        raise


#: One grid cell at a time per process: a dask worker with several threads would otherwise train
#: several cells at once, and they share torch's global RNG and thread pool (seeds would interleave).
_ONE_CELL_AT_A_TIME = threading.Lock()


def run_grid_cell(task: dict) -> dict:
    """Train one LDVAE and score it on every cached eval set (runs in a worker process or inline;
    one at a time per process, see :data:`_ONE_CELL_AT_A_TIME`).

    Parameters
    ----------
    task : dict
        ``store`` (URI), ``manifest``, ``run_dir``, ``genes``, ``ldvae`` (options), ``budget``,
        ``seed``, ``eval`` (cache entries), ``eval_opts``, ``threads``, ``train_key``, ``score_key``,
        ``labels`` (mixture, fraction, strategy).

    Returns
    -------
    dict
        ``run_key``, ``status`` (``trained`` / ``scored`` / ``cached``), ``wall_s``.
    """
    with _ONE_CELL_AT_A_TIME:
        return _run_grid_cell(task)


def _run_grid_cell(task: dict) -> dict:
    import torch

    from atlasmix.evaluation import metrics as M
    from atlasmix.evaluation.models import LDVAEAdapter
    from atlasmix.store import Store
    from atlasmix.training.ldvae import train_ldvae

    import logging
    import warnings

    t0 = time.perf_counter()
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "scvi"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(int(task["threads"]))
    run_dir = Path(task["run_dir"])
    done = run_dir / "done.json"
    if done.is_file():
        d = json.loads(done.read_text())
        if d.get("train_key") == task["train_key"] and d.get("score_key") == task["score_key"]:
            return {"run_key": task["train_key"], "status": "cached", "wall_s": 0.0}
    if task.get("kind") in PRETRAINED_KINDS:
        return _pretrained_cell(task, t0)
    model_dir = run_dir / "ldvae"
    status = "scored"
    if _start_training(run_dir, model_dir, task["train_key"]):
        o = task["ldvae"]
        store = Store(task["store"])
        try:
            run = _train_or_explain(
                train_ldvae, run_dir.name, store, task["manifest"], model_dir,
                accelerator=task.get("accelerator", "cpu"), batch_size=o["batch_size"], seed=task["seed"],
                n_latent=o["n_latent"], n_layers=o["n_layers"], n_hidden=o["n_hidden"],
                dropout_rate=o["dropout_rate"], gene_likelihood=o["gene_likelihood"], dispersion=o["dispersion"],
                lr=o["lr"], budget=task["budget"], batch_key=o["batch_key"], genes=task["genes"], io_batch_size=8192,
                io_threads=1, checkpoint_every=0, validation=True, progress=False, prior_cells=5000,
                x_cache=run_dir / "xcache", x_cache_format="h5")
        finally:
            shutil.rmtree(run_dir / "xcache", ignore_errors=True)
        shutil.rmtree(run_dir / "xcache", ignore_errors=True)
        run["study_train_key"] = task["train_key"]
        (model_dir / "run.json").write_text(json.dumps(run, indent=1) + "\n")
        status = "trained"
    ad = LDVAEAdapter(model_dir, task.get("device", "cpu"))
    perm = pd.Index(task["genes"]).get_indexer(ad.feature_ids)
    if (perm < 0).any():
        raise AtlasmixError(f"{model_dir}: the model's genes are not the study's gene axis")
    rows, per = [], []
    for entry in task["eval"]:
        counts, hv, obs = _load_eval(entry)
        counts = counts[:, perm]
        hv_model = np.sort(np.flatnonzero(np.isin(perm, hv)))  # the set's HVGs, in the model's gene order
        codes, seen = ad.batch_codes(obs)
        n = counts.shape[0]
        r = np.full(n, np.nan)
        lat = np.zeros((n, ad.n_latent), dtype=np.float32)
        for s in range(0, n, 2048):
            sl = slice(s, min(n, s + 2048))
            z, expr = ad.encode(counts[sl].toarray(), codes[sl])
            r[sl] = M.reconstruction_accuracy(counts[sl], expr, hv_model)[0]
            lat[sl] = z
        summ = M.summarize(r)
        met = {"recon_pearson_median": summ["median"], "recon_pearson_mean": summ["mean"],
               "recon_pearson_iqr": summ["iqr"], "recon_n_cells_scored": summ["n"], "recon_n_hvg": len(hv_model),
               "batch_unseen_fraction": float(1 - seen.mean()) if n else np.nan}
        if task["eval_opts"]["knn"]:
            labels = obs["cell_type"].to_numpy()
            ok = M.usable_labels(labels, min_cells=10)
            if len(np.unique(labels[ok])) >= 2:
                kn = M.knn_classification(lat[ok], labels[ok].astype(str), k=5, seed=task["eval_opts"]["seed"])
                met["knn_macro_f1"] = kn["macro_f1"]
                met["knn_chance_macro_f1"] = 1.0 / len(np.unique(labels[ok]))
        for k, v in met.items():
            rows.append({"eval_set": entry["name"], "metric": k, "value": float(v)})
        pc = pd.DataFrame({"eval_set": entry["name"], "cell_index": np.arange(n, dtype=np.int64),
                           "soma_joinid": obs["soma_joinid"].to_numpy(dtype=np.int64),
                           "cell_type": obs["cell_type"].astype(str).to_numpy(), "value": r, "baseline_value": np.nan})
        per.append(pc)
    return _finish(task, rows, per, status, t0)


def _record_pretraining(run: dict, model_dir: Path, budget, steps: int, n_train: int, train_key: str) -> None:
    """Add the study's budget and training summary (cells seen, epochs, convergence of the training
    loss: a pretrained model has no validation split) to a pretraining ``run.json``."""
    from atlasmix.training.budget import convergence

    curve = pd.read_csv(model_dir / "training_curve.csv")
    conv = convergence(pd.DataFrame({"train_loss": curve["loss"], "validation_loss": np.nan}),
                       rel_tol=budget.plateau_tol)
    run["budget"] = {**budget.model_dump(mode="json"), "label": budget.label, "max_steps": steps}
    run["training"] = {"steps": run["steps"], "cells_seen": run["cells_this_call"],
                       "epochs": round(run["cells_this_call"] / max(n_train, 1), 4),
                       "final_train_loss": run["final_loss"], "final_validation_loss": None,
                       "stopped_early": False, "convergence": conv}
    run["study_train_key"] = train_key
    (model_dir / "run.json").write_text(json.dumps(run, indent=1, default=str) + "\n")


def _pretrained_cell(task: dict, t0: float) -> dict:
    """Train one pretrained foundation model with its budget and score its own pretraining task on every
    eval set against a baseline that knows no cell context: Geneformer's masked rank prediction vs the
    mean-rank baseline, scGPT's / scBERT's masked value / token prediction vs the per-gene mean."""
    from atlasmix.evaluation.evalsets import store_eval_sets
    from atlasmix.evaluation.models import GeneformerAdapter, ScBERTAdapter, ScGPTAdapter
    from atlasmix.evaluation.run import geneformer_outputs, masked_prediction_outputs
    from atlasmix.mixing import read_sidecar
    from atlasmix.store import Store
    from atlasmix.training.budget import Budget

    kind = task["kind"]
    run_dir = Path(task["run_dir"])
    model_dir = run_dir / kind
    o = task[kind]
    store = Store(task["store"])
    status = "scored"
    if _start_training(run_dir, model_dir, task["train_key"]):
        budget = Budget.parse(o["budget"])
        n_train = int(read_sidecar(task["manifest"])["counts"]["train"])
        steps = budget.max_steps(n_train, o["batch_size"])
        common = dict(preset=o["preset"], batch_size=o["batch_size"], lr=o["lr"], epochs=10**6, max_steps=steps,
                      seed=task["seed"], device=task.get("device", "cpu"), checkpoint_every=0, io_batch_size=4096,
                      log_every=max(1, steps // 20))
        if kind == "geneformer":
            from atlasmix.training.geneformer.pretrain import train_geneformer

            run = train_geneformer(store, task["manifest"], model_dir, dictionaries=task.get("dictionaries"),
                                   max_len=o["max_len"], **common)
        elif kind == "scgpt":
            from atlasmix.training.scgpt.pretrain import train_scgpt

            run = train_scgpt(store, task["manifest"], model_dir, vocab=task.get("vocab"), max_len=o["max_len"],
                              **common)
        else:
            from atlasmix.training.scbert.pretrain import train_scbert

            run = train_scbert(store, task["manifest"], model_dir, genes=task["genes"], gene2vec=task.get("gene2vec"),
                               **common)
        _record_pretraining(run, model_dir, budget, steps, n_train, task["train_key"])
        status = "trained"
    seed = task["eval_opts"]["seed"]
    if kind == "geneformer":
        model = GeneformerAdapter(model_dir, task.get("device", "cpu"))
        prefix = "rank_pred"

        def score(e):
            g = geneformer_outputs(model, e, max_rank_cells=o["max_rank_cells"], seed=seed)
            return g["rank_pred"], g["rank_baseline"]
    else:
        model = (ScGPTAdapter if kind == "scgpt" else ScBERTAdapter)(model_dir, task.get("device", "cpu"))
        prefix = "masked_pred"

        def score(e):
            g = masked_prediction_outputs(model, e, max_cells=o["max_scored_cells"], seed=seed)
            return g["pred"], g["baseline"]
    rows, per = [], []
    for e in store_eval_sets(task["eval_spec"], store):
        pred, base = score(e)
        idx = np.flatnonzero(np.isfinite(base) | np.isfinite(pred))
        obs = e.obs.iloc[idx]
        pred, base = pred[idx], base[idx]
        for k, v in ((f"{prefix}_pearson_median", np.nanmedian(pred) if np.isfinite(pred).any() else np.nan),
                     (f"{prefix}_baseline_pearson_median", np.nanmedian(base) if np.isfinite(base).any() else np.nan),
                     (f"{prefix}_n_cells_scored", int(np.isfinite(pred).sum()))):
            rows.append({"eval_set": e.name, "metric": k, "value": float(v)})
        per.append(pd.DataFrame({"eval_set": e.name, "cell_index": idx.astype(np.int64),
                                 "soma_joinid": obs["soma_joinid"].to_numpy(dtype=np.int64),
                                 "cell_type": obs["cell_type"].astype(str).to_numpy(), "value": pred,
                                 "baseline_value": base}))
    return _finish(task, rows, per, status, t0)


# ---------------------------------------------------------------------------------------------- the study
def _grid(spec: StudySpec, manifests: dict, genes: list[str], eval_entries: list[dict], out: Path, store,
          threads: int, accelerator: str, eval_spec: Path | None = None, root: Path | None = None) -> list[dict]:
    from atlasmix.mixing import read_sidecar

    gsha = _sha(genes)
    score_key = _sha({"eval": [e["key"] for e in eval_entries], "opts": spec.evaluation.model_dump(mode="json")})
    tasks = []
    for (mixture, seed, fraction, strategy), mpath in manifests.items():
        msha = read_sidecar(mpath)["manifest"]["sha256"]
        for b in spec.budget_objects():
            cfg = {"manifest": msha, "genes": gsha, "ldvae": spec.ldvae.model_dump(mode="json"), "budget": b.label,
                   "budget_options": b.model_dump(mode="json"), "seed": seed, "model": "ldvae"}
            key = _sha(cfg)
            name = f"{_safe(mixture)}__{_safe(b.label)}__s{seed}__{key[:10]}"
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
            from atlasmix.ingest.readers import sha256_of

            digests = {f"{f}_sha256": sha256_of(v) for f, v in files.items() if v and Path(v).is_file()}
        score = _sha({"eval_spec": str(eval_spec), "eval": [e["key"] for e in eval_entries],
                      ("max_rank_cells" if kind == "geneformer" else "max_scored_cells"): n_scored,
                      "seed": spec.evaluation.seed})
        for (mixture, seed, fraction, strategy), mpath in manifests.items():
            if fraction is not None or mixture not in names:
                continue
            msha = read_sidecar(mpath)["manifest"]["sha256"]
            key = _sha({"manifest": msha, kind: train_opts, **files, **digests, "seed": seed, "model": kind})
            name = f"{kind}__{_safe(mixture)}__{_safe(opts.budget)}__s{seed}__{key[:10]}"
            tasks.append({"kind": kind, "store": store.uri, "manifest": str(mpath),
                          "run_dir": str(out / "runs" / name), kind: opts.model_dump(mode="json"), **files,
                          "seed": seed, "eval_spec": str(eval_spec),
                          "eval_opts": spec.evaluation.model_dump(mode="json"), "threads": threads,
                          "device": "cuda" if accelerator == "gpu" else "cpu", "train_key": key, "score_key": score,
                          "labels": {"mixture": mixture, "seed": seed, "budget": opts.budget, "fraction": None,
                                     "strategy": None}})
    return tasks


def _execute(tasks: list[dict], jobs: int, log: Callable[[str], None], progress: bool, client=None) -> list[dict]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    results = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=False, disable=not progress) as prog:
        bar = prog.add_task("grid cells", total=len(tasks))
        if client is not None:  # dask.distributed workers: one grid cell per task, written to the shared out/
            from distributed import as_completed as dask_completed

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
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as ex:
                futs = {ex.submit(run_grid_cell, t): t for t in tasks}
                for f in as_completed(futs):
                    r = f.result()
                    results.append(r)
                    prog.advance(bar)
                    log(f"   {Path(futs[f]['run_dir']).name}: {r['status']} ({r['wall_s']:.1f} s)")
    return results


def _collect(tasks: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
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


class _Cells:
    """Per-cell score matrices (n_seeds, n_cells) of one model kind by (mixture, budget, eval set), seeds
    sorted; ``column`` ``value`` (the score) or ``baseline_value``."""

    def __init__(self, per_cell: pd.DataFrame, model_kind: str = "ldvae", column: str = "value"):
        self.groups = {}
        pc = per_cell[per_cell["model_kind"] == model_kind]
        for key, g in pc.groupby(["mixture", "budget", "eval_set"], sort=False):
            piv = g.pivot_table(index="seed", columns="cell_index", values=column, dropna=False)
            self.groups[key] = piv.sort_index()

    def get(self, mixture: str, budget: str, eval_set: str, seeds: list[int] | None = None) -> np.ndarray | None:
        p = self.groups.get((mixture, budget, eval_set))
        if p is None:
            return None
        if seeds is not None:
            if not set(seeds) <= set(p.index):
                return None
            p = p.loc[seeds]
        return p.to_numpy(dtype=float)


#: headline metric of each model kind and the per-cell column its baseline lives in (None: no baseline)
KIND_METRIC = {"ldvae": (HEADLINE, None), "geneformer": ("rank_pred_pearson_median", "baseline_value"),
               "scgpt": ("masked_pred_pearson_median", "baseline_value"),
               "scbert": ("masked_pred_pearson_median", "baseline_value")}


def summarise(results: pd.DataFrame, per_cell: pd.DataFrame, reference: str | None, n_bootstrap: int,
              seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """summary and deltas tables (:mod:`atlasmix.study.tables`) of the full-size mixtures.

    Per model kind: its headline metric (:data:`KIND_METRIC`) with a two-level bootstrap interval;
    where the kind has a per-cell baseline (Geneformer's mean-rank baseline), the baseline's mean and
    ``beats_baseline`` = the paired interval of score - baseline lies above 0. LDVAE's kNN macro F1
    is summarised over seeds beside its chance level. Paired deltas against ``reference``.
    """
    full = results[results["strategy"].isna() | (results["strategy"] == "")]
    pc = per_cell[per_cell["strategy"].isna() | (per_cell["strategy"] == "")]
    conv = full[full["metric"] == "converged"].groupby(["model_kind", "mixture", "budget"])["value"].min()

    def under(kind, mix, budget):
        c = conv.get((kind, mix, budget), np.nan)
        return bool(c == 0) if np.isfinite(c) else None

    summ, deltas = [], []
    for kind, (metric, base_col) in KIND_METRIC.items():
        cells = _Cells(pc, kind)
        bcells = _Cells(pc, kind, base_col) if base_col else None
        for (mix, budget, ev), _ in cells.groups.items():
            v = cells.get(mix, budget, ev)
            row = {"model_kind": kind, "mixture": mix, "budget": budget, "eval_set": ev, "metric": metric,
                   "n_seeds": v.shape[0], "mean": np.nan, "lo": np.nan, "hi": np.nan, "baseline": np.nan,
                   "beats_baseline": None, "undertrained": under(kind, mix, budget)}
            if np.isfinite(v).any():
                row.update({k: x for k, x in stats.mean_of_medians(v, n_bootstrap=n_bootstrap, seed=seed).items()
                            if k in ("mean", "lo", "hi", "n_seeds")})
                if bcells is not None:
                    b = bcells.get(mix, budget, ev)
                    if b is not None and np.isfinite(b).any():
                        row["baseline"] = float(np.mean(np.nanmedian(b, axis=1)))
                        row["beats_baseline"] = stats.paired_delta(v, b, n_bootstrap=n_bootstrap, seed=seed)["lo"] > 0
            summ.append(row)
        if reference is None:
            continue
        for (mix, budget, ev), _ in cells.groups.items():
            ref = cells.groups.get((reference, budget, ev))
            if mix == reference or ref is None:
                continue
            seeds = sorted(set(cells.groups[(mix, budget, ev)].index) & set(ref.index))
            a, b = cells.get(mix, budget, ev, seeds), cells.get(reference, budget, ev, seeds)
            if not seeds or a is None or b is None or not (np.isfinite(a).any() and np.isfinite(b).any()):
                continue
            if a.shape != b.shape:  # e.g. Geneformer cells without a vocabulary gene differ by model
                continue
            d = stats.paired_delta(a, b, n_bootstrap=n_bootstrap, seed=seed)
            deltas.append({"model_kind": kind, "mixture": mix, "reference": reference, "budget": budget,
                           "eval_set": ev, "metric": metric, "n_seeds": d["n_seeds"], "delta": d["delta"],
                           "lo": d["lo"], "hi": d["hi"], "excludes_zero": d["excludes_zero"]})
    # LDVAE kNN macro F1: mean over seeds, percentile interval of a seed bootstrap, chance level as baseline
    other = full[(full["eval_set"] != "-") & (full["model_kind"] == "ldvae") & (full["metric"] == "knn_macro_f1")]
    for (mix, budget, ev, met), g in other.groupby(["mixture", "budget", "eval_set", "metric"]):
        v = g.sort_values("seed")["value"].to_numpy(dtype=float)[:, None]
        r = stats.mean_of_medians(v, n_bootstrap=n_bootstrap, seed=seed)
        ch = full[(full["mixture"] == mix) & (full["eval_set"] == ev) & (full["metric"] == "knn_chance_macro_f1")]["value"]
        base = float(ch.mean()) if len(ch) else np.nan
        summ.append({"model_kind": "ldvae", "mixture": mix, "budget": budget, "eval_set": ev, "metric": met,
                     "n_seeds": r["n_seeds"], "mean": r["mean"], "lo": r["lo"], "hi": r["hi"], "baseline": base,
                     "beats_baseline": (bool(r["lo"] > base) if np.isfinite(base) else None),
                     "undertrained": under("ldvae", mix, budget)})
    return pd.DataFrame(summ, columns=SUMMARY), pd.DataFrame(deltas, columns=DELTAS)


def scaling_tables(per_cell: pd.DataFrame, base: str, n_bootstrap: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """scaling and scaling_smallest tables (:mod:`atlasmix.study.tables`) of the scaling runs."""
    sc = per_cell[per_cell["strategy"].notna() & (per_cell["strategy"] != "") & (per_cell["model_kind"] == "ldvae")]
    rows = []
    for (strategy, fraction, budget, ev), g in sc.groupby(["strategy", "fraction", "budget", "eval_set"]):
        v = g.pivot_table(index="seed", columns="cell_index", values="value", dropna=False).sort_index().to_numpy(float)
        r = stats.mean_of_medians(v, n_bootstrap=n_bootstrap, seed=seed) if np.isfinite(v).any() else \
            {"mean": np.nan, "lo": np.nan, "hi": np.nan, "n_seeds": v.shape[0]}
        rows.append({"model_kind": "ldvae", "base": base, "strategy": strategy, "fraction": float(fraction),
                     "budget": budget, "eval_set": ev, "metric": HEADLINE, "n_seeds": r["n_seeds"], "mean": r["mean"],
                     "lo": r["lo"], "hi": r["hi"]})
    scaling = pd.DataFrame(rows, columns=SCALING)
    small = []
    for (strategy, budget, ev), g in scaling.groupby(["strategy", "budget", "eval_set"]):
        g = g.dropna(subset=["mean"]).sort_values("fraction")
        if g.empty:
            continue
        best = float(g["mean"].max())
        thr = SCALING_THRESHOLD * best if best >= 0 else best / SCALING_THRESHOLD
        ok = g[g["mean"] >= thr]
        small.append({"model_kind": "ldvae", "base": base, "strategy": strategy, "budget": budget, "eval_set": ev,
                      "metric": HEADLINE, "best_mean": best, "threshold": thr,
                      "smallest_fraction": float(ok["fraction"].iloc[0]) if len(ok) else np.nan})
    return scaling, pd.DataFrame(small, columns=SCALING_SMALLEST)


def _check_disjoint(store, eval_sets, manifests: dict) -> None:
    """Refuse a study whose eval cells (or copies of them) are training or validation cells of a manifest."""
    from atlasmix.evaluation.models import _training_cells_from_manifest
    from atlasmix.evaluation.run import check_overlap

    class _M:  # what check_overlap needs of a model: its name and training cells
        def __init__(self, name, path):
            self.name, self.path = name, path

        def training_cells(self):
            ids, side = _training_cells_from_manifest(str(self.path), None)
            return ids, {"store": side.get("store", {}), "manifest": str(self.path)}

    for (mix, seed, _, _), path in manifests.items():
        for e in eval_sets:
            check_overlap(_M(f"{mix} (seed {seed})", path), e, store)


def run_study(spec_path: str | Path | StudySpec, store, out: str | Path, *, root: str | Path | None = None,
              jobs: int = 1, accelerator: str = "cpu", log: Callable[[str], None] = print, progress: bool = False,
              report: bool = True, client=None) -> dict[str, Any]:
    """Run a study (module doc) and return its ``study.json`` contents.

    Parameters
    ----------
    spec_path : path or StudySpec
        The study TOML (:mod:`atlasmix.study.spec`), or a validated spec.
    store : atlasmix.store.Store
    root : path, optional
        Folder the spec's relative paths are resolved against when ``spec_path`` is a StudySpec
        (default: the working directory).
    out : path
        Output folder; an existing study there is continued (finished grid cells are kept).
    jobs : int
        Grid cells run at once (spawned processes; torch threads split between them).
    accelerator : {"cpu", "gpu"}
        Where the models train.
    log : callable
        Receives one line per step.
    progress : bool
        Show a progress bar over the grid.
    report : bool
        Render ``report.html``.
    client : distributed.Client, optional
        Send the grid cells (train + evaluate) to the workers of a dask.distributed cluster
        instead of ``jobs`` local processes; each task uses its worker's thread count for torch.
        ``out`` and the store must be reachable from the workers at the same paths; the tables are
        built here from the run folders, as in a serial run.

    Returns
    -------
    dict
        ``stages_s``, ``grid`` (run ids, status, wall time), ``checks`` (list), ``all_checks_passed``
        (True / False / None when no check applied), ``headline`` (mixture x eval set means).

    Raises
    ------
    AtlasmixError
        Bad study or mixture spec, an eval set overlapping training cells, a failed run.
    """
    from atlasmix.evaluation.evalsets import store_eval_sets
    from atlasmix.mixing import load_spec

    t_all = time.perf_counter()
    if isinstance(spec_path, StudySpec):
        spec, root = spec_path, Path(root or Path.cwd()).resolve()
    else:
        spec, root = load_study(spec_path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    mix_dir = (root / spec.mixtures_dir).resolve()
    eval_spec = (root / spec.eval_sets).resolve()
    if not eval_spec.is_file():
        raise AtlasmixError(f"eval-set spec not found: {eval_spec}")
    names = spec.mixtures or sorted(p.stem for p in mix_dir.glob("*.toml") if p.resolve() != eval_spec)
    if spec.reference is not None and spec.reference not in names:
        raise AtlasmixError(f"reference mixture {spec.reference!r} is not among the study's mixtures")
    specs = {}
    for n in names:
        p = mix_dir / f"{n}.toml"
        if not p.is_file():
            have = sorted(q.stem for q in mix_dir.glob("*.toml") if q.resolve() != eval_spec)
            raise AtlasmixError(f"mixture {n!r} not found in {mix_dir} (there: {', '.join(have) or 'none'})")
        specs[n] = load_spec(p)
    if spec.scaling is not None and spec.scaling.base not in specs:
        raise AtlasmixError(f"scaling base {spec.scaling.base!r} is not among the study's mixtures")
    cores = os.cpu_count() or 1
    jobs = max(1, int(jobs))
    threads = max(1, cores // jobs)
    if client is not None:
        threads = max(1, min(client.nthreads().values(), default=1))

    t = time.perf_counter()
    manifests: dict[tuple, Path] = {}
    for n, ms in specs.items():
        for s in spec.seeds:
            manifests[(ms.name, s, None, None)] = _resolve_cached(
                ms.model_copy(update={"seed": s}), mix_dir, store, out / "manifests" / f"{_safe(n)}__s{s}.parquet")
    if spec.scaling is not None:
        sc = spec.scaling
        base = specs[sc.base]
        for st in sc.strategies:
            for f in sc.fractions:
                for s in sc.seeds or spec.seeds:
                    sp_ = scaled_spec(base, f, st, sc.balance_by).model_copy(update={"seed": s})
                    manifests[(sp_.name, s, f, st)] = _resolve_cached(
                        sp_, mix_dir, store, out / "manifests" / f"{_safe(sp_.name)}__s{s}.parquet")
    times["manifests"] = round(time.perf_counter() - t, 1)
    log(f"   {len(manifests)} manifests ({len(specs)} mixtures x {len(spec.seeds)} seeds"
        + (", + scaling" if spec.scaling else "") + f") in {times['manifests']} s")

    t = time.perf_counter()
    eval_sets = store_eval_sets(eval_spec, store)
    _check_disjoint(store, eval_sets, manifests)
    gfile = out / "genes.txt"
    if spec.genes.file:
        genes = [g.strip() for g in (root / spec.genes.file).read_text().splitlines() if g.strip()]
        var = store.var()
        by_name = dict(zip(var["feature_name"].astype(str), var["feature_id"].astype(str)))
        genes = [g if g.startswith("ENS") else by_name.get(g, g) for g in genes]
    else:
        from atlasmix.mixing.genes import choose_genes
        from atlasmix.mixing import read_sidecar

        gkey = _sha({"m": sorted(read_sidecar(p)["manifest"]["sha256"] for k, p in manifests.items() if k[2] is None),
                     "o": spec.genes.model_dump(mode="json")})
        gmeta = out / "genes.key"
        if gfile.is_file() and gmeta.is_file() and gmeta.read_text() == gkey:
            genes = gfile.read_text().split()
        else:
            genes = choose_genes(store, [p for k, p in manifests.items() if k[2] is None], n_genes=spec.genes.n_hvg,
                                 max_cells=spec.genes.max_cells, min_dataset_fraction=spec.genes.min_dataset_fraction)
            gmeta.write_text(gkey)
    gfile.write_text("\n".join(genes) + "\n")
    entries = _build_eval_cache(eval_sets, genes, spec.evaluation, out / "eval_cache")
    times["genes_and_eval_cache"] = round(time.perf_counter() - t, 1)
    log(f"   gene axis {len(genes):,} genes; eval sets read once: "
        + ", ".join(f"{e.name} ({json.loads(Path(x['npz']).with_suffix('.json').read_text())['n_cells']:,})"
                    for e, x in zip(eval_sets, entries)) + f" in {times['genes_and_eval_cache']} s")

    t = time.perf_counter()
    tasks = _grid(spec, manifests, genes, entries, out, store, threads, accelerator, eval_spec, root)
    results = _execute(tasks, jobs, log, progress, client)
    times["train_and_score"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    res, per_cell, curves = _collect(tasks)
    res.to_parquet(out / "results.parquet", index=False)
    res.to_csv(out / "results.csv", index=False)
    per_cell.to_parquet(out / "per_cell.parquet", index=False)
    curves.to_parquet(out / "curves.parquet", index=False)
    ev = spec.evaluation
    summary, deltas = summarise(res, per_cell, spec.reference, ev.n_bootstrap, ev.seed)
    summary.to_parquet(out / "summary.parquet", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    deltas.to_parquet(out / "deltas.parquet", index=False)
    deltas.to_csv(out / "deltas.csv", index=False)
    if spec.scaling is not None:
        scaling, smallest = scaling_tables(per_cell, spec.scaling.base, ev.n_bootstrap, ev.seed)
        scaling.to_parquet(out / "scaling.parquet", index=False)
        smallest.to_parquet(out / "scaling_smallest.parquet", index=False)
    headline_budget = spec.budget_objects()[0].label
    cells = _Cells(per_cell[per_cell["strategy"].isna() | (per_cell["strategy"] == "")])
    from atlasmix.study.checks import run_checks

    checks = run_checks(spec.checks.sources, [s.name for s in specs.values()], spec.reference,
                        lambda m, e: cells.get(m, headline_budget, e), margin=spec.checks.margin,
                        n_bootstrap=ev.n_bootstrap, seed=ev.seed)
    (out / "checks.json").write_text(json.dumps(checks, indent=1) + "\n")
    times["summarise"] = round(time.perf_counter() - t, 1)
    applied = [c for c in checks if c["applicable"]]
    all_ok = None if not applied else all(c["passed"] for c in applied)
    for c in checks:
        mark = "n/a " if not c["applicable"] else ("pass" if c["passed"] else "FAIL")
        log(f"   check {mark} {c['name']:<28} {c['detail']}")

    head = summary[(summary["metric"] == HEADLINE) & (summary["budget"] == headline_budget)
                   & (summary["model_kind"] == "ldvae")]
    doc = {"name": spec.name, "spec": spec.model_dump(mode="json"),
           "spec_path": None if isinstance(spec_path, StudySpec) else str(Path(spec_path).resolve()),
           "store": store.identity(), "jobs": jobs,
           "dask_workers": len(client.nthreads()) if client is not None else 0, "n_runs": len(tasks),
           "grid": [{"run_dir": Path(t["run_dir"]).name, **t["labels"], "train_key": t["train_key"], **r}
                    for t, r in zip(tasks, sorted(results, key=lambda r: [x["train_key"] for x in tasks].index(r["run_key"])))],
           "stages_s": times, "checks": checks, "all_checks_passed": all_ok,
           "headline": {"metric": HEADLINE, "budget": headline_budget,
                        "mean": json.loads(head.pivot_table(index="mixture", columns="eval_set", values="mean")
                                           .round(4).to_json(orient="index")) if len(head) else {}}}
    (out / "study.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")  # the report reads it
    if report:
        t = time.perf_counter()
        from atlasmix.study.report import render_study_report

        rep = render_study_report(out, out / "report.html", title=f"atlasmix study: {spec.name}")
        doc["report"] = str(rep["html"])
        times["report"] = round(time.perf_counter() - t, 1)
    times["total"] = round(time.perf_counter() - t_all, 1)
    (out / "study.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return doc
