"""``atlasmix eval ...``: evaluate trained models on held-out eval sets, and report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def _floats(text: str) -> tuple[float, ...]:
    from atlasmix.errors import AtlasmixError

    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise AtlasmixError(f"expected comma-separated numbers, got {text!r}") from None


def register(app: typer.Typer) -> None:
    """Add the ``eval`` sub-commands (``run``, ``report``) to ``app``."""
    ev = typer.Typer(help="Evaluate models on held-out eval sets.", no_args_is_help=True)
    app.add_typer(ev, name="eval")

    @ev.command("run", context_settings={"allow_extra_args": True})
    def run_cmd(
        ctx: typer.Context,
        eval_sets: Annotated[list[str], typer.Option("--eval-sets", help="Eval-set spec (.toml, store sets; needs "
                                                     "--store), .h5ad file or 10x MEX directory; NAME=PATH names a "
                                                     "file set. Repeat for several.")],
        out: Annotated[Path, typer.Option("--out", help="Results directory (results/per_cell parquet+CSV, "
                                                        "few_shot.csv, evaluation.json).")],
        models: Annotated[Optional[list[Path]], typer.Option("--models", help="Model directory (LDVAE run dir, or "
                                                             "Geneformer run dir OUT / OUT/model). Repeat, or give "
                                                             "several after one --models.")] = None,
        store: Annotated[Optional[str], typer.Option("--store", help="Store path or URI of the store eval sets.")] = None,
        pca: Annotated[bool, typer.Option(help="Include the PCA baseline (50 PCs of the set's top 2,000 HVGs).")] = True,
        batch_size: Annotated[int, typer.Option(help="Eval cells per streamed batch.")] = 1024,
        n_hvg: Annotated[int, typer.Option(help="HVGs scored by the reconstruction metric.")] = 1000,
        few_shot_seeds: Annotated[int, typer.Option(help="Seeds per few-shot training fraction (0: skip few-shot).")] = 3,
        few_shot_fractions: Annotated[str, typer.Option(help="Comma-separated training fractions.")] = "0.1,0.25,0.5,0.75,1",
        cell_type_column: Annotated[str, typer.Option(help="obs column of cell types in external h5ad files.")] = "cell_type",
        organism: Annotated[str, typer.Option(help="Organism of external files' gene symbols.")] = "human",
        sample_z: Annotated[bool, typer.Option(help="No effect, kept for old scripts: the reconstruction always "
                                                    "decodes one posterior sample of z (scvi-tools' "
                                                    "get_normalized_expression, as scFM-datamix).")] = False,
        max_rank_cells: Annotated[int, typer.Option(help="Geneformer: cells per eval set (seeded subsample) scored by "
                                                         "masked rank prediction; 0 scores every cell.")] = 500,
        seed: Annotated[int, typer.Option(help="Seed of splits and subsamples.")] = 0,
        accelerator: Annotated[str, typer.Option(help="Where the models run: cpu, gpu or auto (CUDA when present).")] = "cpu",
        device: Annotated[Optional[str], typer.Option(hidden=True, help="Old spelling of --accelerator.")] = None,
    ):
        """Every model on every eval set: reconstruction accuracy (LDVAE), rank prediction (Geneformer), kNN,
        few-shot, rank fidelity."""
        from atlasmix.errors import AtlasmixError
        from atlasmix.training.defaults import torch_device_name
        from atlasmix.evaluation.evalsets import load_eval_sets
        from atlasmix.evaluation.run import evaluate
        from atlasmix.store import Store

        # "--models A B C": click keeps only A for the option; B and C arrive as extra arguments
        model_dirs = list(models or []) + [Path(a) for a in ctx.args]
        if ctx.args and not models:
            raise AtlasmixError(f"unexpected arguments {ctx.args}")
        st = Store(store) if store else None
        sets = load_eval_sets(eval_sets, store=st, cell_type_column=cell_type_column, organism=organism)
        if not model_dirs and not pca:
            raise AtlasmixError("nothing to evaluate: give --models or keep --pca")
        seeds = tuple(range(few_shot_seeds))
        doc = evaluate(model_dirs, sets, out, store=st, pca_baseline=pca, batch_size=batch_size, n_hvg=n_hvg,
                       few_shot_fractions=_floats(few_shot_fractions) if seeds else (), few_shot_seeds=seeds,
                       sample_z=sample_z, max_rank_cells=max_rank_cells or None, seed=seed, device=torch_device_name(accelerator, device),
                       log=lambda s: typer.echo(s, err=True))
        typer.echo(f"evaluated {len(doc['models'])} model(s) (+ PCA baseline)" if pca else
                   f"evaluated {len(doc['models'])} model(s)", err=True)
        typer.echo(f"wrote {out}/results.parquet, results.csv, per_cell.parquet, per_cell.csv, few_shot.csv", err=True)

    @ev.command("report")
    def report_cmd(
        results: Annotated[Path, typer.Argument(help="Directory written by 'atlasmix eval run'.")],
        out: Annotated[Path, typer.Option("--out", help="HTML file; PNGs are written beside it.")] = Path("report.html"),
        title: Annotated[str, typer.Option(help="Page title.")] = "atlasmix evaluation",
    ):
        """HTML report: reconstruction heatmap (mixtures x eval sets), per-cell distributions, few-shot curves."""
        from atlasmix.evaluation.report import render_report

        r = render_report(results, out, title=title)
        typer.echo(f"wrote {r['html']} and {len(r['figures'])} figures", err=True)
