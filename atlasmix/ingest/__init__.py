"""ingest: validated, QC-flagged, crash-safe appends of datasets into a store."""

from atlasmix.ingest.ingest import DatasetRequest, QCPolicy, ingest, prepare

__all__ = ["DatasetRequest", "QCPolicy", "ingest", "prepare"]
