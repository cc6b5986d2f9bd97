"""``atlasmix mix``: resolve a mixture spec to a manifest, show one, compare two."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.markup import escape
from rich.text import Text

from atlasmix.errors import AtlasmixError

_err = Console(stderr=True)


def _out() -> Console:
    """stdout console; wide when piped so tables are not squeezed to 80 columns."""
    return Console() if sys.stdout.isatty() else Console(width=160)


def _add(t: Table, *cells) -> None:
    """Add a row; strings are shown literally (names like ``components[blood]`` are not rich markup)."""
    t.add_row(*[Text(c) if isinstance(c, str) else c for c in cells])


def _fmt(n: int) -> str:
    return f"{n:,}"


def _requested(r: dict) -> str:
    k, v = next(iter(r.items()))
    return "all" if k == "all" else f"{k} {v:,}" if isinstance(v, int) else f"{k} {v:g}"


def print_sidecar(side: dict, console: Console, by_cell_type: bool = False, store_check: dict | None = None) -> None:
    """Rich tables of a manifest sidecar: header, components, eval sets, composition."""
    st = side["store"]
    c = side["counts"]
    console.print(f"[bold]{side['name']}[/bold]  spec {side['spec_hash'][:12]}  manifest "
                  f"{side['manifest']['sha256'][:12]}  atlasmix {side['atlasmix_version']}")
    console.print(f"store {escape(str(st.get('uri', '')))} (id {st.get('store_id', '')[:8]}, state {st.get('state_hash', '')[:12]}, "
                  f"{st.get('n_cells', 0):,} cells)")
    if store_check is not None:
        if store_check["same_state"]:
            console.print("[green]store state matches: the manifest means what it meant at resolution[/green]")
        else:
            console.print("[red]the store changed since resolution[/red]")
    console.print(f"train {c['train']:,}  validation {c['validation']:,}  eval {c['eval']:,}")
    t = Table(title="components")
    for col in ("component", "strategy", "requested", "matching", "available", "cells", "train", "validation", "note"):
        t.add_column(col, justify="right" if col not in ("component", "strategy", "requested", "note") else "left")
    for r in side["components"]:
        _add(t, r["name"], r["strategy"], _requested(r["requested"]), _fmt(r["n_matching"]), _fmt(r["n_available"]),
                  _fmt(r["n_cells"]), _fmt(r["n_train"]), _fmt(r["n_validation"]),
                  "short: took all" if r.get("took_all_short") else "")
    console.print(t)
    if side["eval_sets"]:
        t = Table(title="eval sets")
        for col in ("eval set", "defined in", "strategy", "requested", "matching", "cells"):
            t.add_column(col)
        for r in side["eval_sets"]:
            _add(t, r["name"], r["defined_in"], r["strategy"], _requested(r["requested"]), _fmt(r["n_matching"]),
                      _fmt(r["n_cells"]))
        console.print(t)
    if side.get("excluded"):
        t = Table(title="excluded")
        for col in ("exclude", "kind", "cells"):
            t.add_column(col)
        for r in side["excluded"]:
            _add(t, r["exclude"], r["kind"], _fmt(r["n_cells"]))
        console.print(t)
    # composition: component x dataset (or x cell type), train / validation / eval
    key = "cell_type" if by_cell_type else "dataset_id"
    agg: dict[tuple[str, str], dict[str, int]] = {}
    for r in side["composition"]:
        k = (r["component"], r[key]) if not by_cell_type else (r["component"], f"{r['dataset_id']} / {r['cell_type']}")
        agg.setdefault(k, {"train": 0, "validation": 0, "eval": 0})[r["split"]] += r["n_cells"]
    types: dict[tuple[str, str], set] = {}
    for r in side["composition"]:
        types.setdefault((r["component"], r["dataset_id"]), set()).add(r["cell_type"])
    t = Table(title="composition (component x dataset x cell type)" if by_cell_type else "composition (component x dataset)")
    t.add_column("component")
    t.add_column("dataset / cell type" if by_cell_type else "dataset")
    for col in ("train", "validation", "eval"):
        t.add_column(col, justify="right")
    if not by_cell_type:
        t.add_column("cell types", justify="right")
    for (comp, k), v in sorted(agg.items()):
        row = [comp, k, _fmt(v["train"]), _fmt(v["validation"]), _fmt(v["eval"])]
        if not by_cell_type:
            row.append(str(len(types.get((comp, k), ()))))
        _add(t, *row)
    console.print(t)
    console.print(side["disjointness"]["statement"])


def register(app: typer.Typer) -> None:
    """Add the ``mix`` sub-commands (``resolve``, ``show``, ``diff``) to ``app``."""
    mix = typer.Typer(help="Declare training corpora as SQL mixtures and resolve them to frozen manifests.",
                      no_args_is_help=True)
    app.add_typer(mix, name="mix")

    @mix.command("resolve")
    def resolve_cmd(
        spec: Annotated[Path, typer.Argument(help="Mixture spec (TOML).")],
        store: Annotated[str, typer.Option("--store", help="Store path or URI.")],
        out: Annotated[Path, typer.Option("--out", help="Manifest to write (.parquet; sidecar .json next to it).")],
        overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing manifest.")] = False,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the manifest path.")] = False,
    ):
        """Resolve SPEC against STORE and write the manifest + sidecar (deterministic)."""
        from atlasmix.mixing.manifest import write_manifest
        from atlasmix.mixing.resolver import resolve

        res = resolve(spec, store)
        side = write_manifest(res, out, overwrite=overwrite)
        if not quiet:
            print_sidecar(side, _out())
        _err.print(f"wrote {out} ({side['manifest']['n_rows']:,} rows, sha256 {side['manifest']['sha256'][:16]}) "
                   f"and {Path(out).with_suffix('.json').name}")

    @mix.command("show")
    def show_cmd(
        manifest: Annotated[Path, typer.Argument(help="Manifest (.parquet).")],
        store: Annotated[Optional[str], typer.Option("--store", help="Check the manifest against this store's "
                                                                     "current state (exit 2 when it changed).")] = None,
        cell_types: Annotated[bool, typer.Option("--cell-types", help="Composition per dataset x cell type.")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="Print the sidecar as JSON.")] = False,
    ):
        """Print a manifest's composition table (verifies its sha256)."""
        import json

        from atlasmix.mixing.manifest import check_store, read_manifest

        _, side = read_manifest(manifest)
        chk = None
        if store is not None:
            from atlasmix.store import Store

            chk = check_store(side, Store(store))
        if as_json:
            typer.echo(json.dumps(side, indent=1))
        else:
            print_sidecar(side, _out(), by_cell_type=cell_types, store_check=chk)
        if chk is not None and not chk["same_state"]:
            raise AtlasmixError(f"{'another store' if not chk['same_store'] else 'the store changed'}: {manifest} "
                                "was resolved on a different store state; resolve the spec again")

    @mix.command("diff")
    def diff_cmd(
        a: Annotated[Path, typer.Argument(help="Manifest A (.parquet).")],
        b: Annotated[Path, typer.Argument(help="Manifest B (.parquet).")],
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    ):
        """Compare two manifests: shared cells, components, datasets, spec changes."""
        import json

        from atlasmix.mixing.manifest import diff_manifests

        d = diff_manifests(a, b)
        if as_json:
            typer.echo(json.dumps(d, indent=1))
            return
        con = _out()
        con.print(f"A = {d['a']['name']} (spec {d['a']['spec_hash'][:12]})   B = {d['b']['name']} "
                  f"(spec {d['b']['spec_hash'][:12]})   "
                  + ("same store state" if d["same_state"] else "same store, different state" if d["same_store"]
                     else "[red]different stores: joinids are not comparable[/red]"))
        t = Table(title="cells")
        for col in ("split", "A", "B", "in both", "only A", "only B"):
            t.add_column(col, justify="left" if col == "split" else "right")
        for split, v in d["cells"].items():
            _add(t, split, _fmt(v["a"]), _fmt(v["b"]), _fmt(v["both"]), _fmt(v["only_a"]), _fmt(v["only_b"]))
        con.print(t)
        for key, title in (("components", "components"), ("datasets", "datasets")):
            t = Table(title=title)
            for col in ("split", "name", "A", "B", "B - A"):
                t.add_column(col, justify="left" if col in ("split", "name") else "right")
            for r in d[key]:
                delta = r["b"] - r["a"]
                _add(t, r["split"], r["name"], _fmt(r["a"]), _fmt(r["b"]),
                     Text(f"+{delta:,}", style="green") if delta > 0 else Text(f"{delta:,}", style="red") if delta < 0
                     else "0")
            con.print(t)
        if d["spec_changes"]:
            t = Table(title="spec changes")
            for col in ("key", "A", "B"):
                t.add_column(col)
            for r in d["spec_changes"]:
                _add(t, r["key"], "" if r["a"] is None else str(r["a"]), "" if r["b"] is None else str(r["b"]))
            con.print(t)
        else:
            con.print("specs are identical")
