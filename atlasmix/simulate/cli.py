"""The ``atlasmix simulate`` command (registered on the main typer app by :func:`register`)."""

from __future__ import annotations

from pathlib import Path

import typer

from atlasmix.errors import AtlasmixError


def _parse_int(text: str, what: str) -> int:
    try:
        return int(text.replace("_", "").replace(",", ""))
    except ValueError:
        raise AtlasmixError(f"{what} must be an integer, got {text!r}") from None


def register(app: typer.Typer) -> None:
    """Add the ``simulate`` command to ``app``.

    Bad arguments raise :class:`atlasmix.errors.AtlasmixError` (the main CLI prints it and exits 2).
    """

    @app.command("simulate")
    def simulate(
        out_dir: Path = typer.Argument(..., help="Output directory: one file per source plus plan.toml."),
        cells: str = typer.Option("10000", "--cells", "-n",
                                  help="Total number of cells (underscores allowed: 2_000_000), "
                                       "split across sources by weight."),
        sources: str = typer.Option("", "--sources", "-s",
                                    help="Comma-separated sources, optionally weighted 'name:weight' "
                                         "(default: all of blood_a, blood_b, malignant, perturbation, "
                                         "bone_marrow, tf_atlas)."),
        seed: int = typer.Option(0, "--seed", help="Random seed; output is deterministic per seed."),
        genes: str = typer.Option("", "--genes", "-g",
                                  help="Number of genes (default: all 19,907 protein-coding genes; "
                                       "MT- and marker genes are always included; minimum 500)."),
        fmt: str = typer.Option("h5ad", "--format", "-f", help="h5ad, zarr or mex (10x)."),
        chunk_size: str = typer.Option("8192", "--chunk-size",
                                       help="Cells written per chunk (bounds memory; output does not depend on it)."),
        compression: str = typer.Option("", "--compression", help="h5ad only: gzip or lzf (default none)."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    ) -> None:
        """Simulate a realistic multi-source single-cell atlas (Splatter-style NB counts)."""
        from atlasmix.simulate import simulate_atlas

        n_cells = _parse_int(cells, "--cells")
        n_genes = _parse_int(genes, "--genes") if genes else None
        chunk = _parse_int(chunk_size, "--chunk-size")
        if n_cells < 1:
            raise AtlasmixError("--cells must be >= 1")
        if chunk < 1:
            raise AtlasmixError("--chunk-size must be >= 1")

        last: dict[str, int] = {}

        def progress(name: str, done: int, total: int) -> None:
            if quiet:
                return
            pct = 100 * done // max(total, 1)
            if last.get(name, -1) // 10 != pct // 10 or done == total:
                last[name] = pct
                typer.echo(f"  {name}: {done:,}/{total:,} cells", err=True)

        info = simulate_atlas(out_dir, n_cells, sources=sources or None, seed=seed, n_genes=n_genes,
                              chunk_size=chunk, fmt=fmt, compression=compression or None, progress=progress)
        for s in info["sources"]:
            typer.echo(f"{s['dataset_id']}\t{s['n_cells']} cells\t{s['nnz']} non-zeros\t{s['path']}")
        typer.echo(f"wrote {info['plan']} ({n_cells:,} cells x {info['n_genes']:,} genes, "
                   f"{info['seconds']:.1f} s, {info['cells_per_s']:,.0f} cells/s)")
