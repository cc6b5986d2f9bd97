"""The generative model: gene space, expression tables per (cell group, donor), and cell blocks.

Model (after Splatter, Zappia, Phipson & Oshlack 2017, Genome Biology 18:174)
-----------------------------------------------------------------------------
* **Gene base means** ``lambda_g ~ Gamma(shape=0.6, rate=0.3)`` (Splatter ``mean.shape``/``mean.rate``);
  with probability 0.05 a gene is an expression outlier, ``median(lambda) * LN(4, 0.5)``
  (``out.prob``/``out.facLoc``/``out.facScale``). Ribosomal-protein and housekeeping genes get
  high means and marker genes a low background mean; non-coding genes (only when ``n_genes``
  exceeds the protein-coding genes) are scaled by 0.2.
* **Cell groups**: a cell type (or tumour clone, perturbation, TF state) multiplies ``lambda`` by
  the DE factors of every programme on its path (:mod:`atlasmix.simulate.programmes`).
* **Batch**: per source a per-gene factor ``LN(0, batch_scale)`` and per donor ``LN(0, donor_scale)``.
* **Library size** ``L_c ~ LN(log(library_median * lib_factor), library_sdlog)`` UMIs;
  a fraction ``f_c`` (logit-normal around ``mito_fraction``) goes to the 13 ``MT-`` genes
  (Poisson total, multinomial split), the rest to nuclear genes.
* **Counts** ``X_cg ~ NB(mean mu_cg = L_c * p_kg, size r_cg)`` (gamma-Poisson) with ``p_kg`` the
  group's normalised proportions and Splatter's trended biological coefficient of variation
  ``BCV = (0.1 + 1/sqrt(mu_ref)) * sqrt(60 / chi2_60)`` evaluated at the group's reference mean
  ``mu_ref`` (library ``L_ref``). The NB size scales with the cell's library,
  ``r_cg = L_c / L_ref * r_kg``: this keeps the sampler linear in ``L_c`` (see
  :mod:`atlasmix.simulate._kernels`), so larger cells are slightly less over-dispersed.
* **Dropout** (optional): Splatter's logistic, drop probability
  ``1 / (1 + exp(-shape * (log(mu) - mid)))`` applied to each drawn non-zero count.
"""

from __future__ import annotations

import functools
import re
import zlib
import dataclasses
from dataclasses import dataclass

import numba
import numpy as np
import pandas as pd

from atlasmix.errors import AtlasmixError
from atlasmix.simulate import _kernels
from atlasmix.simulate.programmes import (HOUSEKEEPING, MITO_WEIGHTS, PROGRAMMES, TF_FATES, Programme,
                                          all_markers, lineage)
from atlasmix.simulate.sources import SourceSpec

#: Cells per RNG block. Fixed so that output never depends on the caller's chunk size.
BLOCK = 4096

MEAN_SHAPE, MEAN_RATE = 0.6, 0.3
OUT_PROB, OUT_LOC, OUT_SCALE = 0.05, 4.0, 0.5
BCV_COMMON, BCV_DF = 0.1, 60.0
MIN_GENES = 500
_RIBO_RE = re.compile(r"^RP[LS]\d+[AX]?$")


def _key(*parts: object) -> int:
    """A stable 32-bit key of strings/ints (crc32), for seeding."""
    return zlib.crc32("\x1f".join(map(str, parts)).encode())


def _rng(seed: int, *parts: object) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, _key(*parts)]))


@dataclass(frozen=True)
class GeneSpace:
    """The simulated genes (``var``) and their gene-level parameters.

    Attributes
    ----------
    var : pandas.DataFrame
        Index ``feature_id`` (Ensembl id), column ``feature_name`` (symbol); gene-table order.
    full_pos : ndarray of int64, shape (G,)
        Position of each gene in the full reference table (keys gene-level random draws).
    n_full : int
        Number of genes in the full reference table.
    base_mean : ndarray of float64, shape (G,)
        Splatter base mean ``lambda_g`` (arbitrary units; only proportions matter).
    bcv_chi : ndarray of float64, shape (G,)
        Per-gene ``60 / chi2_60`` factor of the squared BCV.
    mito_idx : ndarray of int64, shape (13,)
        Positions of the ``MT-`` protein-coding genes, in :data:`MITO_WEIGHTS` order.
    """

    var: pd.DataFrame
    full_pos: np.ndarray
    n_full: int
    base_mean: np.ndarray
    bcv_chi: np.ndarray
    mito_idx: np.ndarray

    @property
    def n_genes(self) -> int:
        return len(self.var)

    @functools.cached_property
    def symbol_pos(self) -> dict[str, int]:
        """Symbol -> position (first occurrence)."""
        out: dict[str, int] = {}
        for i, s in enumerate(self.var["feature_name"].to_numpy()):
            out.setdefault(s, i)
        return out


@functools.lru_cache(maxsize=8)
def gene_space(n_genes: int | None, seed: int) -> GeneSpace:
    """Choose the simulated genes and draw their gene-level parameters.

    Parameters
    ----------
    n_genes : int or None
        Number of genes; ``None`` = every protein-coding gene of the human table (19,907 in
        GENCODE v44). Always contains the 13 ``MT-`` protein-coding genes and every marker/TF.
        Above the protein-coding count, lncRNA and then other genes are added.
    seed : int
        Random seed (the gene subset and the base means depend on it).

    Raises
    ------
    AtlasmixError
        ``n_genes`` below 500 or above the size of the gene table.
    """
    from atlasmix.store.genes import gene_table

    table = gene_table("human").genes
    names = table["feature_name"].astype(str)
    biotype = table["feature_biotype"].astype(str).to_numpy()
    n_full = len(table)
    is_pc = biotype == "protein_coding"
    mito = names.str.startswith("MT-").to_numpy() & is_pc
    n_pc = int(is_pc.sum())
    if n_genes is None:
        n_genes = n_pc
    if not MIN_GENES <= n_genes <= n_full:
        raise AtlasmixError(f"n_genes must be between {MIN_GENES} and {n_full}, got {n_genes}")
    # forced genes: MT, markers/TFs, housekeeping, ribosomal proteins
    forced_syms = set(all_markers()) | set(MITO_WEIGHTS)
    ribo = names.str.match(_RIBO_RE.pattern).to_numpy() & is_pc
    forced = (names.isin(forced_syms).to_numpy() & is_pc) | ribo | mito
    # first occurrence only for duplicated symbols
    forced &= ~names.duplicated().to_numpy()
    rng = _rng(seed, "gene-subset")
    prio = rng.random(n_full)  # random order within tiers
    tier = np.where(forced, 0, np.where(is_pc, 1, np.where(biotype == "lncRNA", 2, 3)))
    order = np.lexsort((prio, tier))
    chosen = np.sort(order[:n_genes])  # keep the gene-table (genomic) order
    # gene-level draws over the whole table, so they do not depend on n_genes
    rng = _rng(seed, "gene-means")
    lam = rng.gamma(MEAN_SHAPE, 1.0 / MEAN_RATE, n_full)
    outlier = rng.random(n_full) < OUT_PROB
    out_fac = rng.lognormal(OUT_LOC, OUT_SCALE, n_full)
    med = np.median(lam)
    lam = np.where(outlier, med * out_fac, lam)
    lam = np.where(is_pc, lam, 0.2 * lam)
    hk = names.isin(HOUSEKEEPING).to_numpy()
    lam = np.where(ribo, rng.lognormal(np.log(400.0), 0.5, n_full), lam)
    lam = np.where(hk, rng.lognormal(np.log(1500.0), 0.4, n_full), lam)
    markers = names.isin(all_markers()).to_numpy() & is_pc & ~hk
    lam = np.where(markers, rng.lognormal(np.log(0.3), 0.5, n_full), lam)
    lam = np.where(mito, 0.0, lam)  # mito counts are drawn separately
    chi = BCV_DF / rng.chisquare(BCV_DF, n_full)
    var = pd.DataFrame({"feature_name": names.to_numpy()[chosen]},
                       index=pd.Index(table.index.to_numpy()[chosen].astype(str), name="feature_id"))
    sym = var["feature_name"].to_numpy()
    pos = {s: i for i, s in reversed(list(enumerate(sym)))}
    mito_idx = np.array([pos[m] for m in MITO_WEIGHTS], dtype=np.int64)
    return GeneSpace(var, chosen.astype(np.int64), n_full, lam[chosen], chi[chosen], mito_idx)


def _programme_factors(seed: int, prog: Programme, space: GeneSpace) -> np.ndarray:
    """Multiplicative DE factors of one programme over the gene space (shape (G,), float64)."""
    rng = _rng(seed, "programme", prog.name)
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


def _gene_lognormal(seed: int, scale: float, space: GeneSpace, *key: object) -> np.ndarray:
    rng = _rng(seed, *key)
    return rng.lognormal(0.0, scale, space.n_full)[space.full_pos] if scale > 0 else np.ones(space.n_genes)


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
        rng = _rng(seed, spec.name, "targets")
        base_prof = space.base_mean.copy()
        for p in path(base):
            base_prof *= _programme_factors(seed, PROGRAMMES[p], space)
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
    rng = _rng(seed, spec.name, "tfs")
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
    rng = _rng(seed, spec.name, "donors")
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
            cache[prog.name] = _programme_factors(seed, prog, space)
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


@dataclass
class Block:
    """Generated cells: CSR rows plus per-cell obs codes."""

    indptr: np.ndarray  # int64 (n+1,)
    indices: np.ndarray  # int32 (nnz,)
    data: np.ndarray  # float32 (nnz,)
    group: np.ndarray  # int32 (n,)
    donor: np.ndarray  # int32 (n,)
    cell_index: np.ndarray  # int64 (n,) index of the cell within its source

    @property
    def n(self) -> int:
        return len(self.group)


class RowBuffer:
    """A growable CSR row buffer that blocks are sampled into in place.

    Re-using one buffer (and one scratch space) for a whole source avoids allocating fresh memory
    per block, whose page faults cost as much as the sampling itself on small VMs.
    """

    def __init__(self, capacity: int = 1 << 20):
        self.indices = np.empty(capacity, np.int32)
        self.data = np.empty(capacity, np.float32)
        self.nnz = 0
        self.indptr: list[np.ndarray] = []  # per block: row ends (absolute positions), int64
        self.meta: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.n = 0

    def reserve(self, extra: int) -> None:
        """Make room for ``extra`` more non-zeros."""
        need = self.nnz + extra
        if need > len(self.indices):
            cap = max(need, int(len(self.indices) * 1.5))
            for name in ("indices", "data"):
                old = getattr(self, name)
                new = np.empty(cap, old.dtype)
                new[: self.nnz] = old[: self.nnz]
                setattr(self, name, new)

    def take(self, k: int, copy: bool) -> Block:
        """The first ``k`` rows (views unless ``copy``); call :meth:`drop` before adding more rows."""
        ends = np.concatenate(self.indptr) if len(self.indptr) != 1 else self.indptr[0]
        group, donor, cells = (np.concatenate(x) for x in zip(*self.meta))
        indptr = np.concatenate([[0], ends[:k]]).astype(np.int64)
        nz = int(indptr[-1])
        ind, dat = self.indices[:nz], self.data[:nz]
        if copy:
            ind, dat = ind.copy(), dat.copy()
        return Block(indptr, ind, dat, group[:k], donor[:k], cells[:k])

    def drop(self, k: int) -> None:
        """Remove the first ``k`` rows, moving the rest to the front."""
        ends = np.concatenate(self.indptr)
        group, donor, cells = (np.concatenate(x) for x in zip(*self.meta))
        cut = int(ends[k - 1]) if k > 0 else 0
        rest = self.nnz - cut
        if rest:
            self.indices[:rest] = self.indices[cut:self.nnz].copy()
            self.data[:rest] = self.data[cut:self.nnz].copy()
        self.nnz = rest
        self.n -= k
        self.indptr = [ends[k:] - cut] if self.n else []
        self.meta = [(group[k:], donor[k:], cells[k:])] if self.n else []


def generate_block(src: CompiledSource, b: int, n_cells: int, into: RowBuffer | None = None) -> Block | None:
    """Generate block ``b`` (cells ``b*BLOCK`` up to ``min((b+1)*BLOCK, n_cells)``) of a source.

    The block's random stream is seeded by (run seed, source name, b), so the block's cells are
    identical whatever the chunk size used to write them, and cell ``i`` of a source does not depend
    on the source's total cell count either (a smaller run is a prefix of a larger one).

    Parameters
    ----------
    src : CompiledSource
    b : int
        Block index.
    n_cells : int
        Cells in the source.
    into : RowBuffer or None
        Append the rows to this buffer (returns None); by default return a new :class:`Block`.
    """
    a = b * BLOCK
    n = min(BLOCK, n_cells - a)
    spec = src.spec
    rng = _rng(src.seed, spec.name, "block", b)
    D = len(src.donors)
    gw = np.array([g.weight for g in src.groups])
    # every draw is made for a full block and cut to the first n cells afterwards, so that a cell
    # does not depend on n_cells (a short run is a prefix of a long one)
    B = BLOCK
    donor = rng.choice(D, B, p=src.donor_weights).astype(np.int32)
    group = rng.choice(len(gw), B, p=gw / gw.sum()).astype(np.int32)
    table = group.astype(np.int64) * D + donor
    libf = np.array([g.lib_factor for g in src.groups])[group]
    lib = np.exp(rng.normal(np.log(spec.library_median * libf), spec.library_sdlog))
    lib = np.clip(lib, 100.0, 500_000.0)
    logit = np.log(spec.mito_fraction / (1 - spec.mito_fraction)) + rng.normal(0.0, spec.mito_sdlogit, B)
    frac = 1.0 / (1.0 + np.exp(-logit))
    n_mito = rng.poisson(frac * lib)
    lib_nuc = lib * (1.0 - frac)
    n_clusters = rng.poisson(lib_nuc * src.rate[table]).astype(np.int64)
    mito_counts = rng.multinomial(n_mito, src.mito_p).astype(np.int64)
    seeds = rng.integers(0, np.iinfo(np.int64).max, B, dtype=np.int64).astype(np.uint64)
    donor, group, table, lib_nuc, n_clusters = donor[:n], group[:n], table[:n], lib_nuc[:n], n_clusters[:n]
    mito_counts, seeds = mito_counts[:n], seeds[:n]
    bound = int(n_clusters.sum()) + n * len(src.mito_p)
    if src.work_idx is None or len(src.work_idx) < bound:
        src.work_idx = np.empty(int(bound * 1.3), np.int32)
        src.work_val = np.empty(int(bound * 1.3), np.float32)
    buf = into if into is not None else RowBuffer(bound)
    buf.reserve(bound)
    drop = spec.dropout_mid is not None
    indptr = _kernels.sample_cells(
        table, n_clusters, lib_nuc, mito_counts, src.space.mito_idx, seeds, src.alias, src.lsr, src.pmean,
        drop, float(spec.dropout_mid or 0.0), float(spec.dropout_shape), numba.get_num_threads(),
        src.work_idx, src.work_val, buf.indices, buf.data, buf.nnz)
    buf.indptr.append(indptr[1:] + buf.nnz)
    buf.meta.append((group, donor, np.arange(a, a + n, dtype=np.int64)))
    buf.nnz += int(indptr[-1])
    buf.n += n
    if into is None:
        return buf.take(n, copy=False)
    return None


def barcodes(code: int, cell_index: np.ndarray) -> np.ndarray:
    """10x-style barcodes ``ACGT...(16)-1`` for cells of source ``code``; unique within a run.

    A bijective 32-bit hash (lowbias32) of ``code << 26 | cell_index`` is spelled in 16 bases, so
    barcodes are unique for up to 64 sources of up to 2**26 cells each.
    """
    x = ((np.uint64(code) << np.uint64(26)) | cell_index.astype(np.uint64)).astype(np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    shifts = np.arange(30, -1, -2, dtype=np.uint32)
    codes = ((x[:, None] >> shifts[None, :]) & np.uint32(3)).astype(np.uint8)
    letters = np.frombuffer(b"ACGT", np.uint8)[codes]
    return np.char.add(letters.view("S16").ravel().astype(str), "-1")


def build_obs(src: CompiledSource, group: np.ndarray, donor: np.ndarray, cell_index: np.ndarray) -> pd.DataFrame:
    """CELLxGENE-style obs for cells given by group/donor codes (index: barcodes).

    Columns: ``dataset_id, assay, organism, tissue, tissue_general, cell_type, disease,
    is_malignant (bool), perturbation, development_stage, donor_id`` -- all categorical except
    ``is_malignant``.
    """
    spec = src.spec
    n = len(group)

    def const(v: str) -> pd.Categorical:
        return pd.Categorical.from_codes(np.zeros(n, np.int8), [v])

    def coded(values: list[str], codes: np.ndarray) -> pd.Categorical:
        cats = list(dict.fromkeys(values))
        remap = np.array([cats.index(v) for v in values], dtype=np.int32)
        return pd.Categorical.from_codes(remap[codes], cats)

    obs = pd.DataFrame({
        "dataset_id": const(spec.name),
        "assay": const(spec.assay),
        "organism": const("Homo sapiens"),
        "tissue": const(spec.tissue),
        "tissue_general": const(spec.tissue_general),
        "cell_type": coded([g.cell_type for g in src.groups], group),
        "disease": const(spec.disease),
        "is_malignant": np.array([g.is_malignant for g in src.groups], dtype=bool)[group],
        "perturbation": coded([g.perturbation for g in src.groups], group),
        "development_stage": coded(src.donor_stage, donor),
        "donor_id": coded(src.donors, donor),
    }, index=pd.Index(barcodes(src.code, cell_index), name="barcode"))
    return obs
