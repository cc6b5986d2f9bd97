"""``atlasmix study ...``: run a composition study grid from a spec, and render its report."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer


# The sub-app set-up and the SPEC / --store / --out options have the shape of `mix resolve`'s (mixing/cli.py):
# typer reads each command's options from its own signature, so they are written out here too.
def register(app: typer.Typer) -> None:
    """Add the ``study`` sub-commands (``run``, ``report``) to ``app``."""
    study = typer.Typer(help="Composition studies: mixtures x seeds x budgets, evaluated and summarised.",
                        no_args_is_help=True)
    app.add_typer(study, name="study")

    @study.command("run")
    def run_cmd(
        spec: Annotated[Path, typer.Argument(help="Study TOML (mixtures, eval sets, seeds, budgets, checks).")],
        store: Annotated[str, typer.Option("--store", help="Store path or URI.")],
        out: Annotated[Path, typer.Option("--out", help="Output folder; a study there is continued.")],
        jobs: Annotated[int, typer.Option(help="Grid cells trained at once (processes).")] = 1,
        accelerator: Annotated[str, typer.Option(help="cpu or gpu.")] = "cpu",
        strict: Annotated[bool, typer.Option(help="Exit 1 when a sanity check fails.")] = False,
        scheduler: Annotated[Optional[str], typer.Option(help="dask.distributed scheduler address: grid cells run "
                                                              "as tasks on its workers (store and --out reachable "
                                                              "from them).")] = None,
        workers: Annotated[int, typer.Option(help="Start a local dask.distributed cluster of this many worker "
                                                  "processes for the grid cells (cores split between them; with "
                                                  "--accelerator gpu, one GPU each).")] = 0,
    ):
        """Resolve, train (budgeted, seeded), evaluate and summarise every grid cell; skip finished ones."""
        from rich.console import Console

        from atlasmix.errors import AtlasmixError
        from atlasmix.store import Store
        from atlasmix.study.runner import run_study

        if accelerator not in ("cpu", "gpu"):
            raise AtlasmixError("--accelerator must be cpu or gpu")
        con = Console(stderr=True)
        import os

        from atlasmix.cluster import dask_client

        devices = 0
        if accelerator == "gpu" and workers:
            import torch

            devices = torch.cuda.device_count()
        with dask_client(scheduler, workers, threads_per_worker=max(1, (os.cpu_count() or 1) // max(workers, 1)),
                         devices=devices) as client:
            doc = run_study(spec, Store(store), out, jobs=jobs, accelerator=accelerator, client=client,
                            log=lambda s: con.print(s, soft_wrap=True, markup=False), progress=sys.stderr.isatty())
        con.print(f"study {doc['name']}: {doc['n_runs']} runs, {doc['stages_s']['total']:.0f} s; "
                  f"report {doc.get('report')}", markup=False)
        if doc["all_checks_passed"] is False:
            con.print("sanity checks FAILED (see checks.json and the report)", markup=False)
            if strict:
                raise typer.Exit(1)

    @study.command("report")
    def report_cmd(
        results: Annotated[Path, typer.Argument(help="A study's output folder.")],
        out: Annotated[Path, typer.Option("--out", help="HTML file (PNGs beside it).")] = None,
    ):
        """Render report.html of a finished study."""
        from atlasmix.study.report import render_study_report

        rep = render_study_report(results, out or results / "report.html")
        typer.echo(str(rep["html"]))
