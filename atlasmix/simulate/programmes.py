"""Gene-expression programmes of the simulator: a cell-type hierarchy with real marker genes.

A *programme* is a multiplicative, per-gene differential-expression (DE) factor vector in the sense
of Splatter (Zappia, Phipson & Oshlack 2017, Genome Biology 18:174): each gene is DE with
probability ``de_prob``; a DE gene gets a log-normal factor ``LN(de_loc, de_scale)``, inverted with
probability ``down_prob``. On top of Splatter's random DE genes, a programme lists *marker genes*
(real HGNC symbols) that are strongly up in it, so that simulated cell types carry the markers a
human or a marker-based annotator expects (CD3E in T cells, CD14/LYZ in classical monocytes, ...).

Programmes form a tree (``parent``); a cell type's expression profile is the product of the
factors of every programme on its path from the root, so related cell types (CD4 and CD8 T cells)
share most of their programme and are closer to each other than to monocytes, as in real data.

The factors of a programme depend only on (seed, programme name) -- not on which sources are
simulated -- so a cell type shared by two sources has the same biology in both (batch effects aside).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Programme:
    """One node of the programme tree.

    Attributes
    ----------
    name : str
        Unique key; for cell-type programmes it is the CELLxGENE-style ``cell_type`` label.
    parent : str or None
        Parent programme (``None`` only for the root ``"cell"``).
    markers : tuple of str
        HGNC symbols strongly up in this programme (missing symbols are ignored).
    de_prob : float
        Probability that any other gene is DE in this programme (Splatter ``de.prob``).
    de_loc, de_scale : float
        Location and scale of the log-normal DE factor (Splatter ``de.facLoc``/``de.facScale``).
    lib_factor : float
        Multiplier of the source's median library size for cells of this type (UMIs).
    """

    name: str
    parent: str | None
    markers: tuple[str, ...] = ()
    de_prob: float = 0.04
    de_loc: float = 0.1
    de_scale: float = 0.4
    lib_factor: float = 1.0


def _p(name, parent, markers="", de_prob=0.04, de_loc=0.1, de_scale=0.4, lib_factor=1.0) -> Programme:
    return Programme(name, parent, tuple(markers.split()), de_prob, de_loc, de_scale, lib_factor)


# One row per programme: rows share their shape because this is a table of data, not repeated logic
# (`duplicates` reports it as same-shape runs; there is nothing to merge).
#: The programme tree. Leaves (and some inner nodes) are cell types used by the source presets.
PROGRAMMES: dict[str, Programme] = {p.name: p for p in [
    _p("cell", None, de_prob=0.0),
    # --- haematopoietic system -------------------------------------------------------------
    _p("haematopoietic", "cell", "PTPRC CORO1A LCP1", de_prob=0.06),
    _p("lymphoid", "haematopoietic", "", de_prob=0.03),
    _p("T lineage", "lymphoid", "CD3E CD3D CD3G CD2 CD247 LCK", de_prob=0.03),
    _p("CD4-positive, alpha-beta T cell", "T lineage", "CD4 IL7R CCR7 LEF1 TCF7", de_prob=0.02),
    _p("CD8-positive, alpha-beta T cell", "T lineage", "CD8A CD8B GZMK CCL5", de_prob=0.02),
    _p("regulatory T cell", "T lineage", "FOXP3 IL2RA CTLA4", de_prob=0.02),
    _p("natural killer cell", "lymphoid", "NKG7 GNLY KLRD1 KLRF1 GZMB PRF1 NCAM1 FCGR3A", de_prob=0.03),
    _p("B lineage", "lymphoid", "CD79A CD79B PAX5 CD19", de_prob=0.03),
    _p("B cell", "B lineage", "MS4A1 BANK1 CD22", de_prob=0.02),
    _p("plasma cell", "B lineage", "JCHAIN MZB1 XBP1 SDC1 PRDM1 TNFRSF17", de_prob=0.04, lib_factor=1.8),
    _p("pro-B cell", "B lineage", "DNTT VPREB1 IGLL1 CD34", de_prob=0.03),
    _p("myeloid", "haematopoietic", "TYROBP FCER1G LST1 AIF1", de_prob=0.03, lib_factor=1.3),
    _p("classical monocyte", "myeloid", "CD14 LYZ S100A8 S100A9 FCN1 VCAN", de_prob=0.02),
    _p("non-classical monocyte", "myeloid", "FCGR3A MS4A7 CDKN1C", de_prob=0.02),
    _p("conventional dendritic cell", "myeloid", "FCER1A CD1C CLEC10A HLA-DQA1", de_prob=0.02),
    _p("plasmacytoid dendritic cell", "myeloid", "LILRA4 CLEC4C IRF7 IL3RA TCF4", de_prob=0.03),
    _p("macrophage", "myeloid", "CD68 C1QA C1QB APOE CD163", de_prob=0.03, lib_factor=1.2),
    _p("granulocyte monocyte progenitor cell", "myeloid", "MPO ELANE AZU1 PRTN3 CTSG CD34 MKI67",
       de_prob=0.04),
    _p("hematopoietic stem cell", "haematopoietic", "CD34 CRHBP HLF AVP PROM1 MECOM", de_prob=0.04),
    _p("megakaryocyte-erythroid lineage", "haematopoietic", "GATA1 TAL1", de_prob=0.03),
    _p("megakaryocyte-erythroid progenitor cell", "megakaryocyte-erythroid lineage", "KLF1 TFRC CD34",
       de_prob=0.03),
    _p("erythroblast", "megakaryocyte-erythroid lineage", "HBB HBA1 HBA2 GYPA ALAS2 CA1", de_prob=0.04,
       lib_factor=0.8),
    _p("platelet", "megakaryocyte-erythroid lineage", "PPBP PF4 GP9 ITGA2B TUBB1", de_prob=0.05,
       lib_factor=0.5),
    # --- malignant and cell-line programmes ----------------------------------------------------
    _p("lymphoma", "cell", "MYC BCL2 BCL6 CCND1 MKI67 TOP2A", de_prob=0.03, de_scale=0.5),
    _p("K562 cell", "megakaryocyte-erythroid lineage", "HBG1 HBG2 HBZ MKI67 TOP2A MYC", de_prob=0.08,
       de_scale=0.5, lib_factor=1.0),
    # --- pluripotent stem cells and TF-induced fates ------------------------------------------
    _p("embryonic stem cell", "cell", "POU5F1 NANOG SOX2 LIN28A DPPA4 TDGF1 L1TD1", de_prob=0.08),
    _p("neuron", "cell", "STMN2 DCX ELAVL4 TUBB3 MAP2 SYP", de_prob=0.06, lib_factor=1.2),
    _p("neural progenitor cell", "cell", "PAX6 SOX1 NES HES5 FABP7", de_prob=0.05),
    _p("endodermal cell", "cell", "SOX17 FOXA2 GATA6 CXCR4 CER1", de_prob=0.05),
    _p("mesodermal cell", "cell", "TBXT MIXL1 MESP1 PDGFRA", de_prob=0.05),
    _p("endothelial cell", "cell", "PECAM1 CDH5 KDR ERG SOX18", de_prob=0.05),
    _p("myoblast", "cell", "MYOD1 MYOG DES MYF5", de_prob=0.05),
    _p("trophoblast cell", "cell", "CGA KRT7 GATA3 TFAP2A HAND1", de_prob=0.05),
]}

#: Transcription factors of the TF-atlas preset and the fate each induces in responding cells
#: (after Joung et al. 2023, Cell 186:209, a TF-ORF overexpression atlas in human ES cells).
TF_FATES: dict[str, str] = {
    "NEUROG2": "neuron", "NEUROD1": "neuron", "ASCL1": "neuron",
    "PAX6": "neural progenitor cell", "SOX1": "neural progenitor cell", "OLIG2": "neural progenitor cell",
    "SOX17": "endodermal cell", "FOXA2": "endodermal cell", "GATA4": "endodermal cell",
    "GATA6": "endodermal cell", "HNF4A": "endodermal cell", "HNF1B": "endodermal cell",
    "TBXT": "mesodermal cell", "MESP1": "mesodermal cell", "TWIST1": "mesodermal cell",
    "ETV2": "endothelial cell", "ERG": "endothelial cell",
    "MYOD1": "myoblast", "MYF5": "myoblast", "MEF2C": "myoblast",
    "CDX2": "trophoblast cell", "GATA3": "trophoblast cell", "TFAP2A": "trophoblast cell",
    "KLF4": "embryonic stem cell",  # a TF with no fate switch: responders stay ES-like
}

#: Housekeeping genes given a very high base mean (the top genes of real 10x data).
HOUSEKEEPING = ("ACTB", "GAPDH", "B2M", "TMSB4X", "FTL", "FTH1", "EEF1A1", "TPT1", "MYL6", "TMSB10")

#: Relative abundance of the 13 mitochondrially encoded protein-coding genes among mito UMIs
#: (rounded from typical 10x 3' PBMC data).
MITO_WEIGHTS: dict[str, float] = {
    "MT-CO1": 0.19, "MT-CO3": 0.13, "MT-ATP6": 0.12, "MT-CO2": 0.12, "MT-ND4": 0.09, "MT-CYB": 0.09,
    "MT-ND1": 0.06, "MT-ND2": 0.05, "MT-ND3": 0.04, "MT-ATP8": 0.03, "MT-ND5": 0.04, "MT-ND4L": 0.03,
    "MT-ND6": 0.01,
}


def lineage(name: str) -> list[str]:
    """Return the programme path from the root to ``name`` (inclusive), root first.

    Raises
    ------
    KeyError
        ``name`` is not a programme.
    """
    out = []
    cur: str | None = name
    while cur is not None:
        out.append(cur)
        cur = PROGRAMMES[cur].parent
    return out[::-1]


def all_markers() -> list[str]:
    """All marker, TF and housekeeping symbols the simulator needs in its gene space (sorted, unique)."""
    s = {m for p in PROGRAMMES.values() for m in p.markers}
    s |= set(TF_FATES) | set(HOUSEKEEPING)
    return sorted(s)

