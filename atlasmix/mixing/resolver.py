"""Resolve a mixture spec against a store: queries -> exact, seeded cell sets.

:func:`resolve` runs the stages of a resolution, one module each:

1. :mod:`atlasmix.mixing.obs_context` -- the obs columns the specs name, read once into a sandboxed
   duckdb connection (the tables a query can use are listed there);
2. :mod:`atlasmix.mixing.exclusions` -- the tree of the spec and the specs and manifests it excludes;
3. :mod:`atlasmix.mixing.draws` -- the seeded draws of every eval set and component (the order of
   resolution is described there);
4. :mod:`atlasmix.mixing.manifest_table` -- the manifest table (checked: no training cell in an
   eval set), its composition and its copies report, returned as a :class:`Resolution` that
   :func:`atlasmix.mixing.manifest.write_manifest` writes.
"""

from __future__ import annotations

from pathlib import Path

from atlasmix.errors import AtlasmixError
from atlasmix.mixing.draws import Drawer
from atlasmix.mixing.exclusions import all_nodes, build_tree, selections
from atlasmix.mixing.manifest_table import Resolution, composition_table, copies_report, manifest_table
from atlasmix.mixing.obs_context import ObsContext
from atlasmix.mixing.spec import MixtureSpec, load_spec
from atlasmix.store import Store


def resolve(spec: MixtureSpec | str | Path, store=None, *, obs: ObsContext | None = None,
            base_dir: str | Path | None = None) -> Resolution:
    """Resolve a mixture spec to exact cell sets.

    Parameters
    ----------
    spec : MixtureSpec or path
        A validated spec, or the path of a TOML spec file.
    store : atlasmix.store.Store or str, optional
        The store (or its URI). Only obs columns named by the spec (plus ``dataset_id`` and
        ``cell_type`` for the composition report) are read; X is read only by ``geometric_sketch``.
    obs : ObsContext, optional
        Instead of ``store``: a prepared context over an arrow obs table (benchmarks, tests).
    base_dir : path, optional
        Directory that relative ``exclude`` paths are resolved against (default: the spec file's
        directory, or the working directory for an in-memory spec).

    Returns
    -------
    Resolution

    Raises
    ------
    SpecError
        Invalid spec, missing or circular exclusions.
    AtlasmixError
        Refused or failing SQL, a quota a component cannot fill (without ``take_all_if_short``), a
        total that does not add up, an excluded manifest from another store, or a store that changed
        while resolving.
    """
    path = None
    if not isinstance(spec, MixtureSpec):
        path = Path(spec)
        spec = load_spec(path)
    bdir = Path(base_dir) if base_dir is not None else (path.parent if path is not None else Path.cwd())
    root = build_tree(spec, path, bdir.resolve(), (path.resolve(),) if path else ())
    nodes = all_nodes(root)
    own_ctx = obs is None
    if obs is None:
        if store is None:
            raise AtlasmixError("resolve needs a store")
        store = store if isinstance(store, Store) else Store(str(store))
        texts = [sel.query_text for n in nodes for _, sel in selections(n.spec)]
        cols = [c for n in nodes for _, sel in selections(n.spec) for c in sel.balance_columns]
        obs = ObsContext.from_store(store, texts, cols)
    try:
        res = Drawer(obs, root).resolve(root)
        table, disjoint, counts, rows = manifest_table(res.components, res.eval_sets)
        composition = composition_table(obs, rows)
        if obs.store is not None:
            cp = copies_report(obs.store, rows)
            disjoint["copies"] = cp["copies"]
            if cp["warning"]:
                disjoint["statement"] += " " + cp["warning"]
        if own_ctx and obs.store is not None:
            now = obs.store.identity()
            if now["state_hash"] != obs.identity["state_hash"]:
                raise AtlasmixError("the store changed while resolving (an ingest finished); resolve again")
    finally:
        if own_ctx:
            obs.close()
    return Resolution(spec=spec, spec_path=str(path) if path else None, spec_hash=res.spec_hash, table=table,
                      components=res.component_reports,
                      eval_sets=[res.eval_reports[k] for k in sorted(res.eval_reports)],
                      excluded=res.excluded_reports, composition=composition, disjointness=disjoint,
                      store=dict(obs.identity), counts=counts)


__all__ = ["ObsContext", "Resolution", "resolve"]
