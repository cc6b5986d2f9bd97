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

The stages: :mod:`~atlasmix.study.manifests`, the gene axis (here), :mod:`~atlasmix.study.eval_cache`,
:mod:`~atlasmix.study.grid` (its cells: :mod:`~atlasmix.study.grid_cell`), :mod:`~atlasmix.study.summary`
and :mod:`~atlasmix.study.checks`, then :mod:`~atlasmix.study.report`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from atlasmix.errors import AtlasmixError
from atlasmix.evaluation.evalsets import store_eval_sets
from atlasmix.evaluation.overlap import check_overlap, training_cells_from_manifest
from atlasmix.mixing import load_spec, read_sidecar
from atlasmix.mixing.genes import choose_genes
from atlasmix.study.checks import run_checks
from atlasmix.study.eval_cache import build_eval_cache
from atlasmix.study.grid import collect, execute, grid_tasks
from atlasmix.study.keys import sha
from atlasmix.study.manifests import resolve_manifests
from atlasmix.study.report import render_study_report
from atlasmix.study.spec import StudySpec, load_study
from atlasmix.study.summary import ScoreCells, scaling_tables, summarise
from atlasmix.study.tables import HEADLINE_METRIC


class _ManifestModel:
    """What :func:`~atlasmix.evaluation.overlap.check_overlap` needs of a model: its name and training cells."""

    def __init__(self, name: str, path: Path):
        self.name, self.path = name, path

    def training_cells(self) -> tuple[np.ndarray | None, dict]:
        ids, side = training_cells_from_manifest(str(self.path), None)
        return ids, {"store": side.get("store", {}), "manifest": str(self.path)}


def _check_disjoint(store, eval_sets, manifests: dict) -> None:
    """Refuse a study whose eval cells (or copies of them) are training or validation cells of a manifest."""
    for (mix, seed, _, _), path in manifests.items():
        for e in eval_sets:
            check_overlap(_ManifestModel(f"{mix} (seed {seed})", path), e, store)


def _gene_axis(spec: StudySpec, root: Path, store, manifests: dict, out: Path) -> list[str]:
    """The models' shared gene axis (Ensembl ids), written to ``out/genes.txt``: the ``[genes] file`` of
    the spec (gene names mapped to ids through the store's var), else
    :func:`atlasmix.mixing.genes.choose_genes` over the full-size manifests, reused while they and the
    ``[genes]`` options are unchanged (key in ``out/genes.key``)."""
    gfile = out / "genes.txt"
    if spec.genes.file:
        genes = [g.strip() for g in (root / spec.genes.file).read_text().splitlines() if g.strip()]
        var = store.var()
        by_name = dict(zip(var["feature_name"].astype(str), var["feature_id"].astype(str)))
        genes = [g if g.startswith("ENS") else by_name.get(g, g) for g in genes]
    else:
        full = [p for k, p in manifests.items() if k[2] is None]
        gkey = sha({"m": sorted(read_sidecar(p)["manifest"]["sha256"] for p in full),
                    "o": spec.genes.model_dump(mode="json")})
        gmeta = out / "genes.key"
        if gfile.is_file() and gmeta.is_file() and gmeta.read_text() == gkey:
            genes = gfile.read_text().split()
        else:
            genes = choose_genes(store, full, n_genes=spec.genes.n_hvg, max_cells=spec.genes.max_cells,
                                 min_dataset_fraction=spec.genes.min_dataset_fraction)
            gmeta.write_text(gkey)
    gfile.write_text("\n".join(genes) + "\n")
    return genes


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
    manifests = resolve_manifests(spec, specs, mix_dir, store, out)
    times["manifests"] = round(time.perf_counter() - t, 1)
    log(f"   {len(manifests)} manifests ({len(specs)} mixtures x {len(spec.seeds)} seeds"
        + (", + scaling" if spec.scaling else "") + f") in {times['manifests']} s")

    t = time.perf_counter()
    eval_sets = store_eval_sets(eval_spec, store)
    _check_disjoint(store, eval_sets, manifests)
    genes = _gene_axis(spec, root, store, manifests, out)
    entries = build_eval_cache(eval_sets, genes, spec.evaluation, out / "eval_cache")
    times["genes_and_eval_cache"] = round(time.perf_counter() - t, 1)
    log(f"   gene axis {len(genes):,} genes; eval sets read once: "
        + ", ".join(f"{e.name} ({json.loads(Path(x['npz']).with_suffix('.json').read_text())['n_cells']:,})"
                    for e, x in zip(eval_sets, entries)) + f" in {times['genes_and_eval_cache']} s")

    t = time.perf_counter()
    tasks = grid_tasks(spec, manifests, genes, entries, out, store, threads, accelerator, eval_spec, root)
    results = execute(tasks, jobs, log, progress, client)
    times["train_and_score"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    res, per_cell, curves = collect(tasks)
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
    cells = ScoreCells(per_cell[per_cell["strategy"].isna() | (per_cell["strategy"] == "")])
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

    head = summary[(summary["metric"] == HEADLINE_METRIC) & (summary["budget"] == headline_budget)
                   & (summary["model_kind"] == "ldvae")]
    doc = {"name": spec.name, "spec": spec.model_dump(mode="json"),
           "spec_path": None if isinstance(spec_path, StudySpec) else str(Path(spec_path).resolve()),
           "store": store.identity(), "jobs": jobs,
           "dask_workers": len(client.nthreads()) if client is not None else 0, "n_runs": len(tasks),
           "grid": [{"run_dir": Path(t["run_dir"]).name, **t["labels"], "train_key": t["train_key"], **r}
                    for t, r in zip(tasks, sorted(results, key=lambda r: [x["train_key"] for x in tasks].index(r["run_key"])))],
           "stages_s": times, "checks": checks, "all_checks_passed": all_ok,
           "headline": {"metric": HEADLINE_METRIC, "budget": headline_budget,
                        "mean": json.loads(head.pivot_table(index="mixture", columns="eval_set", values="mean")
                                           .round(4).to_json(orient="index")) if len(head) else {}}}
    (out / "study.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")  # the report reads it
    if report:
        t = time.perf_counter()
        rep = render_study_report(out, out / "report.html", title=f"atlasmix study: {spec.name}")
        doc["report"] = str(rep["html"])
        times["report"] = round(time.perf_counter() - t, 1)
    times["total"] = round(time.perf_counter() - t_all, 1)
    (out / "study.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return doc
