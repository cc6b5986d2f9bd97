"""``atlasmix demo``: the demo study -- corpus -> store -> study grid -> evaluation -> report.

``atlasmix demo`` is a study spec shipped with the package (``atlasmix/study/demo/study.toml``) run
on the simulated corpus (:mod:`atlasmix.simulate`): scFM-datamix's design (Figure 2) -- a base model
trained on half of the healthy blood base, the base plus each added source, each added source
alone -- as 10 mixtures x 3 seeds of LDVAE, every model trained on the same number of cells
(compute-matched), evaluated on held-out sets that every mixture excludes, summarised with 95 %
intervals and paired deltas against ``base_model``, and checked for sanity (each ``X_only`` model
is best on X's held-out cells; adding X does not hurt on X). The demo fails (exit 2) when a check
fails on the simulated corpus. Outputs in ``workdir``::

    corpus/     the simulated multi-source atlas (default) or the plan of the user's files (--data-dir)
    store/      the TileDB-SOMA store, everything ingested through one plan
    study/      ``atlasmix study run`` output: manifests, genes.txt, runs/, tables, report.html
    demo.json   stage times, the headline table, the checks

With ``--data-dir`` the same study machinery runs on real files: the project's shared datasets get
``examples/studies/shared.toml``; any other folder a generated design (every dataset alone, all
together; eval set: 10 % of every dataset). Checks that cannot apply to real data say so.
"""

from __future__ import annotations

import json
import shutil
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from atlasmix.errors import AtlasmixError
from atlasmix.ingest import QCPolicy, ingest, read_plan
from atlasmix.simulate import simulate_atlas
from atlasmix.store import Store
from atlasmix.study.runner import run_study
from atlasmix.study.spec import StudySpec

#: The ten mixtures of scFM-datamix's design, as named in ``atlasmix/study/demo/mixtures``.
STUDY_MIXTURES = ("base_model", "base_full", "base_plus_malignant", "base_plus_perturbation",
                  "base_plus_bone_marrow", "base_plus_tf_atlas", "malignant_only", "perturbation_only",
                  "bone_marrow_only", "tf_atlas_only")
EVAL_SPEC = "eval_sets.toml"
FILE_SUFFIXES = (".h5ad", ".h5", ".zarr")


def examples_dir() -> Path | None:
    """The repository's ``examples/`` folder, or None when atlasmix runs from an installed wheel.

    Only ``--data-dir`` runs use it (to recognise the shared real datasets and their curated
    mixtures); the simulated demo reads the study spec shipped in the package.
    """
    d = Path(__file__).resolve().parents[1] / "examples"
    return d if (d / "mixtures").is_dir() and (d / "shared_data_plan.toml").is_file() else None


# ---------------------------------------------------------------------------------------------- plans
def _find_files(data_dir: Path) -> list[Path]:
    out = []
    for p in sorted(data_dir.iterdir()):
        if p.is_file() and p.suffix in FILE_SUFFIXES:
            out.append(p)
        elif p.is_dir() and (p.suffix == ".zarr" or any((p / f).exists() for f in ("matrix.mtx", "matrix.mtx.gz"))):
            out.append(p)
    return out


def plan_for(data_dir: Path, workdir: Path) -> tuple[Path, Path | None]:
    """The ingest plan (and mixture-spec folder) for a directory of real files.

    Order of choice: ``DATA_DIR/plan.toml`` (the user's own; mixtures from ``DATA_DIR/mixtures/`` if
    present); the project's plan for the shared real datasets (``examples/shared_data_plan.toml``,
    its sources re-rooted onto ``data_dir``) when every one of its files is in ``data_dir``, with
    ``examples/mixtures/shared``; else a generated plan with one dataset per file (``dataset_id`` =
    file stem) and generated mixtures (None here: see :func:`generated_specs`).

    Returns
    -------
    (plan path, mixture folder or None)

    Raises
    ------
    AtlasmixError
        ``data_dir`` is missing or holds no readable files.
    """
    if not data_dir.is_dir():
        raise AtlasmixError(f"--data-dir {data_dir} is not a directory")
    own = data_dir / "plan.toml"
    if own.is_file():
        mix = data_dir / "mixtures"
        return own, (mix if mix.is_dir() else None)
    workdir.mkdir(parents=True, exist_ok=True)
    ex = examples_dir()
    shared_plan = ex / "shared_data_plan.toml" if ex is not None else None
    doc = tomllib.loads(shared_plan.read_text()) if shared_plan is not None else {"dataset": []}
    names = [Path(d["source"]).name for d in doc["dataset"]]
    if names and all((data_dir / n).exists() for n in names):
        text = shared_plan.read_text()
        for d in doc["dataset"]:
            text = text.replace(f'"{d["source"]}"', json.dumps(str((data_dir / Path(d["source"]).name).resolve())))
        for key in ("obs_table", "gene_table"):
            for d in doc["dataset"]:
                if d.get(key):
                    text = text.replace(f'"{d[key]}"', json.dumps(str((shared_plan.parent / d[key]).resolve())))
        plan = workdir / "plan.toml"
        plan.write_text(text)
        return plan, ex / "mixtures" / "shared"
    files = _find_files(data_dir)
    if not files:
        raise AtlasmixError(f"no .h5ad / .h5 / .zarr / 10x MEX files in {data_dir}")
    lines = [f"# generated by atlasmix demo from {data_dir}"]
    seen: set[str] = set()
    for f in files:
        did = "".join(c if c.isalnum() or c == "_" else "_" for c in f.stem.split(".")[0]).lower()
        while did in seen:
            did += "_b"
        seen.add(did)
        lines += ["", "[[dataset]]", f'dataset_id = "{did}"', f"source = {json.dumps(str(f.resolve()))}"]
    plan = workdir / "plan.toml"
    plan.write_text("\n".join(lines) + "\n")
    return plan, None


def datasets_without_copies(reports: list[dict]) -> tuple[list[str], dict[str, dict[str, int]]]:
    """Split ingested datasets into those to use and those holding copies of earlier ones' cells.

    A dataset whose cells repeat another's (same counts on every gene, found by ingest's cell
    fingerprints, e.g. one 10x run as h5ad and as MEX) would put the same cells in training and in a
    held-out set, which the evaluation refuses; the one ingested first is kept.

    Parameters
    ----------
    reports : list of dict
        :func:`atlasmix.ingest.ingest` reports, in ingest order.

    Returns
    -------
    (list of str, dict)
        Dataset ids to use (sorted); {left-out dataset id: {dataset id: cells it copies}}.
    """
    copies = {r["dataset_id"]: r["duplicate_cells"]["by_dataset"] for r in reports
              if r.get("duplicate_cells", {}).get("by_dataset")}
    return sorted(r["dataset_id"] for r in reports if r["dataset_id"] not in copies), copies


def generated_specs(dataset_ids: list[str], out_dir: Path) -> Path:
    """Mixture specs for an arbitrary set of datasets: ``all``, ``<id>_only``; eval: 10 % of each.

    Returns
    -------
    Path
        The folder holding ``eval_sets.toml`` and the mixture specs.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    ev = ['name = "heldout_suite"', "seed = 0"]
    for d in dataset_ids:
        ev += ["", f"[eval_sets.{d}_heldout]", f"where = \"dataset_id = '{d}'\"", "fraction = 0.1"]
    (out_dir / EVAL_SPEC).write_text("\n".join(ev) + "\n")
    specs = {"all": [(d, f"dataset_id = '{d}'") for d in dataset_ids]}
    if len(dataset_ids) > 1:
        specs.update({f"{d}_only": [(d, f"dataset_id = '{d}'")] for d in dataset_ids})
    for name, comps in specs.items():
        t = [f'name = "{name}"', "seed = 0", "validation_fraction = 0.05", f'exclude = ["{EVAL_SPEC}"]']
        for cname, where in comps:
            t += ["", "[[components]]", f'name = "{cname}"', f'where = "{where} AND qc_pass"']
        (out_dir / f"{name}.toml").write_text("\n".join(t) + "\n")
    return out_dir


# ---------------------------------------------------------------------------------------------- the job
class _Log:
    def __init__(self, log: Callable[[str], None]):
        self.log, self.t0, self.times = log, time.perf_counter(), {}

    def stage(self, name: str):
        log, times = self.log, self.times

        class _S:
            def __enter__(s):
                s.t = time.perf_counter()
                log(f"[bold cyan]== {name}[/]")
                return s

            def __exit__(s, *exc):
                times[name] = round(time.perf_counter() - s.t, 1)
                if exc[0] is None:
                    log(f"   done in {times[name]:.1f} s (total {time.perf_counter() - self.t0:.0f} s)")
                return False
        return _S()


def demo_study_path() -> Path:
    """The demo study spec shipped with the package (``atlasmix/study/demo/study.toml``)."""
    return Path(__file__).resolve().parent / "study" / "demo" / "study.toml"


def run_demo(workdir: str | Path = "demo", data_dir: str | Path | None = None, *, n_cells: int = 30_000,
             seeds: list[int] | None = None, budget: str | None = None, n_genes: int | None = None, jobs: int = 2,
             accelerator: str = "auto", mixtures: list[str] | None = None, seed: int = 0, check: bool = True,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo study (module doc) and return its summary (also ``workdir/demo.json``).

    Parameters
    ----------
    workdir : path
        Output folder; a previous demo there is replaced.
    data_dir : path, optional
        A folder of real files (h5ad / 10x h5 / AnnData zarr / 10x MEX) instead of the simulated corpus.
    n_cells : int
        Cells of the simulated corpus.
    seeds : list of int, optional
        Replicates (default: the study's, 0, 1, 2).
    budget : str, optional
        Training budget of every model (e.g. ``cells=150000``, ``converged:epochs=200``; default: the
        study's).
    n_genes : int, optional
        HVGs on the models' gene axis (default: the study's, 500).
    jobs : int
        Grid cells trained at once.
    accelerator : str
        ``auto`` (CUDA when present), ``cpu``, ``gpu``.
    mixtures : list of str, optional
        Run only these mixtures of the study.
    seed : int
        Seed of the simulated corpus.
    check : bool
        Raise when a sanity check fails on the simulated corpus.

    Returns
    -------
    dict
        Stage times (s), the headline table (mean over seeds), the checks, the report path.

    Raises
    ------
    AtlasmixError
        Bad data directory, a mixture that cannot be resolved, a failed stage, or (``check``) a
        failed sanity check of the simulated study.
    """
    import torch  # heavy: imported only when the demo runs

    workdir = Path(workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    L = _Log(log)
    gpu = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    log(f"atlasmix demo -> {workdir.resolve()}  (device: {'cuda' if gpu else 'cpu'}, jobs: {jobs})")

    with L.stage("corpus"):
        if data_dir is None:
            info = simulate_atlas(workdir / "corpus", n_cells=n_cells, seed=seed)
            plan, spec_dir = Path(info["plan"]), None
            log(f"   simulated {n_cells:,} cells: " + ", ".join(f"{s['dataset_id']} ({s['n_cells']:,})" for s in info["sources"]))
        else:
            plan, spec_dir = plan_for(Path(data_dir), workdir / "corpus")
            log(f"   real data from {data_dir}; plan {plan}")

    with L.stage("store + ingest"):
        store = Store.create(str(workdir / "store"))
        reports = ingest(store, read_plan(plan, {"qc": QCPolicy()}))
        for r in reports:
            log(f"   {r['dataset_id']:<24} {r['n_cells']:>8,} cells")

    if data_dir is None:
        base = tomllib.loads(demo_study_path().read_text())
        base["mixtures_dir"] = str(demo_study_path().parent / base["mixtures_dir"])
        base["eval_sets"] = str(demo_study_path().parent / base["eval_sets"])
    elif (spec_dir is not None and examples_dir() is not None
          and spec_dir.resolve() == (examples_dir() / "mixtures" / "shared").resolve()):
        sp = examples_dir() / "studies" / "shared.toml"
        base = tomllib.loads(sp.read_text())
        base["mixtures_dir"] = str((sp.parent / base["mixtures_dir"]).resolve())
        base["eval_sets"] = str((sp.parent / base["eval_sets"]).resolve())
    else:
        if spec_dir is None:
            ids, copies = datasets_without_copies(reports)
            for d, by in copies.items():
                log(f"   {d} is left out of the generated mixtures and eval sets: "
                    + ", ".join(f"{n:,} of its cells are copies of {o}'s" for o, n in by.items()))
            spec_dir = generated_specs(ids, workdir / "specs")
        names = sorted(p.stem for p in spec_dir.glob("*.toml") if p.name != EVAL_SPEC)
        base = {"name": "generated", "mixtures_dir": str(spec_dir.resolve()),
                "eval_sets": str((spec_dir / EVAL_SPEC).resolve()), "mixtures": names,
                "reference": "all" if "all" in names else None, "seeds": [0, 1, 2], "budgets": ["cells=60000"],
                "genes": {"n_hvg": 500}, "ldvae": {"batch_size": 256, "lr": 0.005},
                "evaluation": {"max_cells_per_set": 1000},
                "checks": {"sources": {n[:-len("_only")]: f"{n[:-len('_only')]}_heldout" for n in names
                                       if n.endswith("_only")}}}
    base["genes"] = dict(base.get("genes", {}), **({"n_hvg": n_genes} if n_genes else {}))
    if seeds:
        base["seeds"] = list(seeds)
    if budget:
        base["budgets"] = [budget]
    if mixtures:
        base["mixtures"] = list(mixtures)
        if base.get("reference") not in mixtures:
            base["reference"] = None
    study = StudySpec.model_validate(base)
    (workdir / "study.json").write_text(json.dumps(study.model_dump(mode="json"), indent=1) + "\n")
    with L.stage("study (resolve, train, evaluate, summarise, report)"):
        doc = run_study(study, store, workdir / "study", jobs=jobs, accelerator="gpu" if gpu else "cpu",
                        log=log)
    summary = {"workdir": str(workdir.resolve()), "device": "cuda" if gpu else "cpu", "stages_s": L.times,
               "study_stages_s": doc["stages_s"], "total_s": round(time.perf_counter() - L.t0, 1),
               "report": doc.get("report"), "n_runs": doc["n_runs"], "headline": doc["headline"],
               "checks": doc["checks"], "all_checks_passed": doc["all_checks_passed"]}
    (workdir / "demo.json").write_text(json.dumps(summary, indent=1) + "\n")
    log(f"[bold green]demo finished in {summary['total_s']:.0f} s[/]: open {doc.get('report')}")
    if check and data_dir is None and doc["all_checks_passed"] is False:
        bad = [c["name"] for c in doc["checks"] if c["applicable"] and not c["passed"]]
        raise AtlasmixError(f"the demo study failed its sanity checks ({', '.join(bad)}): see "
                            f"{workdir / 'study' / 'checks.json'} and the report")
    return summary
