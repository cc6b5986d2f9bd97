"""``atlasmix demo``: the whole study in one command -- corpus -> store -> mixtures -> models -> evaluation -> report.

Stages (each prints what it did and how long it took; outputs land in ``workdir``)::

    corpus/     the simulated multi-source atlas (default) or the user's files (--data-dir)
    store/      the TileDB-SOMA store, everything ingested through one plan
    mixtures/   one resolved manifest (+ sidecar) per mixture spec
    genes.txt   the shared gene axis of the models (see :func:`choose_genes`)
    models/     ldvae_<mixture>/ for every mixture, geneformer_<mixture>/ for one
    results/    atlasmix eval run output (results.parquet/csv, per_cell.parquet, few_shot.csv)
    report.html the HTML report (PNGs beside it)

The study design is scFM-datamix's (Figure 2): a base model trained on half of the healthy blood
base, the base plus each added source, and each added source alone, all evaluated on the same
held-out eval suite (``eval_sets.toml``, excluded from every mixture). With the simulated corpus the
specs are ``examples/mixtures/demo/`` (:data:`STUDY_MIXTURES`); with ``--data-dir`` they are
``examples/mixtures/shared/`` when the directory holds the project's shared real datasets, else a
generated design (every dataset alone, all together; eval set: 10 % of every dataset).

Scale and speed: the demo's defaults are sized for a 2-core CPU (about 50k cells, a 2,000-HVG gene
axis, 2 LDVAE epochs per mixture on the CPU, a tiny Geneformer for 30 steps, no few-shot protocol). On a GPU
(``--accelerator auto`` finds it) the same command trains more epochs (``--epochs``).
"""

from __future__ import annotations

import json
import shutil
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from atlasmix.errors import AtlasmixError

#: The ten mixtures of scFM-datamix's design, as named in ``examples/mixtures/demo``.
STUDY_MIXTURES = ("base_model", "base_full", "base_plus_malignant", "base_plus_perturbation",
                  "base_plus_bone_marrow", "base_plus_tf_atlas", "malignant_only", "perturbation_only",
                  "bone_marrow_only", "tf_atlas_only")
EVAL_SPEC = "eval_sets.toml"
FILE_SUFFIXES = (".h5ad", ".h5", ".zarr")


def examples_dir() -> Path:
    """The repository's ``examples/`` folder (the demo reads its mixture specs and plans there).

    Raises
    ------
    AtlasmixError
        atlasmix is not run from a source checkout (``pip install -e .``), so ``examples/`` is absent.
    """
    d = Path(__file__).resolve().parents[1] / "examples"
    if not (d / "mixtures").is_dir():
        raise AtlasmixError(f"examples/ not found beside the package ({d}); run the demo from a source checkout")
    return d


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
    shared_plan = examples_dir() / "shared_data_plan.toml"
    doc = tomllib.loads(shared_plan.read_text())
    names = [Path(d["source"]).name for d in doc["dataset"]]
    workdir.mkdir(parents=True, exist_ok=True)
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
        return plan, examples_dir() / "mixtures" / "shared"
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


# ---------------------------------------------------------------------------------------------- genes
def choose_genes(store, manifests: list[Path], n_genes: int = 2000, max_cells: int = 20_000,
                 min_dataset_fraction: float = 0.5, seed: int = 0) -> list[str]:
    """The models' shared gene axis: the top ``n_genes`` HVGs of the mixtures' training cells.

    Candidate genes are those measured (feature_dataset_presence_matrix) in at least
    ``min_dataset_fraction`` of the datasets that contribute training cells -- small gene panels
    (e.g. a 200-gene dataset) would otherwise empty the intersection. Among them, scanpy's
    ``seurat``-flavour HVG selection on log1p(CP10k) (streamed moments,
    :class:`atlasmix.evaluation.metrics.HVGStats`) over a seeded sample of at most ``max_cells``
    training cells (union over ``manifests``).

    Returns
    -------
    list of str
        Ensembl ids (``feature_id``), in var order.

    Raises
    ------
    AtlasmixError
        No candidate gene.
    """
    from atlasmix.evaluation.metrics import HVGStats
    from atlasmix.mixing import read_manifest

    cells = []
    for m in manifests:
        t, _ = read_manifest(m, store=store)
        split = t["split"].cast("string").to_numpy(zero_copy_only=False)
        cells.append(t["soma_joinid"].to_numpy()[split == "train"])
    cells = np.unique(np.concatenate(cells))
    rng = np.random.default_rng(seed)
    if len(cells) > max_cells:
        cells = np.sort(rng.choice(cells, max_cells, replace=False))
    obs = store.obs(["dataset_id"]).to_pandas().set_index("soma_joinid")
    used = set(obs.loc[cells, "dataset_id"].unique())
    cat = store.catalog()
    rows = cat.index.to_numpy()[cat["dataset_id"].isin(used).to_numpy()]  # index: dataset joinid
    pres = store.presence()[np.asarray(rows, dtype=np.int64)]
    frac = np.asarray(pres.mean(axis=0)).ravel()
    var = store.var()
    cand = var.index.to_numpy()[frac[var.index.to_numpy()] >= min_dataset_fraction - 1e-9]
    if len(cand) == 0:
        raise AtlasmixError("no gene is measured in enough of the mixtures' datasets")
    stats = HVGStats(len(cand))
    for _, m in store.iter_X(cells, cand, chunk_size=4096):
        stats.update(m)
    dn = stats.table()["dispersions_norm"].to_numpy()
    order = np.argsort(-np.nan_to_num(dn, nan=-np.inf), kind="stable")  # most variable first, NaN last
    top = np.sort(order[:min(n_genes, len(cand))])
    return var.loc[cand[top], "feature_id"].astype(str).tolist()


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


def run_study(store, spec_dir: str | Path, workdir: str | Path, mixtures: list[str], *, epochs: int = 2,
              n_genes: int = 2000, batch_size: int = 256, gpu: bool = False, geneformer: bool = True,
              geneformer_steps: int = 30, few_shot: bool = False, seed: int = 0, title: str = "atlasmix study",
              log: Callable[[str], None] = print, _log: _Log | None = None) -> dict[str, Any]:
    """Resolve mixtures, choose the gene axis, train LDVAE on each (and a tiny Geneformer), evaluate, report.

    The second half of :func:`run_demo`, on an existing store.

    Parameters
    ----------
    store : atlasmix.store.Store
    spec_dir : path
        Folder with the mixture specs ``<name>.toml`` and ``eval_sets.toml``.
    workdir : path
        Output folder (``mixtures/``, ``genes.txt``, ``models/``, ``results/``, ``report.html``, ``demo.json``).
    mixtures : list of str
        Spec names to resolve and train on.
    epochs, n_genes, batch_size, geneformer, geneformer_steps, few_shot, seed
        As in :func:`run_demo`. ``gpu``: train and evaluate on CUDA.

    Returns
    -------
    dict
        Stage times (s), models, the report path, the median reconstruction accuracy table
        (mixture x eval set) and the number of result rows.

    Raises
    ------
    AtlasmixError
        A missing spec, an unresolvable mixture, an eval set overlapping a training manifest.
    """
    from atlasmix.evaluation.evalsets import store_eval_sets
    from atlasmix.evaluation.report import render_report
    from atlasmix.evaluation.run import evaluate
    from atlasmix.mixing import resolve, write_manifest
    from atlasmix.training.ldvae import train_ldvae

    spec_dir, workdir = Path(spec_dir), Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    L = _log or _Log(log)
    device = "cuda" if gpu else "cpu"
    with L.stage(f"resolve {len(mixtures)} mixtures"):
        manifests: dict[str, Path] = {}
        for name in mixtures:
            spec = spec_dir / f"{name}.toml"
            if not spec.is_file():
                raise AtlasmixError(f"mixture spec not found: {spec}")
            path = workdir / "mixtures" / f"{name}.parquet"
            side = write_manifest(resolve(spec, store), path)
            manifests[name] = path
            counts = side.get("counts", {})
            log(f"   {name:<32} train {counts.get('train', 0):>7,}  validation {counts.get('validation', 0):>6,}")

    with L.stage("gene axis"):
        genes = choose_genes(store, list(manifests.values()), n_genes=n_genes, seed=seed)
        (workdir / "genes.txt").write_text("\n".join(genes) + "\n")
        log(f"   {len(genes):,} HVGs of the training cells -> genes.txt")

    model_dirs: list[Path] = []
    skipped: dict[str, str] = {}
    with L.stage(f"train LDVAE x {len(manifests)}"):
        for name, path in manifests.items():
            out = workdir / "models" / f"ldvae_{name}"
            try:
                run = train_ldvae(store, path, out, accelerator="gpu" if gpu else "cpu", batch_size=batch_size,
                                  max_epochs=epochs, seed=seed, genes=genes, checkpoint_every=0, validation=True,
                                  progress=False, prior_cells=20_000, io_batch_size=8192,
                                  # more than 2 epochs: project X onto the HVG axis once (about one
                                  # epoch's read) so that later epochs read only its nonzeros
                                  x_cache=workdir / "xcache" if epochs > 2 else None)
            except AtlasmixError as e:  # e.g. a mouse-only mixture on the human gene axis: skipped, said why
                shutil.rmtree(out, ignore_errors=True)
                skipped[f"ldvae_{name}"] = str(e)
                log(f"   ldvae_{name:<28} [yellow]skipped[/]: {e}")
                continue
            model_dirs.append(out)
            log(f"   ldvae_{name:<28} {run['n_cells']['train']:>7,} cells x {epochs} epoch(s)  "
                f"{run['wall_s']:>6.1f} s  ({run['train_cells_per_s']:,.0f} cells/s)")

    if geneformer:
        with L.stage("train a tiny Geneformer"):
            from atlasmix.training.geneformer.pretrain import train_geneformer

            first = "base_model" if "base_model" in manifests else next(iter(manifests))
            out = workdir / "models" / f"geneformer_{first}"
            run = train_geneformer(store, manifests[first], out, preset="tiny", max_len=256, batch_size=16,
                                   max_steps=geneformer_steps, warmup_steps=5, device=device, seed=seed,
                                   checkpoint_every=0, io_batch_size=4096)
            model_dirs.append(out)
            log(f"   geneformer_{first}: {run['steps']} steps, final MLM loss {run['final_loss']:.3f}, "
                f"{run['train_cells_per_s']:,.0f} cells/s")

    with L.stage("evaluate"):
        sets = store_eval_sets(spec_dir / EVAL_SPEC, store)
        log(f"   eval sets: {', '.join(f'{e.name} ({e.n_cells:,})' for e in sets)}")
        evaluate(model_dirs, sets, workdir / "results", store=store, few_shot_seeds=(seed,),
                 few_shot_fractions=(0.1, 0.25, 0.5, 0.75, 1.0) if few_shot else (),
                      device=device, seed=seed, log=lambda s: log(f"   {s}"))

    with L.stage("report"):
        rep = render_report(workdir / "results", workdir / "report.html",
                            title=title)
        log(f"   {rep['html']} ({len(rep['figures'])} figures)")

    import pandas as pd

    res = pd.read_parquet(workdir / "results" / "results.parquet")
    med = res[res["metric"] == "recon_pearson_median"].pivot_table(index="mixture", columns="eval_set", values="value")
    summary = {"workdir": str(workdir.resolve()), "device": device, "epochs": epochs, "stages_s": L.times,
               "total_s": round(time.perf_counter() - L.t0, 1), "models": [str(p) for p in model_dirs],
               "report": str(rep["html"]), "n_genes": len(genes),
               "median_reconstruction_r": json.loads(med.round(4).to_json(orient="index")),
               "n_result_rows": int(len(res)), "eval_sets": [e.name for e in sets], "skipped": skipped}
    (workdir / "demo.json").write_text(json.dumps(summary, indent=1) + "\n")
    if len(med):
        log("median reconstruction accuracy (Pearson r, top-1000 HVGs of each eval set):")
        log(med.round(3).to_string())
    log(f"[bold green]demo finished in {summary['total_s']:.0f} s[/]: open {rep['html']}")
    return summary


def run_demo(workdir: str | Path = "demo", data_dir: str | Path | None = None, *, n_cells: int = 50_000,
             epochs: int | None = None, n_genes: int = 2000, batch_size: int = 256, accelerator: str = "auto",
             geneformer: bool = True, geneformer_steps: int = 30, few_shot: bool | None = None,
             mixtures: list[str] | None = None, seed: int = 0, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole study (module doc) and return a summary (also written to ``workdir/demo.json``).

    Parameters
    ----------
    workdir : path
        Output folder; a previous demo there is replaced.
    data_dir : path, optional
        A folder of real files (h5ad / 10x h5 / AnnData zarr / 10x MEX) instead of the simulated corpus.
    n_cells : int
        Cells of the simulated corpus.
    epochs : int, optional
        LDVAE epochs per mixture; default 2 on the CPU, 20 on a GPU.
    n_genes : int
        HVGs on the models' gene axis (:func:`choose_genes`).
    batch_size : int
        LDVAE minibatch.
    accelerator : str
        ``auto`` (CUDA when present), ``cpu``, ``gpu``.
    geneformer : bool
        Also pretrain a tiny Geneformer on the first mixture (``geneformer_steps`` steps) and evaluate it.
    few_shot : bool, optional
        Run the few-shot protocol (one seed, 5 training fractions). Default: on a GPU machine only --
        its one-vs-rest L1 liblinear fits with 5-fold CV took ~4 min per model and eval set on 2 CPU
        cores, longer than the rest of the demo (``atlasmix eval run`` runs it by default).
    mixtures : list of str, optional
        Mixture spec names to run (default: the study's, or every spec of the folder).

    Returns
    -------
    dict
        Stage times (s), models, the report path, and the median reconstruction accuracy table.

    Raises
    ------
    AtlasmixError
        Bad data directory, a mixture that cannot be resolved, a failed stage.
    """
    import torch

    from atlasmix.cli import _plan_requests
    from atlasmix.ingest import QCPolicy, ingest
    from atlasmix.store import Store

    workdir = Path(workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    L = _Log(log)
    gpu = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
    if epochs is None:
        epochs = 20 if gpu else 2
    if few_shot is None:
        few_shot = gpu
    device = "cuda" if gpu else "cpu"
    log(f"atlasmix demo -> {workdir.resolve()}  (device: {device}, LDVAE epochs: {epochs})")

    with L.stage("corpus"):
        if data_dir is None:
            from atlasmix.simulate import simulate_atlas

            info = simulate_atlas(workdir / "corpus", n_cells=n_cells, seed=seed)
            plan, spec_dir = Path(info["plan"]), examples_dir() / "mixtures" / "demo"
            wanted = list(mixtures or STUDY_MIXTURES)
            log(f"   simulated {n_cells:,} cells: " + ", ".join(f"{s['dataset_id']} ({s['n_cells']:,})" for s in info["sources"]))
        else:
            plan, spec_dir = plan_for(Path(data_dir), workdir / "corpus")
            wanted = list(mixtures) if mixtures else None
            log(f"   real data from {data_dir}; plan {plan}")

    with L.stage("store + ingest"):
        store = Store.create(str(workdir / "store"))
        reports = ingest(store, _plan_requests(plan, {"qc": QCPolicy()}))
        for r in reports:
            log(f"   {r['dataset_id']:<24} {r['n_cells']:>8,} cells")
        if spec_dir is None:
            ids, copies = datasets_without_copies(reports)
            for d, by in copies.items():
                log(f"   {d} is left out of the generated mixtures and eval sets: "
                    + ", ".join(f"{n:,} of its cells are copies of {o}'s" for o, n in by.items()))
            spec_dir = generated_specs(ids, workdir / "specs")
        if wanted is None:
            wanted = sorted(p.stem for p in spec_dir.glob("*.toml") if p.name != EVAL_SPEC)

    summary = run_study(store, spec_dir, workdir, wanted, epochs=epochs, n_genes=n_genes, batch_size=batch_size,
                        gpu=gpu, geneformer=geneformer, geneformer_steps=geneformer_steps, few_shot=few_shot,
                        seed=seed, title="atlasmix demo: training-data composition" + (" (real data)" if data_dir else ""),
                        log=log, _log=L)
    return summary
