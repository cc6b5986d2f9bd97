"""A source's sampling tables: per (cell group, donor) gene proportions, NB sizes and alias tables.

See :mod:`atlasmix.simulate.model` ("Counts") for the equations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from atlasmix.simulate import _kernels
from atlasmix.simulate.genes import GeneSpace
from atlasmix.simulate.groups import Group, design_groups, programme_factors
from atlasmix.simulate.programmes import MITO_WEIGHTS, PROGRAMMES, Programme
from atlasmix.simulate.seeding import substream
from atlasmix.simulate.sources import SourceSpec

BCV_COMMON = 0.1


def _gene_lognormal(seed: int, scale: float, space: GeneSpace, *key: object) -> np.ndarray:
    rng = substream(seed, *key)
    return rng.lognormal(0.0, scale, space.n_full)[space.full_pos] if scale > 0 else np.ones(space.n_genes)



@dataclass
class CompiledSource:
    """A source ready for sampling: cell groups and per-(group, donor) tables.

    Tables are indexed ``group * n_donors + donor``; all arrays are (T, G) unless noted.
    """

    spec: SourceSpec
    code: int
    seed: int
    space: GeneSpace
    groups: list[Group]
    donors: list[str]
    donor_weights: np.ndarray
    donor_stage: list[str]
    alias: np.ndarray  # uint64 packed alias tables over genes (cluster rates)
    lsr: np.ndarray  # float32 (T, G, 2) logarithmic-series records of cluster sizes
    pmean: np.ndarray  # expected proportions
    rate: np.ndarray  # (T,) expected clusters per nuclear UMI
    mito_p: np.ndarray  # (13,)
    work_idx: np.ndarray | None = None  # kernel scratch space, grown on demand
    work_val: np.ndarray | None = None


def compile_source(spec: SourceSpec, space: GeneSpace, seed: int, code: int) -> CompiledSource:
    """Build the sampling tables of one source (memory ~36 bytes x genes x groups x donors).

    Parameters
    ----------
    spec : SourceSpec
        The source.
    space : GeneSpace
        Simulated genes.
    seed : int
        Run seed.
    code : int
        Index of the source in the run (0-63); makes barcodes unique across the run.
    """
    spec.validate()
    groups = design_groups(spec, space, seed)
    donors = spec.donors()
    D = len(donors)
    rng = substream(seed, spec.name, "donors")
    donor_w = rng.dirichlet(np.full(D, 5.0)) if D > 1 else np.ones(1)
    if spec.development_stage is None:
        lo, hi = spec.donor_age_range
        ages = rng.integers(lo, hi + 1, D)
        stages = [f"{a}-year-old human stage" for a in ages]
    else:
        stages = [spec.development_stage] * D
    G = space.n_genes
    T = len(groups) * D
    alias = np.empty((T, G), np.uint64)
    lsr = np.empty((T, G, 2), np.float32)
    pmean = np.empty((T, G))
    rate = np.empty(T)
    batch = _gene_lognormal(seed, spec.batch_scale, space, spec.name, "batch")
    cache: dict[str, np.ndarray] = {}

    def factors(p) -> np.ndarray:
        prog = PROGRAMMES[p] if isinstance(p, str) else p
        if prog.name not in cache:
            cache[prog.name] = programme_factors(seed, prog, space)
        return cache[prog.name]

    for d, donor in enumerate(donors):
        dfac = _gene_lognormal(seed, spec.donor_scale, space, spec.name, "donor", donor)
        for k, grp in enumerate(groups):
            w = space.base_mean * batch * dfac
            for p in grp.programmes:
                if isinstance(p, Programme) and "{donor}" in p.name:
                    p = Programme(p.name.replace("{donor}", donor), p.parent, p.markers, p.de_prob,
                                  p.de_loc, p.de_scale)
                w = w * factors(p)
            for i, f in grp.overrides.items():
                w[i] *= f
            for i, lv in grp.levels.items():
                w[i] = lv * batch[i] * dfac[i]
            w[space.mito_idx] = 0.0
            p = w / w.sum()
            l_ref = spec.library_median * grp.lib_factor * (1.0 - spec.mito_fraction)
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                mu = p * l_ref
                bcv = (BCV_COMMON + 1.0 / np.sqrt(mu)) * np.sqrt(space.bcv_chi)
                s = 1.0 / (bcv * bcv) / l_ref  # NB size per UMI of library
                rho = np.where(p > 0, s * np.log1p(p / s), 0.0)
                qq = np.where(p > 0, p / (p + s), 0.0)
            t = k * D + d
            rate[t] = rho.sum()
            alias[t] = _kernels.build_alias(rho)
            lsr[t] = _kernels.logseries_records(qq)
            pmean[t] = p
    mito_p = np.array(list(MITO_WEIGHTS.values()))
    return CompiledSource(spec, code, seed, space, groups, donors, donor_w, stages, alias, lsr, pmean, rate,
                          mito_p / mito_p.sum())

