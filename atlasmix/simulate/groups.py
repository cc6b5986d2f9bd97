"""Cell groups of a source: the populations (cell types, clones, knockdowns, TF states) and their weights.

Each group's expression profile is the product of its programmes' DE factors
(:mod:`atlasmix.simulate.programmes`) over the gene space; see :mod:`atlasmix.simulate.model`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pandas as pd

from atlasmix.simulate.genes import GeneSpace
from atlasmix.simulate.programmes import PROGRAMMES, TF_FATES, Programme, lineage
from atlasmix.simulate.seeding import substream
from atlasmix.simulate.sources import SourceSpec


def programme_factors(seed: int, prog: Programme, space: GeneSpace) -> np.ndarray:
    """Multiplicative DE factors of one programme over the gene space (shape (G,), float64)."""
    rng = substream(seed, "programme", prog.name)
    n = space.n_full
    de = rng.random(n) < prog.de_prob
    fac = rng.lognormal(prog.de_loc, prog.de_scale, n)
    down = rng.random(n) < 0.5
    marker_target = rng.lognormal(np.log(80.0), 0.8, n)
    f = np.where(de, np.where(down, 1.0 / fac, fac), 1.0)[space.full_pos]
    target = marker_target[space.full_pos]
    for m in prog.markers:
        i = space.symbol_pos.get(m)
        if i is not None and space.base_mean[i] > 0:
            f[i] = max(f[i], target[i] / space.base_mean[i])
    return f



@dataclass
class Group:
    """A population of cells with one expression profile (before donor effects).

    ``programmes`` are names in :data:`PROGRAMMES` or ad-hoc :class:`Programme` objects (``{donor}``
    in their name is replaced per donor); ``overrides`` maps gene positions to extra factors and
    ``levels`` maps gene positions to a fixed base mean (over-expression), applied after both.
    """

    cell_type: str
    perturbation: str
    is_malignant: bool
    weight: float
    programmes: list
    overrides: dict[int, float]
    lib_factor: float = 1.0
    levels: dict[int, float] = dataclasses.field(default_factory=dict)


def design_groups(spec: SourceSpec, space: GeneSpace, seed: int) -> list[Group]:
    """Translate a source spec into cell groups with weights (summing to 1)."""

    def path(ct: str) -> list:
        return list(lineage(ct))

    def lib(ct: str) -> float:
        f = 1.0
        for p in lineage(ct):
            f *= PROGRAMMES[p].lib_factor
        return f

    groups: list[Group] = []
    normal = {k: v for k, v in spec.cell_types.items() if v > 0}
    tot = sum(normal.values())
    if spec.kind in ("healthy", "malignant"):
        share = 1.0 - (spec.malignant_fraction if spec.kind == "malignant" else 0.0)
        for ct, w in normal.items():
            groups.append(Group(ct, "none", False, share * w / tot, path(ct), {}, lib(ct)))
        if spec.kind == "malignant":
            tumour = Programme("lymphoma", "cell", PROGRAMMES["lymphoma"].markers, 0.03, 0.1, 0.5)
            clone = Programme(f"{spec.name}|clone|{{donor}}", None, (), 0.05, 0.2, 0.5)
            lin = spec.malignant_lineage
            groups.append(Group(lin, "none", True, spec.malignant_fraction, path(lin) + [tumour, clone], {},
                                lib(lin) * 1.2))
        for g in groups:
            g.weight /= sum(x.weight for x in groups)
        return groups
    base = spec.base_cell_type
    if spec.kind == "perturbation":
        rng = substream(seed, spec.name, "targets")
        base_prof = space.base_mean.copy()
        for p in path(base):
            base_prof *= programme_factors(seed, PROGRAMMES[p], space)
        # targets: expressed genes (top 30% of the base profile), not MT or ribosomal
        sym = space.var["feature_name"].to_numpy()
        named = pd.Series(sym)
        ok = ((base_prof >= np.quantile(base_prof, 0.7)) & ~named.str.match(r"^(MT-|RP[LS]\d|ENSG)").to_numpy()
              & ~named.duplicated(keep=False).to_numpy())
        cand = np.flatnonzero(ok)
        n_t = min(spec.n_targets, len(cand))
        targets = np.sort(rng.choice(cand, n_t, replace=False))
        residual = rng.beta(2.0, 10.0, n_t)  # fraction of mRNA left after CRISPRi (mean ~0.17)
        strong = rng.random(n_t) < 0.35  # targets with a downstream transcriptional phenotype
        groups.append(Group(base, "control", spec.base_is_malignant, spec.control_fraction, path(base), {},
                            lib(base)))
        w = (1.0 - spec.control_fraction) / n_t
        for t, res, st in zip(targets, residual, strong):
            progs = path(base)
            if st:
                progs = progs + [Programme(f"{spec.name}|knockdown|{sym[t]}", None, (), 0.02, 0.3, 0.4)]
            groups.append(Group(base, str(sym[t]), spec.base_is_malignant, w, progs, {int(t): float(res)},
                                lib(base)))
        return groups
    # tf_atlas
    rng = substream(seed, spec.name, "tfs")
    tfs = [t for t in TF_FATES if t in space.symbol_pos][: spec.n_targets]
    response = rng.uniform(0.3, 0.9, len(tfs))
    over = rng.lognormal(np.log(300.0), 0.3, len(tfs))
    groups.append(Group(base, "control", False, spec.control_fraction, path(base), {}, lib(base)))
    w = (1.0 - spec.control_fraction) / max(len(tfs), 1)
    for tf, resp, ov in zip(tfs, response, over):
        i = space.symbol_pos[tf]
        level = {i: float(ov)}
        groups.append(Group(base, tf, False, w * (1 - resp), path(base), {}, lib(base), dict(level)))
        fate = TF_FATES[tf]
        # responders: the fate programme on top of the ES programme, whose markers are silenced
        silence: dict[int, float] = {}
        if fate != base:
            for m in PROGRAMMES[base].markers:
                j = space.symbol_pos.get(m)
                if j is not None and j != i:
                    silence[j] = 0.03
        progs = path(base) + ([] if fate == base else path(fate)[1:])
        groups.append(Group(fate, tf, False, w * resp, progs, silence, lib(fate), dict(level)))
    return groups

