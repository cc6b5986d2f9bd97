"""The draws: the cells of every component and eval set of a spec, seeded and exact.

Order of resolution
-------------------
1. Eval sets (this spec's and those of excluded spec files) are drawn from the cells their queries
   match.
2. Excluded cells: eval cells, every cell of excluded specs (resolved recursively, exactly as they
   resolve alone) and of excluded manifests.
3. Components without ``weight`` in spec order, then weighted components in spec order. A
   component's pool is the cells its query matches minus excluded cells and cells drawn by the
   components before it (so components never share a cell). ``fraction`` is relative to that pool;
   weighted components share the total ``n_cells`` left after the others.
4. Each component's cells are split into train / validation (``validation_fraction``, seeded).

Training + validation cells are then checked to be disjoint from every eval set (an internal
assertion in :func:`atlasmix.mixing.manifest_table.manifest_table`; the result is recorded in the
manifest sidecar).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from atlasmix.errors import AtlasmixError
from atlasmix.mixing import sampling
from atlasmix.mixing.exclusions import SpecNode
from atlasmix.mixing.manifest import read_manifest_cells
from atlasmix.mixing.obs_context import ObsContext
from atlasmix.mixing.sketch import geometric_sketch, streamed_pca
from atlasmix.mixing.spec import Selection, SketchOptions, canonical_json


@dataclasses.dataclass
class Resolved:
    """The cells drawn for one spec of the exclusion tree, and its reports.

    Attributes
    ----------
    spec_hash : str
        sha256 over the canonical spec and the hashes of everything it excludes.
    components : dict
        Component name -> ``{"train": joinids, "validation": joinids}`` (sorted int64 arrays).
    component_reports : list of dict
        Per component, in spec order: requested quota, matching / available / drawn cells, splits.
    eval_sets : dict
        Eval-set name -> joinids (its own and those of excluded spec files).
    eval_reports : dict
        Eval-set name -> report.
    eval_origin : dict
        Eval-set name -> the spec file that defines it.
    excluded_reports : list of dict
        One per ``exclude`` entry.
    """

    spec_hash: str
    components: dict[str, dict[str, np.ndarray]]  # name -> {"train":, "validation":}
    component_reports: list[dict]
    eval_sets: dict[str, np.ndarray]
    eval_reports: dict[str, dict]
    eval_origin: dict[str, str]
    excluded_reports: list[dict]

    def all_cells(self) -> np.ndarray:
        """Every cell of the spec (components and eval sets; a cell may repeat across eval sets)."""
        parts = [a for d in self.components.values() for a in d.values()] + list(self.eval_sets.values())
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


class Drawer:
    """Draws the cells of every spec of an exclusion tree (the module doc gives the order).

    Parameters
    ----------
    ctx : ObsContext
        The obs every query runs on (and the store ``geometric_sketch`` streams X from).
    root : SpecNode
        The spec being resolved; errors in the specs it excludes name their file.
    """

    def __init__(self, ctx: ObsContext, root: SpecNode):
        self.ctx = ctx
        self.root = root
        self.done: dict[int, Resolved] = {}

    # ------------------------------------------------------------------ drawing
    def _labels(self, t: pa.Table, cols: list[str]) -> np.ndarray:
        codes = []
        for c in cols:
            arr = t[c].combine_chunks()
            enc = pc.dictionary_encode(arr.cast(pa.large_string()) if not pa.types.is_string(arr.type)
                                       and not pa.types.is_large_string(arr.type) else arr)
            idx = enc.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
            # rank codes by value so groups do not depend on row order
            dict_vals = enc.dictionary.to_pylist()
            rank = np.argsort(np.argsort(np.array([str(v) for v in dict_vals], dtype=object), kind="stable"))
            codes.append(np.where(idx < 0, -1, rank[np.maximum(idx, 0)] if len(rank) else -1))
        if len(codes) == 1:
            return codes[0]
        _, inv = np.unique(np.stack(codes, axis=1), axis=0, return_inverse=True)
        return inv.ravel()

    def _draw(self, sel: Selection, label: str, name: str, pool: np.ndarray, labels: np.ndarray | None,
              n: int, seed: int, purpose: str) -> np.ndarray:
        key = sampling.derive_key(seed, purpose, name)
        if n >= len(pool):
            return np.sort(pool)
        if sel.strategy == "random":
            return sampling.bottom_k(pool, n, key)
        if sel.strategy == "balanced":
            assert labels is not None
            groups, inv, sizes = np.unique(labels, return_inverse=True, return_counts=True)
            quota = sampling.balanced_quota(sizes, n, sampling.rng(seed, purpose, name, "balance"))
            keys = sampling.priority_keys(pool, key)
            order = np.lexsort((keys, inv))
            g_sorted = inv[order]
            starts = np.searchsorted(g_sorted, np.arange(len(groups)))
            rank = np.arange(len(order)) - starts[g_sorted]
            take = order[rank < quota[g_sorted]]
            return np.sort(pool[take])
        # geometric_sketch
        store = self.ctx.store
        if store is None:
            raise AtlasmixError(f"{label}.strategy: geometric_sketch needs a store to stream X from")
        opts = sel.sketch or SketchOptions()
        cells = np.sort(pool)
        var_ids = store.var().index.to_numpy(dtype=np.int64)
        scores = streamed_pca(store.iter_X, cells, var_ids, n_pcs=opts.n_pcs, n_top_genes=opts.n_top_genes,
                              chunk_size=opts.chunk_size)
        gseed = int(sampling.rng(seed, purpose, name, "geosketch").integers(0, 2**32 - 1))
        return cells[geometric_sketch(scores, n, gseed)]

    def _pool(self, sel: Selection, label: str, blocked: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None, int]:
        cols = sel.balance_columns
        if cols:
            have = set(self.ctx.columns())
            for c in cols:
                if c not in have:
                    raise AtlasmixError(f"{label}.balance_by: no column {c!r} in obs")
        t = self.ctx.query(sel, label, cols)
        ids = t["soma_joinid"].to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        n_match = len(ids)
        labels = self._labels(t, cols) if cols else None
        if blocked is not None and len(ids):
            keep = ~blocked[ids]
            ids = ids[keep]
            if labels is not None:
                labels = labels[keep]
        return ids, labels, n_match

    # ------------------------------------------------------------------ one spec
    def resolve(self, node: SpecNode) -> Resolved:
        """The cells of ``node``'s spec (each node is drawn once; excluded specs first)."""
        if id(node) in self.done:
            return self.done[id(node)]
        spec = node.spec
        ctx = self.ctx
        blocked = np.zeros(ctx.max_joinid + 1, dtype=bool)
        excluded_reports: list[dict] = []
        eval_sets: dict[str, np.ndarray] = {}
        eval_reports: dict[str, dict] = {}
        eval_origin: dict[str, str] = {}
        dep_hashes: list[Any] = []
        pre = "" if node is self.root else f"{node.where()}: "  # errors in excluded specs name their file

        # 1. eval sets: own, then those of excluded spec files
        for name, ev in spec.eval_sets.items():
            label = f"{pre}eval_sets.{name}"
            pool, labels, n_match = self._pool(ev, label, None)
            n, short = self._quota_fixed(ev, len(pool), label, name, n_match, node)
            cells = self._draw(ev, label, name, pool, labels, n, spec.seed, "eval")
            eval_sets[name] = cells
            eval_reports[name] = {"name": name, "defined_in": node.where(), "strategy": ev.strategy,
                                  "requested": _requested(ev), "n_matching": int(n_match), "n_cells": int(len(cells)),
                                  "took_all_short": short}
            eval_origin[name] = node.where()
        for i, child in node.children:
            sub = self.resolve(child)
            dep_hashes.append({"exclude": spec.exclude[i], "spec_hash": sub.spec_hash})
            cells = sub.all_cells()
            blocked[cells[cells <= ctx.max_joinid]] = True
            excluded_reports.append({"exclude": spec.exclude[i], "kind": "spec", "name": child.spec.name,
                                     "spec_hash": sub.spec_hash, "n_cells": int(len(np.unique(cells))),
                                     "eval_sets": sorted(sub.eval_sets)})
            for name, cells_e in sub.eval_sets.items():
                if name in eval_sets:
                    if not np.array_equal(eval_sets[name], cells_e):
                        raise AtlasmixError(f"{node.where()}: exclude[{i}]: eval set {name!r} of {spec.exclude[i]} "
                                            f"differs from the eval set {name!r} of {eval_origin[name]}; rename one")
                    continue
                eval_sets[name] = cells_e
                eval_reports[name] = dict(sub.eval_reports[name])
                eval_origin[name] = sub.eval_origin[name]
        for i, p in node.manifests:
            cells, info = read_manifest_cells(p, ctx.identity)
            blocked[cells[cells <= ctx.max_joinid]] = True
            dep_hashes.append({"exclude": spec.exclude[i], "manifest_sha256": info["sha256"]})
            excluded_reports.append({"exclude": spec.exclude[i], "kind": "manifest", "n_cells": int(len(np.unique(cells))),
                                     **info})
        for name, cells in eval_sets.items():
            blocked[cells] = True
        for i, name in node.inline_excludes:
            excluded_reports.append({"exclude": name, "kind": "eval_set", "n_cells": int(len(eval_sets[name]))})

        for i, c in enumerate(spec.components):
            if c.name in eval_sets:
                raise AtlasmixError(f"{pre}components[{i}].name: {c.name!r} is also the name of an eval set "
                                    f"(from {eval_origin[c.name]}); rename one")

        # 2. components: unweighted in order, then weighted
        comps = list(enumerate(spec.components))
        order = [x for x in comps if x[1].weight is None] + [x for x in comps if x[1].weight is not None]
        drawn: dict[int, np.ndarray] = {}
        reports: dict[int, dict] = {}
        fixed_total = 0
        weighted = [(i, c) for i, c in comps if c.weight is not None]
        shares: dict[int, int] = {}
        for i, c in order:
            label = f"{pre}components[{i}]"
            if c.weight is not None and not shares:
                remaining = int(spec.n_cells) - fixed_total  # type: ignore[arg-type]
                if remaining < 0:
                    raise AtlasmixError(f"{node.where()}: n_cells: the components without a weight already take "
                                        f"{fixed_total:,} cells, more than the total {spec.n_cells:,}")
                alloc = sampling.largest_remainder(remaining, np.array([w.weight for _, w in weighted]))
                shares = {j: int(a) for (j, _), a in zip(weighted, alloc)}
            pool, labels, n_match = self._pool(c, label, blocked)
            if c.weight is not None:
                n, short = self._check_short(c, shares[i], len(pool), label, c.name, n_match, node)
            else:
                n, short = self._quota_fixed(c, len(pool), label, c.name, n_match, node)
            cells = self._draw(c, label, c.name, pool, labels, n, spec.seed, "component")
            blocked[cells] = True
            drawn[i] = cells
            if c.weight is None:
                fixed_total += len(cells)
            reports[i] = {"name": c.name, "strategy": c.strategy, "requested": _requested(c),
                          "n_matching": int(n_match), "n_available": int(len(pool)), "n_quota": int(n),
                          "n_cells": int(len(cells)), "took_all_short": short}
        if spec.n_cells is not None and not weighted:
            total = sum(len(v) for v in drawn.values())
            short = any(r["took_all_short"] for r in reports.values())
            if total != spec.n_cells and not short:
                raise AtlasmixError(f"{node.where()}: n_cells: the components give {total:,} cells, not the total "
                                    f"{spec.n_cells:,}; give some components a `weight` or drop the total")

        # 3. train / validation
        components: dict[str, dict[str, np.ndarray]] = {}
        comp_reports = []
        for i, c in comps:
            cells = drawn[i]
            n_val = int(np.floor(spec.validation_fraction * len(cells) + 0.5))
            val = sampling.bottom_k(cells, n_val, sampling.derive_key(spec.seed, "validation", c.name))
            train = cells[~np.isin(cells, val, assume_unique=True)]
            components[c.name] = {"train": train, "validation": val}
            comp_reports.append(reports[i] | {"n_train": int(len(train)), "n_validation": int(len(val))})

        own = spec.canonical()
        spec_hash = hashlib.sha256(canonical_json({"spec": own, "exclude": dep_hashes}).encode()).hexdigest()
        res = Resolved(spec_hash, components, comp_reports, eval_sets, eval_reports, eval_origin, excluded_reports)
        self.done[id(node)] = res
        return res

    def _quota_fixed(self, sel: Selection, avail: int, label: str, name: str, n_match: int,
                     node: SpecNode) -> tuple[int, bool]:
        if sel.n_cells is not None:
            return self._check_short(sel, sel.n_cells, avail, label, name, n_match, node)
        if sel.fraction is not None:
            return int(np.floor(sel.fraction * avail + 0.5)), False
        return avail, False

    @staticmethod
    def _check_short(sel: Selection, n: int, avail: int, label: str, name: str, n_match: int,
                     node: SpecNode) -> tuple[int, bool]:
        """(cells to draw, whether the quota was cut to what is available)."""
        if n <= avail:
            return n, False
        if sel.take_all_if_short:
            return avail, True
        where = "" if ":" in label else f"{node.where()}: "
        why = "" if avail == n_match else f" ({n_match:,} match, {n_match - avail:,} of them are eval, excluded or " \
                                          "drawn by earlier components)"
        raise AtlasmixError(f"{where}{label} {name!r}: asks for {n:,} cells but only {avail:,} are available{why}; "
                            "lower the quota or set take_all_if_short = true")


def _requested(sel: Selection) -> dict:
    for k in ("n_cells", "fraction", "weight"):
        v = getattr(sel, k, None)
        if v is not None:
            return {k: v}
    return {"all": True}


__all__ = ["Drawer", "Resolved"]
