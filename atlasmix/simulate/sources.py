"""Source specifications of the simulator and the built-in presets.

A *source* is one simulated dataset (one ``<dataset_id>.h5ad``): its kind (healthy tissue,
malignant, genetic perturbation, TF atlas), cell-type composition, CELLxGENE-style constant
metadata, donors, sequencing depth, mitochondrial fraction and batch-effect strength. The presets
mirror the source mix of the scFM-datamix design: two healthy blood sources sharing cell types, a
lymphoma source, a K562 Perturb-seq-like screen, a bone marrow source with progenitors and a
TF-overexpression atlas of human ES cells.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from atlasmix.errors import AtlasmixError
from atlasmix.simulate.programmes import PROGRAMMES, TF_FATES

SourceKind = Literal["healthy", "malignant", "perturbation", "tf_atlas"]
KINDS = ("healthy", "malignant", "perturbation", "tf_atlas")


@dataclass
class SourceSpec:
    """One simulated source (dataset).

    Attributes
    ----------
    name : str
        ``dataset_id`` and file stem; letters, digits, ``_`` and ``-`` only.
    kind : {"healthy", "malignant", "perturbation", "tf_atlas"}
        ``healthy``: cells drawn from ``cell_types``. ``malignant``: a fraction ``malignant_fraction``
        of cells are tumour cells of ``malignant_lineage`` shifted by a shared tumour programme and a
        per-donor (clonal) programme (``is_malignant=True``), the rest is the normal
        microenvironment from ``cell_types``. ``perturbation``: one cell line (``base_cell_type``), each
        cell carries one CRISPRi knock-down of one of ``n_targets`` genes or is a non-targeting
        ``control``. ``tf_atlas``: ES cells (``base_cell_type``) each over-expressing one TF; a
        TF-specific fraction of cells switches to the TF's fate (``cell_type`` = fate).
    title : str
        Human-readable title (written to ``plan.toml``).
    weight : float
        Relative share of the run's cells (cells are split across sources by weight).
    cell_types : dict of str to float
        Cell-type proportions (normalised internally); keys are programme names of
        :data:`atlasmix.simulate.programmes.PROGRAMMES`.
    assay, tissue, tissue_general, disease : str
        Constant CELLxGENE-style obs values.
    n_donors : int
        Number of donors; cells are spread over them with Dirichlet(5) weights.
    donor_names : tuple of str
        Explicit donor ids (e.g. cell-line names); default ``<name>_donor<i>``.
    development_stage : str or None
        Constant stage label; ``None`` gives each donor an age in ``donor_age_range`` and the
        label ``"<age>-year-old human stage"``.
    donor_age_range : tuple of int
        Age range (years) of donors when ``development_stage`` is None.
    library_median : float
        Median library size (UMIs per cell) before cell-type factors.
    library_sdlog : float
        Standard deviation of the log library size (Splatter ``lib.scale``).
    mito_fraction : float
        Median fraction of UMIs from the 13 ``MT-`` genes.
    mito_sdlogit : float
        Standard deviation of the per-cell logit mito fraction.
    batch_scale : float
        Scale of the per-gene log-normal batch factor of this source (Splatter ``batch.facScale``).
    donor_scale : float
        Scale of the per-gene log-normal factor of each donor.
    dropout_mid : float or None
        Splatter logistic dropout midpoint (natural-log mean); ``None`` disables dropout.
    dropout_shape : float
        Splatter dropout shape (negative: low-mean genes drop more).
    malignant_lineage : str
        Cell type that tumour cells derive from (``malignant``).
    malignant_fraction : float
        Fraction of tumour cells (``malignant``).
    base_cell_type : str
        Cell line / base cell type (``perturbation``, ``tf_atlas``).
    n_targets : int
        Number of perturbed genes (``perturbation``) or TFs (``tf_atlas``, at most 24).
    control_fraction : float
        Fraction of non-targeting ``control`` cells (``perturbation``, ``tf_atlas``).
    base_is_malignant : bool
        ``is_malignant`` of the base cell line (``perturbation``: K562 is a leukaemia line).
    """

    name: str
    kind: SourceKind = "healthy"
    title: str = ""
    weight: float = 1.0
    cell_types: dict[str, float] = field(default_factory=dict)
    assay: str = "10x 3' v3"
    tissue: str = "blood"
    tissue_general: str = "blood"
    disease: str = "normal"
    n_donors: int = 4
    donor_names: tuple[str, ...] = ()
    development_stage: str | None = None
    donor_age_range: tuple[int, int] = (20, 70)
    library_median: float = 5000.0
    library_sdlog: float = 0.45
    mito_fraction: float = 0.04
    mito_sdlogit: float = 0.35
    batch_scale: float = 0.2
    donor_scale: float = 0.08
    dropout_mid: float | None = None
    dropout_shape: float = -1.0
    malignant_lineage: str = "B cell"
    malignant_fraction: float = 0.6
    base_cell_type: str = "K562 cell"
    n_targets: int = 100
    control_fraction: float = 0.1
    base_is_malignant: bool = False

    def validate(self) -> None:
        """Check the spec.

        Raises
        ------
        AtlasmixError
            Unknown kind or cell type, empty composition, or a value out of range.
        """
        import re

        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", self.name or ""):
            raise AtlasmixError(f"bad source name {self.name!r}: use letters, digits, '_' and '-'")
        if self.kind not in KINDS:
            raise AtlasmixError(f"source {self.name}: unknown kind {self.kind!r} (one of {', '.join(KINDS)})")
        if not self.weight > 0:
            raise AtlasmixError(f"source {self.name}: weight must be > 0")
        for ct, w in self.cell_types.items():
            if ct not in PROGRAMMES:
                raise AtlasmixError(f"source {self.name}: unknown cell type {ct!r}")
            if w < 0:
                raise AtlasmixError(f"source {self.name}: negative proportion for {ct!r}")
        if self.kind in ("healthy", "malignant") and sum(self.cell_types.values()) <= 0 \
                and not (self.kind == "malignant" and self.malignant_fraction >= 1):
            raise AtlasmixError(f"source {self.name}: cell_types is empty")
        if self.kind == "malignant":
            if self.malignant_lineage not in PROGRAMMES:
                raise AtlasmixError(f"source {self.name}: unknown malignant lineage {self.malignant_lineage!r}")
            if not 0 < self.malignant_fraction <= 1:
                raise AtlasmixError(f"source {self.name}: malignant_fraction must be in (0, 1]")
        if self.kind in ("perturbation", "tf_atlas"):
            if self.base_cell_type not in PROGRAMMES:
                raise AtlasmixError(f"source {self.name}: unknown base cell type {self.base_cell_type!r}")
            if self.n_targets < 1:
                raise AtlasmixError(f"source {self.name}: n_targets must be >= 1")
            if not 0 <= self.control_fraction < 1:
                raise AtlasmixError(f"source {self.name}: control_fraction must be in [0, 1)")
        if self.kind == "tf_atlas" and self.n_targets > len(TF_FATES):
            raise AtlasmixError(f"source {self.name}: a tf_atlas source has at most {len(TF_FATES)} TFs")
        if self.n_donors < 1 or (self.donor_names and len(self.donor_names) != self.n_donors):
            raise AtlasmixError(f"source {self.name}: n_donors must be >= 1 and match donor_names")
        if not (self.library_median >= 50 and self.library_sdlog >= 0):
            raise AtlasmixError(f"source {self.name}: library_median must be >= 50 and library_sdlog >= 0")
        if not 0 < self.mito_fraction < 0.5:
            raise AtlasmixError(f"source {self.name}: mito_fraction must be in (0, 0.5)")

    def donors(self) -> list[str]:
        """Donor ids of this source (``donor_names`` or ``<name>_donor<i>``, i from 1)."""
        return list(self.donor_names) or [f"{self.name}_donor{i + 1}" for i in range(self.n_donors)]

    def to_dict(self) -> dict[str, Any]:
        """A plain-dict copy (for ``uns["simulation"]``)."""
        return dataclasses.asdict(self)


_BLOOD = {
    "CD4-positive, alpha-beta T cell": 0.28, "CD8-positive, alpha-beta T cell": 0.14,
    "regulatory T cell": 0.03, "natural killer cell": 0.10, "B cell": 0.10,
    "classical monocyte": 0.22, "non-classical monocyte": 0.05, "conventional dendritic cell": 0.03,
    "plasmacytoid dendritic cell": 0.01, "platelet": 0.02, "plasma cell": 0.02,
}


def _presets() -> dict[str, SourceSpec]:
    blood_b = dict(_BLOOD)
    blood_b.update({"CD4-positive, alpha-beta T cell": 0.22, "classical monocyte": 0.28, "platelet": 0.0})
    return {s.name: s for s in [
        SourceSpec("blood_a", "healthy", "simulated blood source A (PBMC, 10x 3' v3)", 1.0, dict(_BLOOD),
                   assay="10x 3' v3", tissue="blood", tissue_general="blood", n_donors=8,
                   library_median=6000, library_sdlog=0.45, mito_fraction=0.04, batch_scale=0.2),
        SourceSpec("blood_b", "healthy", "simulated blood source B (PBMC, 10x 3' v2, shallower)", 1.0,
                   blood_b, assay="10x 3' v2", tissue="blood", tissue_general="blood", n_donors=6,
                   library_median=3500, library_sdlog=0.4, mito_fraction=0.035, batch_scale=0.25),
        SourceSpec("malignant", "malignant", "simulated B-cell lymphoma (lymph node, tumour + microenvironment)",
                   0.6, {"CD4-positive, alpha-beta T cell": 0.35, "CD8-positive, alpha-beta T cell": 0.2,
                         "regulatory T cell": 0.08, "natural killer cell": 0.07, "macrophage": 0.15,
                         "B cell": 0.15},
                   assay="10x 5' v2", tissue="lymph node", tissue_general="lymph node",
                   disease="B-cell non-Hodgkin lymphoma", n_donors=5, donor_age_range=(45, 80),
                   library_median=5000, library_sdlog=0.5, mito_fraction=0.05, batch_scale=0.25,
                   malignant_lineage="B cell", malignant_fraction=0.6),
        SourceSpec("perturbation", "perturbation", "simulated CRISPRi screen in K562 cells (Perturb-seq-like)",
                   1.0, {}, assay="10x 3' v3", tissue="K-562 cell line", tissue_general="cell line",
                   disease="chronic myelogenous leukemia", n_donors=1, donor_names=("K562",),
                   development_stage="53-year-old human stage", library_median=8000, library_sdlog=0.35,
                   mito_fraction=0.06, batch_scale=0.2, base_cell_type="K562 cell", n_targets=100,
                   control_fraction=0.1, base_is_malignant=True),
        SourceSpec("bone_marrow", "healthy", "simulated bone marrow with haematopoietic progenitors", 0.6,
                   {"hematopoietic stem cell": 0.05, "granulocyte monocyte progenitor cell": 0.08,
                    "megakaryocyte-erythroid progenitor cell": 0.06, "erythroblast": 0.12, "pro-B cell": 0.04,
                    "B cell": 0.07, "plasma cell": 0.03, "CD4-positive, alpha-beta T cell": 0.12,
                    "CD8-positive, alpha-beta T cell": 0.10, "natural killer cell": 0.06,
                    "classical monocyte": 0.20, "conventional dendritic cell": 0.04,
                    "plasmacytoid dendritic cell": 0.03},
                   assay="10x 3' v3", tissue="bone marrow", tissue_general="bone marrow", n_donors=4,
                   library_median=5000, library_sdlog=0.5, mito_fraction=0.04, batch_scale=0.2),
        SourceSpec("tf_atlas", "tf_atlas", "simulated TF overexpression atlas in human ES cells", 0.6, {},
                   assay="10x 3' v3", tissue="embryonic stem cell line", tissue_general="cell line",
                   n_donors=2, donor_names=("H1", "H9"), development_stage="embryonic human stage",
                   library_median=7000, library_sdlog=0.4, mito_fraction=0.05, batch_scale=0.2,
                   base_cell_type="embryonic stem cell", n_targets=24, control_fraction=0.1),
    ]}


#: Built-in sources by name (fresh copies are returned by :func:`preset`).
PRESET_NAMES: tuple[str, ...] = tuple(_presets())
#: Sources simulated when none are named.
DEFAULT_SOURCES: tuple[str, ...] = PRESET_NAMES


def preset(name: str, **overrides: Any) -> SourceSpec:
    """Return a copy of the built-in source ``name``, with fields replaced by ``overrides``.

    Raises
    ------
    AtlasmixError
        Unknown preset name or field.
    """
    presets = _presets()
    if name not in presets:
        raise AtlasmixError(f"unknown source {name!r}; built-in sources: {', '.join(PRESET_NAMES)}")
    try:
        return dataclasses.replace(presets[name], **overrides)
    except TypeError as e:
        raise AtlasmixError(f"bad field for source {name!r}: {e}") from e


def parse_sources(text: str) -> list[SourceSpec]:
    """Parse a CLI source list ``"blood_a,blood_b:2,malignant:0.5"`` (``name[:weight]``, comma-separated).

    Raises
    ------
    AtlasmixError
        Empty list, unknown name, bad or non-positive weight, or a repeated name.
    """
    out: list[SourceSpec] = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        name, _, w = item.partition(":")
        spec = preset(name.strip())
        if w:
            try:
                spec.weight = float(w)
            except ValueError:
                raise AtlasmixError(f"bad weight {w!r} for source {name!r}") from None
            if not spec.weight > 0:
                raise AtlasmixError(f"weight of source {name!r} must be > 0")
        out.append(spec)
    if not out:
        raise AtlasmixError("no sources given")
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise AtlasmixError(f"source listed twice: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    return out
