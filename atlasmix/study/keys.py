"""Keys and names of a study's cached artefacts (manifests, gene axis, eval cache, grid cells).

A cached artefact is reused while its key -- the sha256 of what determines it -- is unchanged.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def sha(obj: Any) -> str:
    """sha256 (hex) of ``obj`` as JSON with sorted keys (``str`` of what JSON cannot hold)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def safe_name(s: str) -> str:
    """``s`` as a file name: characters other than letters, digits and ``._-`` become ``_``."""
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in s)
