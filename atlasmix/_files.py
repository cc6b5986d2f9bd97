"""Reading input files, one way for every stage: a file's sha256 and a TOML document.

:func:`sha256_of` is the content hash that ingest records for a source (``source_sha256``), that a
manifest's sidecar records for its parquet file, and that a file eval set records (so the evaluation
can recognise an external file that is a training source). :func:`load_toml` reads the TOML files
of ingest plans, mixture specs and study specs, with one-line errors.
"""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path
from typing import Any

from atlasmix.errors import AtlasmixError


def sha256_of(path: str | Path) -> str:
    """sha256 of a file, or of a directory's files.

    Parameters
    ----------
    path : str or pathlib.Path
        A file, or a directory (e.g. a 10x MEX folder or an AnnData zarr store).

    Returns
    -------
    str
        64 hex digits. For a file, ``hashlib.sha256`` of its bytes (what ``sha256sum`` prints); for a
        directory, of each file's relative name, a NUL byte and its bytes, files in sorted order.
        Files are streamed in 8 MiB blocks.

    Raises
    ------
    OSError
        A file cannot be read.
    """
    p = Path(path)
    h = hashlib.sha256()
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode() + b"\0")
        with open(f, "rb") as fh:
            while block := fh.read(8 << 20):
                h.update(block)
    return h.hexdigest()


def load_toml(path: str | Path, *, missing: str, bad: str,
              error: type[AtlasmixError] = AtlasmixError) -> dict[str, Any]:
    """Read a TOML file, raising one-line errors.

    Parameters
    ----------
    path : str or pathlib.Path
        The file.
    missing : str
        Message when ``path`` is not a file; ``{path}`` and ``{name}`` (the file name) are filled in.
    bad : str
        Message for a TOML syntax error; ``{path}``, ``{name}`` and ``{error}`` (tomllib's message,
        with line and column) are filled in.
    error : type
        The :class:`~atlasmix.errors.AtlasmixError` subclass to raise.

    Returns
    -------
    dict
        The parsed document.

    Raises
    ------
    AtlasmixError
        (``error``) The file is missing or is not valid TOML.
    """
    p = Path(path)
    if not p.is_file():
        raise error(missing.format(path=p, name=p.name))
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise error(bad.format(path=p, name=p.name, error=e)) from None


__all__ = ["load_toml", "sha256_of"]
