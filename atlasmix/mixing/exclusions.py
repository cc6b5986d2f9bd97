"""The exclusion tree: a spec and, recursively, the spec files and manifests it excludes.

A spec's ``exclude`` list names eval sets of the spec itself, other spec files (``.toml``, resolved
recursively, exactly as they resolve alone) and manifests (``.parquet``). :func:`build_tree` reads the
spec files once each (a spec excluded twice is one node) and refuses missing files and circular
exclusions; :mod:`atlasmix.mixing.draws` then resolves the tree bottom-up.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from atlasmix.mixing.spec import MixtureSpec, Selection, SpecError, load_spec


@dataclasses.dataclass
class SpecNode:
    """One spec of the exclusion tree.

    Attributes
    ----------
    spec : MixtureSpec
    path : pathlib.Path or None
        The spec file (None for an in-memory spec).
    base_dir : pathlib.Path
        Folder that the spec's relative ``exclude`` paths are resolved against.
    children : list of (int, SpecNode)
        Excluded spec files: (index in ``exclude``, their node).
    manifests : list of (int, pathlib.Path)
        Excluded manifests: (index in ``exclude``, resolved path).
    inline_excludes : list of (int, str)
        ``exclude`` entries naming eval sets of this spec: (index, name).
    """

    spec: MixtureSpec
    path: Path | None
    base_dir: Path
    children: list[tuple[int, "SpecNode"]]
    manifests: list[tuple[int, Path]]
    inline_excludes: list[tuple[int, str]]

    def where(self) -> str:
        """The spec's file name (or its ``name`` for an in-memory spec), for error messages."""
        return self.path.name if self.path else self.spec.name


def build_tree(spec: MixtureSpec, path: Path | None, base_dir: Path, stack: tuple[Path, ...] = (),
               cache: dict[Path, SpecNode] | None = None) -> SpecNode:
    """The exclusion tree of ``spec``.

    Parameters
    ----------
    spec : MixtureSpec
    path : pathlib.Path or None
        The spec's file, if any.
    base_dir : pathlib.Path
        Folder relative ``exclude`` paths are resolved against.
    stack : tuple of pathlib.Path
        Resolved paths of the specs excluding this one (to detect circular exclusions).
    cache : dict, optional
        Nodes already built, by resolved path (one node per spec file).

    Returns
    -------
    SpecNode

    Raises
    ------
    SpecError
        A missing spec file or manifest, a circular exclusion, or an entry that is neither an eval
        set of the spec nor a ``.toml`` / ``.parquet`` path.
    """
    cache = {} if cache is None else cache
    node = SpecNode(spec, path, base_dir, [], [], [])
    for i, item in enumerate(spec.exclude):
        label = f"exclude[{i}]"
        if item in spec.eval_sets:
            node.inline_excludes.append((i, item))
            continue
        if item.endswith(".toml"):
            p = (base_dir / item).resolve()
            if p in stack or (path is not None and p == path.resolve()):
                chain = " -> ".join(x.name for x in (*stack, p))
                raise SpecError(f"bad spec {node.where()}: {label}: circular exclusion {chain}")
            if p not in cache:
                if not p.is_file():
                    raise SpecError(f"bad spec {node.where()}: {label}: spec file not found: {p}")
                child_spec = load_spec(p)
                cache[p] = build_tree(child_spec, p, p.parent, (*stack, p), cache)
            node.children.append((i, cache[p]))
        elif item.endswith(".parquet"):
            p = (base_dir / item).resolve()
            if not p.is_file():
                raise SpecError(f"bad spec {node.where()}: {label}: manifest not found: {p}")
            node.manifests.append((i, p))
        else:
            raise SpecError(f"bad spec {node.where()}: {label}: {item!r} is neither an eval set of this spec "
                            f"({', '.join(spec.eval_sets) or 'none declared'}) nor a .toml spec or .parquet manifest")
    return node


def all_nodes(node: SpecNode, seen: set[int] | None = None) -> list[SpecNode]:
    """Every node of the tree below ``node`` (``node`` first), each once."""
    seen = set() if seen is None else seen
    if id(node) in seen:
        return []
    seen.add(id(node))
    out = [node]
    for _, c in node.children:
        out += all_nodes(c, seen)
    return out


def selections(spec: MixtureSpec) -> list[tuple[str, Selection]]:
    """The spec's eval sets and components as (label, selection): ``eval_sets.NAME``, ``components[i]``."""
    out: list[tuple[str, Selection]] = [(f"eval_sets.{k}", v) for k, v in spec.eval_sets.items()]
    out += [(f"components[{i}]", c) for i, c in enumerate(spec.components)]
    return out


__all__ = ["SpecNode", "all_nodes", "build_tree", "selections"]
