"""Schema of an atlasmix store: names, arrow schemas and TileDB create options.

Layout of one store (a TileDB-SOMA ``Experiment`` at the store URI)::

    STORE/
      obs                                  DataFrame, one row per cell (OBS_SCHEMA)
      ms/RNA/var                           DataFrame, one row per Ensembl gene (VAR_SCHEMA)
      ms/RNA/X/raw                         SparseNDArray float32, cells x genes, raw counts
      ms/RNA/feature_dataset_presence_matrix
                                           SparseNDArray bool, datasets x genes (as CELLxGENE Census)
      atlasmix/datasets                    DataFrame, the dataset catalog (CATALOG_SCHEMA)
      atlasmix/obs_extra/d<dataset joinid> DataFrame per dataset: the source's other obs columns
      atlasmix/x_fingerprints/d<dataset joinid>
                                           DataFrame per dataset: each cell's count fingerprint
                                           (atlasmix.store.fingerprint), to find duplicated cells

Other obs columns of a source are kept in a per-dataset side table (``atlasmix/obs_extra``), keyed by
the cell ``soma_joinid`` and keeping the source's column types. We chose a side table over evolving
the ``obs`` schema because every dataset brings different columns: evolving obs would add mostly-null
columns for all 50M cells on each ingest and make the schema depend on ingest order. The mixing stage
exposes the side tables to duckdb, joined on ``soma_joinid``.
"""

from __future__ import annotations

import pyarrow as pa

MEASUREMENT = "RNA"
X_LAYER = "raw"
PRESENCE = "feature_dataset_presence_matrix"
ATLASMIX = "atlasmix"
CATALOG = "datasets"
OBS_EXTRA = "obs_extra"
X_FINGERPRINTS = "x_fingerprints"
STORE_SCHEMA_VERSION = "1"

#: Catalog ``status`` values. Only ``complete`` datasets are visible to queries.
STATUS_INGESTING = "ingesting"
STATUS_COMPLETE = "complete"
STATUS_FAILED = "failed"
STATUS_REPLACED = "replaced"
STATUS_RETIRED = "retired"  # a replaced dataset whose cells were deleted

#: CELLxGENE-style string columns of obs, with the value used when a source does not say.
OBS_STRING_COLUMNS: dict[str, str] = {
    "obs_id": "",
    "dataset_id": "",
    "assay": "unknown",
    "organism": "unknown",
    "tissue": "unknown",
    "tissue_general": "unknown",
    "cell_type": "unknown",
    "disease": "normal",
    "perturbation": "none",
    "development_stage": "unknown",
    "donor_id": "unknown",
}

#: Low-cardinality string columns are TileDB enumerations (arrow dictionary, as CELLxGENE Census
#: obs): 4 bytes per cell on disk and in memory, faster reads, and duckdb sees them as ENUMs.
#: Enumerations grow automatically when an ingest writes new values. ``obs_id`` is a plain string.
OBS_ENUM = pa.dictionary(pa.int32(), pa.large_string())
OBS_SCHEMA = pa.schema(
    [pa.field(c, pa.large_string() if c == "obs_id" else OBS_ENUM, nullable=False) for c in OBS_STRING_COLUMNS]
    + [
        pa.field("is_malignant", pa.bool_(), nullable=False),
        pa.field("total_counts", pa.float64(), nullable=False),
        pa.field("n_genes_by_counts", pa.int32(), nullable=False),
        pa.field("pct_counts_mt", pa.float32(), nullable=False),
        pa.field("qc_pass", pa.bool_(), nullable=False),
    ]
)
#: Columns a user may set or map at ingest (``--set``, ``--obs-map``); QC columns are computed.
SETTABLE_OBS_COLUMNS = [c for c in OBS_STRING_COLUMNS if c not in {"obs_id", "dataset_id"}] + ["is_malignant"]
QC_COLUMNS = ["total_counts", "n_genes_by_counts", "pct_counts_mt", "qc_pass"]

VAR_SCHEMA = pa.schema(
    [
        pa.field("feature_id", pa.large_string(), nullable=False),
        pa.field("feature_name", pa.large_string(), nullable=False),
        pa.field("feature_biotype", pa.large_string(), nullable=False),
        pa.field("species", pa.large_string(), nullable=False),
    ]
)

CATALOG_SCHEMA = pa.schema(
    [
        pa.field("dataset_id", pa.large_string(), nullable=False),
        pa.field("title", pa.large_string(), nullable=False),
        pa.field("citation", pa.large_string(), nullable=False),
        pa.field("provenance", pa.large_string(), nullable=False),  # JSON
        pa.field("source_path", pa.large_string(), nullable=False),
        pa.field("source_format", pa.large_string(), nullable=False),
        pa.field("source_sha256", pa.large_string(), nullable=False),
        pa.field("organism", pa.large_string(), nullable=False),
        pa.field("n_cells", pa.int64(), nullable=False),
        pa.field("n_genes_measured", pa.int64(), nullable=False),
        pa.field("obs_joinid_start", pa.int64(), nullable=False),
        pa.field("obs_joinid_end", pa.int64(), nullable=False),  # exclusive
        pa.field("ingest_time", pa.large_string(), nullable=False),  # ISO 8601 UTC
        pa.field("atlasmix_version", pa.large_string(), nullable=False),
        pa.field("qc_policy", pa.large_string(), nullable=False),  # JSON
        pa.field("gene_mapping", pa.large_string(), nullable=False),  # JSON report
        pa.field("obs_extra_columns", pa.large_string(), nullable=False),  # JSON list
        pa.field("status", pa.large_string(), nullable=False),
    ]
)

#: Largest soma_joinid domain we create; arrays are resized (``tiledbsoma.io.resize_experiment``)
#: as data arrive, so this only bounds growth (2^40 cells, 2^24 genes, 2^20 datasets).
MAX_CELLS = 2**40
MAX_GENES = 2**24
MAX_DATASETS = 2**20

#: X tiling for fast cell (row) reads. Sparse X is stored row-major in space tiles of 2048 cells x
#: the whole gene axis (extent 2^24 >= every gene space), so the cells of one row band sit together in
#: the data tiles. A read of a block of cells touches few, contiguous tiles. Coordinates use delta +
#: zstd (sorted row-major coordinates compress to almost nothing), values use byte-shuffle + zstd
#: (integer-valued float32 counts). This mirrors CELLxGENE Census's X (2048 x 2048 tiles, zstd) but
#: with a full-width gene tile so a cell's row is never split across space tiles.
#:
#: ``capacity`` (nonzeros per data tile) is small, 2^13 (~5 cells at 1,700 genes/cell, ~27 at 300):
#: a shuffled loader reads blocks of ~64 cells scattered over the corpus, and TileDB decodes every
#: data tile a block touches in full, so large tiles are mostly decoded for nothing. Measured on a
#: 100,000-cell simulated X (1,700 nonzeros/cell, 2 CPU cores, 16,384-cell reads; data written the
#: same way, same size on disk within 1%, same write time)::
#:
#:     capacity   blocks of 16   blocks of 64   blocks of 512   one contiguous slice   (cells/s)
#:     2^17        4,900          9,400          14,800          15,300
#:     2^15        8,200         12,200          15,200          15,600
#:     2^14       10,400         14,900          18,000          16,100
#:     2^13       12,600         16,600          16,100          14,900
#:
#: The price is more tile metadata (MBRs) per fragment: ~2,000 tiles per 8k-cell fragment at 2k
#: genes/cell, ~64 KiB, loaded only for the fragments a read touches.
X_CREATE_OPTIONS = {
    "tiledb": {
        "create": {
            "capacity": 2**13,
            "cell_order": "row-major",
            "tile_order": "row-major",
            "dims": {
                "soma_dim_0": {"tile": 2048, "filters": [{"_type": "DoubleDeltaFilter"}, {"_type": "ZstdFilter", "level": 3}]},
                "soma_dim_1": {"tile": MAX_GENES, "filters": [{"_type": "ByteShuffleFilter"}, {"_type": "ZstdFilter", "level": 3}]},
            },
            "attrs": {"soma_data": {"filters": [{"_type": "ByteShuffleFilter"}, {"_type": "ZstdFilter", "level": 3}]}},
        }
    }
}
#: obs/var/catalog: zstd on everything, large row tiles (column reads for duckdb queries dominate).
DF_CREATE_OPTIONS = {"tiledb": {"create": {"capacity": 2**16, "dataframe_dim_zstd_level": 3}}}

#: Consolidation. Every ingest ends each array's writes with ``consolidate_and_vacuum`` of the
#: fragment metadata and commit files (tiledbsoma's default modes), which is cheap (no data is
#: rewritten) and keeps opening an array O(1) files however many ingests happened. X fragments are
#: not merged: each covers a disjoint block of cell joinids (one per ingest chunk, ~8k cells), so a
#: row read only touches the fragments whose non-empty domain overlaps it.
WRITE_LAST = {"tiledb": {"write": {"consolidate_and_vacuum": True}}}
WRITE_LAST_SORTED = {"tiledb": {"write": {"consolidate_and_vacuum": True, "sort_coords": False}}}
