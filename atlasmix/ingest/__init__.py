"""ingest: validated, QC-flagged, crash-safe appends of datasets into a store."""

from atlasmix.ingest.ingest import DatasetRequest, QCPolicy, ingest, prepare
from atlasmix.ingest.plan import read_plan

__all__ = ["DatasetRequest", "QCPolicy", "ingest", "prepare", "read_plan"]
