"""Cell metadata of generated cells: 10x-style barcodes and CELLxGENE-style obs."""

from __future__ import annotations

import numpy as np
import pandas as pd

from atlasmix.simulate.tables import CompiledSource


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
