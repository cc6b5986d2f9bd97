"""A study's manifests: one per (mixture, seed) and per (scaling strategy, fraction, seed), reused
while the spec and the store are unchanged."""

from __future__ import annotations

import json
from pathlib import Path

from atlasmix.mixing import resolve, write_manifest
from atlasmix.mixing.spec import MixtureSpec
from atlasmix.study.keys import safe_name


def scaled_spec(spec, fraction: float, strategy: str, balance_by: str):
    """A mixture spec whose every component keeps ``fraction`` of its cells, drawn by ``strategy``.

    Components with a ``fraction`` get it multiplied, with ``n_cells`` get ``round(n_cells x
    fraction)`` (at least 1), without a size get ``fraction``; a spec-level ``n_cells`` (weighted
    components) is scaled the same way. ``balanced`` balances by ``balance_by``; ``geometric_sketch``
    uses the sketch defaults unless the component set its own.

    Returns
    -------
    atlasmix.mixing.MixtureSpec
        Named ``<name>.<strategy>.f<fraction>`` (e.g. ``base_full.balanced.f0.25``).
    """
    d = spec.model_dump()
    for c in d["components"]:
        if c.get("weight") is None:
            if c.get("n_cells") is not None:
                c["n_cells"] = max(1, int(round(c["n_cells"] * fraction)))
            else:
                c["fraction"] = (c.get("fraction") or 1.0) * fraction
        c["strategy"] = strategy
        c["balance_by"] = balance_by if strategy == "balanced" else None
        if strategy != "geometric_sketch":
            c["sketch"] = None
        if fraction < 1:
            c["take_all_if_short"] = True
    if d.get("n_cells") is not None:
        d["n_cells"] = max(1, int(round(d["n_cells"] * fraction)))
    d["name"] = f"{spec.name}.{strategy}.f{fraction:g}"
    return MixtureSpec.model_validate(d)


def resolve_cached(spec, base_dir: Path, store, path: Path) -> Path:
    """``path``: the manifest of ``spec`` on ``store``, resolved again only when the spec or the store
    changed since it was written (key in ``<path stem>.key.json``: spec hash, store state hash)."""
    key = {"spec_hash": spec.spec_hash(), "state": store.identity()["state_hash"]}
    marker = path.with_suffix(".key.json")
    if path.is_file() and marker.is_file() and json.loads(marker.read_text()) == key:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(resolve(spec, store, base_dir=base_dir), path, overwrite=True)
    marker.write_text(json.dumps(key))
    return path


def resolve_manifests(spec, specs: dict, mix_dir: Path, store, out: Path) -> dict[tuple, Path]:
    """Every manifest of a study, resolved once (:func:`resolve_cached`) into ``out/manifests/``.

    Parameters
    ----------
    spec : atlasmix.study.spec.StudySpec
    specs : dict
        Mixture name -> its :class:`atlasmix.mixing.MixtureSpec`.
    mix_dir : path
        Folder the mixture specs' relative paths are resolved against.
    store : atlasmix.store.Store
    out : path
        The study folder.

    Returns
    -------
    dict
        ``(mixture, seed, fraction, strategy)`` -> manifest path: one per (mixture, seed) with
        fraction and strategy None (the seed replaces the spec's seed), and with ``[scaling]`` one per
        (strategy, fraction, seed) of the scaled base (:func:`scaled_spec`).
    """
    manifests: dict[tuple, Path] = {}
    for n, ms in specs.items():
        for s in spec.seeds:
            manifests[(ms.name, s, None, None)] = resolve_cached(
                ms.model_copy(update={"seed": s}), mix_dir, store, out / "manifests" / f"{safe_name(n)}__s{s}.parquet")
    if spec.scaling is not None:
        sc = spec.scaling
        base = specs[sc.base]
        for st in sc.strategies:
            for f in sc.fractions:
                for s in sc.seeds or spec.seeds:
                    sp_ = scaled_spec(base, f, st, sc.balance_by).model_copy(update={"seed": s})
                    manifests[(sp_.name, s, f, st)] = resolve_cached(
                        sp_, mix_dir, store, out / "manifests" / f"{safe_name(sp_.name)}__s{s}.parquet")
    return manifests
