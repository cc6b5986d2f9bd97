"""store: one TileDB-SOMA Experiment holding every source (see :mod:`atlasmix.store.schema`)."""

from atlasmix.store.store import Store, make_context

__all__ = ["Store", "make_context"]
