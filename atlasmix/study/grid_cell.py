"""One grid cell of a study: train its model, score it on every cached eval set, mark it done.

:func:`run_grid_cell` runs in a worker process (``--jobs``), a dask worker or inline. An LDVAE cell
trains with the cell's budget and scores reconstruction accuracy and the kNN macro F1 of its latent
on the eval cache (:mod:`atlasmix.study.eval_cache`); a Geneformer, scGPT or scBERT cell pretrains and
scores its own pretraining task against its baseline. A cell writes ``scores.parquet``,
``per_cell.parquet`` and, last, ``done.json``.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from atlasmix.errors import AtlasmixError
from atlasmix.evaluation import metrics as M
from atlasmix.evaluation.evalsets import store_eval_sets
from atlasmix.evaluation.models import LDVAEAdapter
from atlasmix.evaluation.pretrained import GeneformerAdapter, ScBERTAdapter, ScGPTAdapter
from atlasmix.evaluation.pretrained_outputs import geneformer_outputs, masked_prediction_outputs
from atlasmix.mixing import read_sidecar
from atlasmix.store import Store
from atlasmix.study.eval_cache import load_eval
from atlasmix.study.spec import PRETRAINED_KINDS
from atlasmix.training.budget import Budget, convergence


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
    """Train one grid cell's model (an LDVAE, or with ``kind`` a Geneformer, scGPT or scBERT) and score it
    on every eval set (runs in a worker process or inline; one at a time per process, see
    :data:`_ONE_CELL_AT_A_TIME`).

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
    # torch, scvi-tools and the trainers import in seconds: only where a grid cell runs
    import torch

    from atlasmix.training.ldvae import train_ldvae

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
            from atlasmix.training.xcache import release_leases

            release_leases(run_dir / "xcache")  # this run's locks on its own cache, deleted next
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
        counts, hv, obs = load_eval(entry)
        counts = counts[:, perm]
        hv_model = np.sort(np.flatnonzero(np.isin(perm, hv)))  # the set's HVGs, in the model's gene order
        codes, seen = ad.batch_codes(obs)
        n = counts.shape[0]
        batches = ((slice(s, min(n, s + 2048)), counts[s:s + 2048]) for s in range(0, n, 2048))
        r, lat = ad.reconstruction(batches, n, codes, hv_model, seed=task["eval_opts"]["seed"])
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
