"""What to ingest: one dataset's request (a CLI call or a plan entry) and its QC policy."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field


class QCPolicy(BaseModel):
    """Declared QC policy; ``qc_pass = pct_counts_mt < max_pct_counts_mt and total_counts > min_total_counts
    and n_genes_by_counts >= min_genes``. Defaults: scFM-datamix (pct mito < 10 %, > 1000 UMIs)."""

    model_config = ConfigDict(extra="forbid")
    max_pct_counts_mt: float = 10.0
    min_total_counts: float = 1000.0
    min_genes: int = 0

    def passes(self, total: np.ndarray, n_genes: np.ndarray, pct_mt: np.ndarray) -> np.ndarray:
        return (pct_mt < self.max_pct_counts_mt) & (total > self.min_total_counts) & (n_genes >= self.min_genes)


class DatasetRequest(BaseModel):
    """One dataset to ingest (a CLI call or one ``[[dataset]]`` of a plan file)."""

    model_config = ConfigDict(extra="forbid")
    dataset_id: str
    source: str
    format: str | None = None
    organism: str = "human"
    tissue: str | None = None
    title: str = ""
    citation: str = ""
    set: dict[str, str] = Field(default_factory=dict)
    obs_map: dict[str, str] = Field(default_factory=dict)
    obs_table: str | None = None
    obs_filter: str | None = None
    gene_id_column: str | None = None
    gene_table: str | None = None
    layer: str | None = None
    genome: str | None = None
    assume_counts: bool = False
    on_duplicate_genes: Literal["sum", "refuse"] = "sum"
    on_duplicate_cells: Literal["warn", "refuse"] = "warn"
    min_mapped_fraction: float = 0.5
    replace: bool = False
    qc: QCPolicy = Field(default_factory=QCPolicy)
