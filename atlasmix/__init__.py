"""atlasmix: a TileDB-SOMA data lake for training-data composition studies of single-cell models.

Stages (data flows one way; a stage never imports a later one):
``store`` -> ``ingest`` -> ``mixing`` -> ``training`` -> ``evaluation``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("atlasmix")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

from atlasmix.errors import AtlasmixError  # noqa: E402

__all__ = ["AtlasmixError", "__version__"]
