"""Seeded random streams of the simulator: one independent stream per (run seed, purpose key).

Every random draw of a run comes from a stream keyed by the run seed and a tuple of names (the gene
means, a programme, a source's donors, a block of cells), so a draw never depends on the order of
the others or on which sources a run holds.
"""

from __future__ import annotations

import zlib

import numpy as np


def _key(*parts: object) -> int:
    """A stable 32-bit key of strings/ints (crc32), for seeding."""
    return zlib.crc32("\x1f".join(map(str, parts)).encode())


def substream(seed: int, *parts: object) -> np.random.Generator:
    """The random stream of run ``seed`` keyed by ``parts`` (strings or ints; crc32 of their join).

    Returns
    -------
    numpy.random.Generator
        PCG64 seeded by ``SeedSequence([seed mod 2**64, crc32 of parts])``.
    """
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, _key(*parts)]))
