"""Dense minibatches on the CPU: gather rows of an IO batch's CSR into reused float32 buffers.

A whole-transcriptome minibatch is large (1,024 cells x 19,907 genes x 4 bytes = 81 MB) and almost
all zeros, so on the CPU its cost is memory traffic, not arithmetic. Cutting it the obvious way --
``m[rows]`` (scipy copies the rows' nonzeros into a new CSR) then ``.toarray()`` (a fresh
``np.zeros``, whose pages the kernel zero-fills on first touch, then the scatter) -- measured 4 +
13-14 us per cell on 2 CPU cores (16,384-cell IO batches, ~1,700 nonzeros per cell). The 81 MB
are written roughly twice (page zeroing, then the scatter's cache-line fills).

:func:`gather_dense` does the gather, the densify and the library size in one compiled pass
(numba, ``nogil``: read threads keep running) into a buffer of :class:`DenseBufferPool` that no
longer holds a live minibatch: per output row, clear the row and add the row's nonzeros into it.
No intermediate CSR is built and no page is faulted in per minibatch: ~11 us per cell measured in
the same setting. That pass is still bound by memory traffic (the clear and the scatter each touch
most of the row's cache lines).

Reuse is safe without any contract on the consumer: a buffer is reused only when nothing but the
pool references it. ``torch.from_numpy`` keeps the numpy array alive for as long as the tensor,
any view of it, or any ``.numpy()`` of those exists, so the array's reference count says whether
a minibatch (or a piece of one) is still held -- by the prefetch queue, the training step, or a
user who keeps batches in a list. Rows are cleared in full before reuse, so in-place edits the
consumer made to a batch it dropped cannot leak into a later batch.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from atlasmix._buffers import BufferPool


@njit(nogil=True, cache=True)
def _gather_dense_kernel(indptr, indices, data, rows, out, lib, clear):  # pragma: no cover - compiled
    """Rows ``rows`` of the CSR into ``out[:len(rows)]`` (cleared first when ``clear``) and their
    sums into ``lib``. Returns the number of nonzeros whose column is outside ``[0, out.shape[1])``
    (skipped); 0 for a valid CSR."""
    n_vars = out.shape[1]
    bad = 0
    for i in range(rows.shape[0]):
        r = rows[i]
        row = out[i]
        if clear:
            row[:] = 0
        s = 0.0
        for k in range(indptr[r], indptr[r + 1]):
            c = indices[k]
            if c < 0 or c >= n_vars:
                bad += 1
                continue
            v = data[k]
            row[c] += v  # += as scipy's toarray does: a duplicate column sums
            s += v
        lib[i] = s
    return bad


def gather_dense(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, rows: np.ndarray,
                 out: np.ndarray, clear: bool = True) -> np.ndarray:
    """Densify rows ``rows`` of a CSR matrix into ``out`` and return their sums (library sizes).

    Equals ``m[rows].toarray()`` and ``m[rows].sum(axis=1)`` for ``m = csr_matrix((data, indices,
    indptr))``, written into a caller-owned buffer in one pass (see the module docstring).

    Parameters
    ----------
    indptr : numpy.ndarray of int32 or int64, shape (n_rows + 1,)
    indices : numpy.ndarray of int32 or int64, shape (nnz,)
        Column of each nonzero, in ``[0, out.shape[1])``.
    data : numpy.ndarray, shape (nnz,)
        Counts (float32 as the loader reads them; another numeric dtype is cast per element in
        the kernel, never copied as a whole).
    rows : numpy.ndarray of int64, shape (n,)
        Rows of the CSR to take, in output order (any order, repeats allowed).
    out : numpy.ndarray of float32, shape (>= n, n_genes), C-contiguous
        Output; rows ``0..n-1`` are overwritten, the rest untouched.
    clear : bool
        Zero each output row before adding its nonzeros. ``False`` only for a buffer known to be
        all zeros (a fresh ``np.zeros``).

    Returns
    -------
    numpy.ndarray of float32, shape (n,)
        Per-row sum of the nonzeros (counts: the library size), accumulated in float64.

    Raises
    ------
    ValueError
        ``out`` has the wrong dtype, layout or too few rows, or a column index is out of range.
    """
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    if out.dtype != np.float32 or out.ndim != 2 or not out.flags.c_contiguous or out.shape[0] < len(rows):
        raise ValueError(f"out must be a C-contiguous float32 matrix with >= {len(rows)} rows")
    lib = np.empty(len(rows), dtype=np.float32)
    bad = _gather_dense_kernel(indptr, indices, data, rows, out, lib, clear)
    if bad:
        raise ValueError(f"{bad} nonzeros have a column outside [0, {out.shape[1]})")
    return lib


class DenseBufferPool:
    """Float32 (batch_size, n_genes) buffers for dense CPU minibatches, reused once released.

    Parameters
    ----------
    batch_size : int
        Rows of each buffer (a smaller last minibatch uses the leading rows).
    n_genes : int
        Columns.
    capacity : int
        Buffers kept for reuse. When all are held by live minibatches, :meth:`take` returns a
        fresh unpooled buffer (freed with its minibatch), so memory follows what the consumer
        holds, never more than ``capacity`` idle buffers.

    Notes
    -----
    The reuse rule (a buffer is free when nothing but the pool references it) is
    :class:`atlasmix._buffers.BufferPool`'s.
    """

    def __init__(self, batch_size: int, n_genes: int, capacity: int = 8):
        self.shape = (int(batch_size), int(n_genes))
        self._pool = BufferPool(capacity, zeros=True)

    @property
    def n_fresh(self) -> int:
        """Buffers allocated so far (pooled or not): what a test or benchmark can watch."""
        return self._pool.n_fresh

    def take(self, n: int) -> tuple[np.ndarray, bool]:
        """A buffer whose first ``n`` rows may be written, and whether its rows must be cleared.

        Returns
        -------
        (numpy.ndarray of float32, shape (n, n_genes), bool)
            A view of a pooled buffer (``True``: holds an older minibatch) or a fresh ``np.zeros``
            (``False``).
        """
        buf, reused = self._pool.take(self.shape, np.float32)
        return buf[:n], reused
