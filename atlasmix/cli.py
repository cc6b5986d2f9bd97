"""The ``atlasmix`` command line (typer). Every user error prints one line and exits with code 2."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from atlasmix.errors import AtlasmixError

app = typer.Typer(help="atlasmix: a TileDB-SOMA data lake for training-data composition studies. "
                       "Every failure prints one line (error: ...) and exits 2; add --debug anywhere for the traceback.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
store_app = typer.Typer(help="Create and inspect a store.", no_args_is_help=True)
app.add_typer(store_app, name="store")
console = Console(stderr=True)


def _kv(items: list[str] | None, what: str) -> dict[str, str]:
    out = {}
    for it in items or []:
        if "=" not in it:
            raise AtlasmixError(f"{what} expects KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        out[k.strip()] = v.strip()
    return out


@store_app.command("init")
def store_init(store: Annotated[str, typer.Argument(help="Local path or s3:// URI of the new store.")]):
    """Create an empty store (one SOMA Experiment)."""
    from atlasmix.store import Store

    s = Store.create(store)
    console.print(f"created store {s.uri}")


@store_app.command("info")
def store_info(store: str, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False):
    """Datasets, cells, genes, presence and size on disk."""
    from atlasmix.store import Store

    info = Store(store).info()
    if as_json:
        typer.echo(json.dumps(info, indent=1))
        return
    t = Table(title=f"{info['uri']}: {info['n_cells']:,} cells, {info['n_genes']:,} genes "
                    f"({info['n_genes_measured']:,} measured), "
                    f"{(info['size_bytes'] or 0) / 2**20:.1f} MiB")
    for c in ["dataset_id", "status", "cells", "genes measured", "mapped", "qc_pass", "format", "organism",
              "x layout", "copies of"]:
        t.add_column(c)
    for d in info["datasets"]:
        gm = d["gene_mapping"]
        dup = (d.get("duplicate_cells") or {}).get("by_dataset", {})
        t.add_row(d["dataset_id"], d["status"], f"{d['n_cells']:,}", f"{d['n_genes_measured']:,}",
                  f"{gm.get('n_mapped', 0)}/{gm.get('n_source_genes', 0)}",
                  "" if d["qc_pass_fraction"] is None else f"{d['qc_pass_fraction']:.0%}",
                  d["source_format"], d["organism"],
                  {True: "yes", False: "no (store optimize)", None: ""}[d.get("x_layout")], ", ".join(f"{k} ({n:,})" for k, n in dup.items()))
    Console().print(t)


def _progress_bar():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False, disable=not sys.stderr.isatty())


def _bar_per_key(prog, describe):
    """A progress callback ``update(key, done, total)``: one bar of ``prog`` per ``key``, labelled
    ``describe(key)``, added when the key first reports."""
    tasks: dict = {}

    def update(key, done, total):
        if key not in tasks:
            tasks[key] = prog.add_task(describe(key), total=total)
        prog.update(tasks[key], completed=done)

    return update


@store_app.command("optimize")
def store_optimize(store: str):
    """Write the read-optimised x layout (zarr v3 CSR) of every dataset that lacks it; resumable."""
    from atlasmix.store import Store
    from atlasmix.store import xlayout

    s = Store(store)
    with _progress_bar() as prog, s.write_lock(on_wait=lambda: console.print("waiting for the store's write lock...")):
        s.recover()
        progress = _bar_per_key(prog, lambda ds: f"x layout {ds}")
        r = xlayout.optimize(s, progress=progress)
    console.print(f"x layout: {len(r['written'])} datasets written, {len(r['kept'])} already there, "
                  f"{len(r['removed'])} stale groups removed")


@store_app.command("verify")
def store_verify(store: str, as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False):
    """Check the x layout against TileDB X, cell by cell (exit 1 when a dataset differs or lacks it)."""
    from atlasmix.store import Store
    from atlasmix.store import xlayout

    s = Store(store)
    with _progress_bar() as prog:
        progress = _bar_per_key(prog, lambda ds: f"verify {ds}")
        r = xlayout.verify(s, progress=progress)
    if as_json:
        typer.echo(json.dumps(r, indent=1))
    else:
        for d in r["datasets"]:
            console.print(f"{d['dataset_id']}: {d['status']}" + (f" ({d['detail']})" if d["detail"] else ""))
        if r.get("detail"):
            console.print(r["detail"])
    if not r["ok"]:
        console.print("error: the x layout does not match TileDB X"
                      + (" (run `atlasmix store optimize`)" if any(d["status"] == "missing" for d in r["datasets"])
                         else ""))
        raise typer.Exit(1)


@store_app.command("export")
def store_export(store: str, out: Annotated[Path, typer.Argument(help="Output .h5ad")],
                 where: Annotated[str, typer.Option(help="SQL predicate over obs (duckdb).")],
                 genes: Annotated[str, typer.Option(help="measured | all")] = "measured"):
    """Write the cells matching --where to an h5ad (streamed)."""
    from atlasmix.store import Store
    from atlasmix.store.query import export_h5ad

    if genes not in ("measured", "all"):
        raise AtlasmixError("--genes must be 'measured' or 'all'")
    r = export_h5ad(Store(store), where, out, genes=genes)
    console.print(f"wrote {r['n_cells']:,} cells x {r['n_genes']:,} genes to {r['path']}")


@app.command("ingest")
def ingest_cmd(
    store: Annotated[str, typer.Argument(help="Store path or URI.")],
    source: Annotated[Optional[str], typer.Argument(help="h5ad, AnnData zarr, 10x MEX dir, 10x .h5 or SOMA URI.")] = None,
    dataset_id: Annotated[Optional[str], typer.Option("--dataset-id")] = None,
    organism: Annotated[str, typer.Option(help="human | mouse | Homo sapiens | ...")] = "human",
    tissue: Annotated[Optional[str], typer.Option()] = None,
    title: Annotated[str, typer.Option()] = "",
    citation: Annotated[str, typer.Option()] = "",
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="obs column = constant, e.g. assay=10x 3' v3")] = None,
    obs_map: Annotated[Optional[list[str]], typer.Option("--obs-map", help="store_col=source_col")] = None,
    obs_table: Annotated[Optional[str], typer.Option(help="CSV/TSV of extra obs, first column = barcode")] = None,
    obs_filter: Annotated[Optional[str], typer.Option(help="Keep cells matching this predicate (duckdb SQL over the source obs; for SOMA sources a tiledbsoma value_filter)")] = None,
    gene_id_column: Annotated[Optional[str], typer.Option(help="var column holding gene ids/symbols (default: var index)")] = None,
    gene_table: Annotated[Optional[str], typer.Option(help="GTF or CSV gene table instead of the built-in one")] = None,
    layer: Annotated[Optional[str], typer.Option(help="X (default), raw (raw/X) or a layer name; X layer for SOMA")] = None,
    genome: Annotated[Optional[str], typer.Option(help="Genome of a multi-genome 10x HDF5 file (e.g. GRCh38, mm10)")] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", help="h5ad | zarr | mex | 10x_h5 | soma (default: detect)")] = None,
    assume_counts: Annotated[bool, typer.Option(help="Accept non-integer values as counts")] = False,
    on_duplicate_genes: Annotated[str, typer.Option(help="sum | refuse")] = "sum",
    on_duplicate_cells: Annotated[str, typer.Option(
        help="warn | refuse: cells with the same count on every gene as stored cells (same cells under "
             "another id or format)")] = "warn",
    replace: Annotated[bool, typer.Option(help="Replace an existing dataset with the same id")] = False,
    qc_max_pct_mt: Annotated[float, typer.Option(help="QC: pct_counts_mt below this passes")] = 10.0,
    qc_min_counts: Annotated[float, typer.Option(help="QC: total_counts above this passes")] = 1000.0,
    qc_min_genes: Annotated[int, typer.Option(help="QC: at least this many genes detected")] = 0,
    plan: Annotated[Optional[Path], typer.Option(help="TOML plan with [[dataset]] entries")] = None,
    chunk_size: Annotated[int, typer.Option(help="Cells per chunk")] = 8192,
    parallel: Annotated[bool, typer.Option(help="Parallel prepare/write of plan datasets (dask threads)")] = True,
    scheduler: Annotated[Optional[str], typer.Option(help="dask.distributed scheduler address (tcp://host:8786): "
                                                          "validate and write the datasets in its workers; sources "
                                                          "and store must be reachable from them")] = None,
    workers: Annotated[int, typer.Option(help="Start a local dask.distributed cluster of this many worker "
                                              "processes for the ingest (0: none)")] = 0,
):
    """Append datasets to a store: validated, QC-flagged, crash-safe."""
    from atlasmix.ingest import DatasetRequest, QCPolicy, ingest, read_plan

    qc = QCPolicy(max_pct_counts_mt=qc_max_pct_mt, min_total_counts=qc_min_counts, min_genes=qc_min_genes)
    common = dict(organism=organism, tissue=tissue, assume_counts=assume_counts, on_duplicate_genes=on_duplicate_genes,
                  on_duplicate_cells=on_duplicate_cells, replace=replace, qc=qc, layer=layer, gene_table=gene_table, format=fmt, genome=genome)
    if plan is not None:
        if source or dataset_id:
            raise AtlasmixError("give either SOURCE --dataset-id or --plan, not both")
        reqs = read_plan(plan, {k: v for k, v in common.items() if v is not None and k != "qc"} | {"qc": qc})
    else:
        if not source or not dataset_id:
            raise AtlasmixError("need SOURCE and --dataset-id (or --plan plan.toml)")
        if on_duplicate_genes not in ("sum", "refuse"):
            raise AtlasmixError("--on-duplicate-genes must be sum or refuse")
        if on_duplicate_cells not in ("warn", "refuse"):
            raise AtlasmixError("--on-duplicate-cells must be warn or refuse")
        reqs = [DatasetRequest(dataset_id=dataset_id, source=source, title=title, citation=citation,
                               set=_kv(set_, "--set"), obs_map=_kv(obs_map, "--obs-map"), obs_table=obs_table,
                               obs_filter=obs_filter, gene_id_column=gene_id_column, **common)]
    with _progress_bar() as prog:
        bar = _bar_per_key(prog, lambda key: f"{key[1]:9s} {key[0]}")

        def progress(ds, phase, done, total):
            bar((ds, phase), done, total)

        from atlasmix.cluster import dask_client

        with dask_client(scheduler, workers) as client:
            reports = ingest(store, reqs, chunk_size=chunk_size, parallel=parallel, progress=progress,
                             on_wait=lambda: console.print("waiting for the store's write lock..."), client=client)
    for r in reports:
        gm = r["gene_mapping"]
        console.print(f"ingested {r['dataset_id']}: {r['n_cells']:,} cells, genes mapped {gm['n_mapped']}/"
                      f"{gm['n_source_genes']} ({gm['mapped_fraction']:.1%}; unmapped {gm['n_unmapped']}, "
                      f"ambiguous {gm['n_ambiguous']}, duplicates summed {gm['n_duplicates']}; "
                      f"by rule {gm['by_method']}), qc_pass {r['qc_pass_fraction']:.1%}")
        dup = r.get("duplicate_cells", {})
        for d, n in dup.get("by_dataset", {}).items():
            console.print(f"warning: {n:,} cells of {r['dataset_id']} have the same counts on every gene as cells of "
                          f"{d} (the same cells twice?); recorded in the catalog provenance")
        if dup.get("within_dataset"):
            console.print(f"warning: {dup['within_dataset']:,} cells of {r['dataset_id']} repeat the counts of other "
                          "cells of the same source")


@app.command("demo")
def demo_cmd(
    workdir: Annotated[Path, typer.Option(help="Output folder (replaced): corpus, store, study/ (manifests, runs, "
                                               "tables, report.html), demo.json.")] = Path("demo"),
    data_dir: Annotated[Optional[Path], typer.Option(help="Folder of real files (h5ad / 10x h5 / zarr / MEX) "
                                                          "instead of the simulated corpus.")] = None,
    cells: Annotated[int, typer.Option(help="Cells of the simulated corpus.")] = 30_000,
    seeds: Annotated[Optional[list[int]], typer.Option("--seed-replicate", help="Replicate seeds (repeatable; "
                                                                                 "default 0 1 2).")] = None,
    budget: Annotated[Optional[str], typer.Option(help="Training budget of every model: cells=N, steps=N, epochs=N "
                                                       "or converged:epochs=N (default: the study's, cells=200000).")] = None,
    genes: Annotated[Optional[int], typer.Option(help="HVGs on the models' gene axis (default: the study's, 500).")] = None,
    jobs: Annotated[int, typer.Option(help="Grid cells trained at once.")] = 2,
    accelerator: Annotated[str, typer.Option(help="auto (CUDA when present), cpu, gpu.")] = "auto",
    mixture: Annotated[Optional[list[str]], typer.Option(help="Run only these mixtures (repeatable).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the simulated corpus.")] = 0,
    check: Annotated[bool, typer.Option(help="Fail (exit 2) when a sanity check fails on the simulated corpus.")] = True,
):
    """Run the demo study: simulated (or your) corpus -> store -> 10 mixtures x 3 seeds of LDVAE -> evaluation -> report."""
    from atlasmix.demo import run_demo

    run_demo(workdir, data_dir, n_cells=cells, seeds=seeds, budget=budget, n_genes=genes, jobs=jobs,
             accelerator=accelerator, mixtures=mixture, seed=seed, check=check,
             log=lambda s: console.print(s, soft_wrap=True))


def _register_optional() -> None:
    """Let each stage add its commands: ``atlasmix.<stage>.cli.register(app)`` where it exists."""
    import importlib

    for mod in ("atlasmix.simulate.cli", "atlasmix.mixing.cli", "atlasmix.training.cli",
                "atlasmix.training.geneformer.cli", "atlasmix.training.fm_cli", "atlasmix.evaluation.cli",
                "atlasmix.study.cli"):
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:
                continue
            raise
        m.register(app)


_register_optional()


def _one_line(e: BaseException, limit: int = 400) -> str:
    """First non-empty line of ``str(e)``, shortened to ``limit`` characters."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[0] if lines else repr(e)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the app and turn every failure into one line on stderr.

    ``AtlasmixError`` (bad input, refused operation) prints ``error: <message>``; any other exception
    prints ``error: <what happened> (<exception type>); rerun with --debug for the traceback``. Both
    exit with status 2 (Ctrl-C: 130). ``--debug`` anywhere on the command line (or ``ATLASMIX_DEBUG=1``)
    lets the traceback through instead. Commands that write are crash-safe on their own (the ingest
    commits last), so an error here leaves the store as it was.
    """
    import os

    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("ATLASMIX_DEBUG", "") not in ("", "0")
    args = [a for a in args if a != "--debug"]
    try:
        rc = app(args=args, prog_name="atlasmix", standalone_mode=False)
        if isinstance(rc, int) and rc:  # typer.Exit(n) comes back as a return value without standalone mode
            sys.exit(rc)
    except SystemExit:
        raise
    except AtlasmixError as e:
        if debug:
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except BaseException as e:  # click usage errors, Ctrl-C, and anything unexpected
        import click

        # typer >= 0.20 raises its own copy of click's exceptions (typer.TyperException subclasses)
        if isinstance(e, click.exceptions.ClickException) or (isinstance(e, typer.TyperException)
                                                              and hasattr(e, "show") and hasattr(e, "exit_code")):
            e.show()
            sys.exit(2)
        if isinstance(e, (click.exceptions.Abort, typer.Abort, KeyboardInterrupt)):
            print("error: interrupted", file=sys.stderr)
            sys.exit(130)
        if debug:
            raise
        print(f"error: {_one_line(e)} ({type(e).__name__}); rerun with --debug for the traceback", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
