"""The simulated genes: which genes of the human table, and their base means and BCV draws.

See :mod:`atlasmix.simulate.model` ("Gene base means") for the model.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from atlasmix.errors import AtlasmixError
from atlasmix.simulate.programmes import HOUSEKEEPING, MITO_WEIGHTS, all_markers
from atlasmix.simulate.seeding import substream

MEAN_SHAPE, MEAN_RATE = 0.6, 0.3
OUT_PROB, OUT_LOC, OUT_SCALE = 0.05, 4.0, 0.5
BCV_DF = 60.0
MIN_GENES = 500
_RIBO_RE = re.compile(r"^RP[LS]\d+[AX]?$")


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
    # here, not at the top: the atlasmix.store package imports tiledbsoma (~0.5 s), which the
    # simulator does not need
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
    rng = substream(seed, "gene-subset")
    prio = rng.random(n_full)  # random order within tiers
    tier = np.where(forced, 0, np.where(is_pc, 1, np.where(biotype == "lncRNA", 2, 3)))
    order = np.lexsort((prio, tier))
    chosen = np.sort(order[:n_genes])  # keep the gene-table (genomic) order
    # gene-level draws over the whole table, so they do not depend on n_genes
    rng = substream(seed, "gene-means")
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

