"""Generated cells: one block of a source's cells as CSR rows, sampled into a reusable row buffer.

See :mod:`atlasmix.simulate.model` ("Library size", "Counts", "Dropout") for the draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from atlasmix._buffers import grown
from atlasmix.simulate import _kernels
from atlasmix.simulate.seeding import substream
from atlasmix.simulate.tables import CompiledSource

#: Cells per RNG block. Fixed so that output never depends on the caller's chunk size.
BLOCK = 4096


@dataclass
class Block:
    """Generated cells: CSR rows plus per-cell obs codes."""

    indptr: np.ndarray  # int64 (n+1,)
    indices: np.ndarray  # int32 (nnz,)
    data: np.ndarray  # float32 (nnz,)
    group: np.ndarray  # int32 (n,)
    donor: np.ndarray  # int32 (n,)
    cell_index: np.ndarray  # int64 (n,) index of the cell within its source

    @property
    def n(self) -> int:
        return len(self.group)


class RowBuffer:
    """A growable CSR row buffer that blocks are sampled into in place.

    Re-using one buffer (and one scratch space) for a whole source avoids allocating fresh memory
    per block, whose page faults cost as much as the sampling itself on small VMs.
    """

    def __init__(self, capacity: int = 1 << 20):
        self.indices = np.empty(capacity, np.int32)
        self.data = np.empty(capacity, np.float32)
        self.nnz = 0
        self.indptr: list[np.ndarray] = []  # per block: row ends (absolute positions), int64
        self.meta: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.n = 0

    def reserve(self, extra: int) -> None:
        """Make room for ``extra`` more non-zeros."""
        need = self.nnz + extra
        if need > len(self.indices):
            cap = max(need, int(len(self.indices) * 1.5))
            self.indices, self.data = grown(self.indices, self.nnz, cap), grown(self.data, self.nnz, cap)

    def take(self, k: int, copy: bool) -> Block:
        """The first ``k`` rows (views unless ``copy``); call :meth:`drop` before adding more rows."""
        ends = np.concatenate(self.indptr) if len(self.indptr) != 1 else self.indptr[0]
        group, donor, cells = (np.concatenate(x) for x in zip(*self.meta))
        indptr = np.concatenate([[0], ends[:k]]).astype(np.int64)
        nz = int(indptr[-1])
        ind, dat = self.indices[:nz], self.data[:nz]
        if copy:
            ind, dat = ind.copy(), dat.copy()
        return Block(indptr, ind, dat, group[:k], donor[:k], cells[:k])

    def drop(self, k: int) -> None:
        """Remove the first ``k`` rows, moving the rest to the front."""
        ends = np.concatenate(self.indptr)
        group, donor, cells = (np.concatenate(x) for x in zip(*self.meta))
        cut = int(ends[k - 1]) if k > 0 else 0
        rest = self.nnz - cut
        if rest:
            self.indices[:rest] = self.indices[cut:self.nnz].copy()
            self.data[:rest] = self.data[cut:self.nnz].copy()
        self.nnz = rest
        self.n -= k
        self.indptr = [ends[k:] - cut] if self.n else []
        self.meta = [(group[k:], donor[k:], cells[k:])] if self.n else []


def generate_block(src: CompiledSource, b: int, n_cells: int, into: RowBuffer | None = None) -> Block | None:
    """Generate block ``b`` (cells ``b*BLOCK`` up to ``min((b+1)*BLOCK, n_cells)``) of a source.

    The block's random stream is seeded by (run seed, source name, b), so the block's cells are
    identical whatever the chunk size used to write them, and cell ``i`` of a source does not depend
    on the source's total cell count either (a smaller run is a prefix of a larger one).

    Parameters
    ----------
    src : CompiledSource
    b : int
        Block index.
    n_cells : int
        Cells in the source.
    into : RowBuffer or None
        Append the rows to this buffer (returns None); by default return a new :class:`Block`.
    """
    a = b * BLOCK
    n = min(BLOCK, n_cells - a)
    spec = src.spec
    rng = substream(src.seed, spec.name, "block", b)
    D = len(src.donors)
    gw = np.array([g.weight for g in src.groups])
    # every draw is made for a full block and cut to the first n cells afterwards, so that a cell
    # does not depend on n_cells (a short run is a prefix of a long one)
    B = BLOCK
    donor = rng.choice(D, B, p=src.donor_weights).astype(np.int32)
    group = rng.choice(len(gw), B, p=gw / gw.sum()).astype(np.int32)
    table = group.astype(np.int64) * D + donor
    libf = np.array([g.lib_factor for g in src.groups])[group]
    lib = np.exp(rng.normal(np.log(spec.library_median * libf), spec.library_sdlog))
    lib = np.clip(lib, 100.0, 500_000.0)
    logit = np.log(spec.mito_fraction / (1 - spec.mito_fraction)) + rng.normal(0.0, spec.mito_sdlogit, B)
    frac = 1.0 / (1.0 + np.exp(-logit))
    n_mito = rng.poisson(frac * lib)
    lib_nuc = lib * (1.0 - frac)
    n_clusters = rng.poisson(lib_nuc * src.rate[table]).astype(np.int64)
    mito_counts = rng.multinomial(n_mito, src.mito_p).astype(np.int64)
    seeds = rng.integers(0, np.iinfo(np.int64).max, B, dtype=np.int64).astype(np.uint64)
    donor, group, table, lib_nuc, n_clusters = donor[:n], group[:n], table[:n], lib_nuc[:n], n_clusters[:n]
    mito_counts, seeds = mito_counts[:n], seeds[:n]
    bound = int(n_clusters.sum()) + n * len(src.mito_p)
    if src.work_idx is None or len(src.work_idx) < bound:
        src.work_idx = np.empty(int(bound * 1.3), np.int32)
        src.work_val = np.empty(int(bound * 1.3), np.float32)
    buf = into if into is not None else RowBuffer(bound)
    buf.reserve(bound)
    drop = spec.dropout_mid is not None
    indptr = _kernels.sample_cells(
        table, n_clusters, lib_nuc, mito_counts, src.space.mito_idx, seeds, src.alias, src.lsr, src.pmean,
        drop, float(spec.dropout_mid or 0.0), float(spec.dropout_shape), numba.get_num_threads(),
        src.work_idx, src.work_val, buf.indices, buf.data, buf.nnz)
    buf.indptr.append(indptr[1:] + buf.nnz)
    buf.meta.append((group, donor, np.arange(a, a + n, dtype=np.int64)))
    buf.nnz += int(indptr[-1])
    buf.n += n
    if into is None:
        return buf.take(n, copy=False)
    return None

