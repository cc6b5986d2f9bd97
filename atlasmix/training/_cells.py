"""Shared parts of the compiled cell encodings: a per-cell kernel run over a CSR batch in threads
(the kernels release the GIL), and one pass that sums a cell's counts and flags its whole counts.

Used by the cell encodings (Geneformer's rank value encoding, scGPT's value binning, scBERT's
tokens, scFoundation's input): the batch is cut into contiguous chunks of about equal nonzeros (up to 16 per thread, at least ``chunk_nnz``
nonzeros each) and each thread -- the caller included -- takes the next chunk from one shared
iterator until none is left, so a vCPU slowed by the host takes fewer chunks instead of setting the
pace (a fixed share per thread gave 48-52k cells/s median on 2 shared vCPUs for the Geneformer
encoding of PBMCs; dynamic chunks 59-67k).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numba import njit

#: Smallest chunk, in nonzeros (~0.2 ms of encoding work vs ~10 us to hand a chunk out).
CHUNK_NNZ = 16_384
_POOL: dict[int, Any] = {}


def _pool(threads: int):
    """A process-wide pool of ``threads`` helper threads per size."""
    if threads not in _POOL:
        from concurrent.futures import ThreadPoolExecutor

        _POOL[threads] = ThreadPoolExecutor(threads, thread_name_prefix="atlasmix-cells")
    return _POOL[threads]


def run_in_chunks(work: Callable[[int, int], None], indptr: np.ndarray, threads: int,
                  chunk_nnz: int | None = None) -> None:
    """Call ``work(first_cell, end_cell)`` over all cells of ``indptr`` (shape (B + 1,)), in ``threads``
    threads; ``work`` must write its cells' outputs in place and release the GIL to run in parallel.
    ``chunk_nnz`` defaults to :data:`CHUNK_NNZ`."""
    chunk_nnz = CHUNK_NNZ if chunk_nnz is None else int(chunk_nnz)
    B = len(indptr) - 1
    if threads <= 1 or B < 2 * threads:
        work(0, B)
        return
    n_chunks = int(min(B, max(threads, min(16 * threads, (indptr[-1] - indptr[0]) // chunk_nnz))))
    cuts = np.searchsorted(indptr, np.linspace(indptr[0], indptr[-1], n_chunks + 1)[1:-1])
    cuts = np.concatenate([[0], np.clip(cuts, 0, B), [B]])
    chunks = iter(list(zip(cuts[:-1].tolist(), cuts[1:].tolist())))  # next() is atomic under the GIL

    def loop() -> None:
        for a, b in chunks:
            work(a, b)

    helpers = [_pool(threads - 1).submit(loop) for _ in range(threads - 1)]
    loop()
    for f in helpers:
        f.result()


@njit(cache=True, nogil=True)
def mark_whole_counts(data, a, b, seen, lut_size):
    """One pass over ``data[a:b]``: flag in ``seen`` every whole count in 1 .. lut_size - 1 and sum the
    values (four accumulators: whole counts sum exactly in any order). Returns ``(total, small)``,
    ``small`` False when some value is not such a whole count (those need computing one by one)."""
    t0 = t1 = t2 = t3 = 0.0
    small = True
    k = a
    while k + 4 <= b:
        x0, x1, x2, x3 = data[k], data[k + 1], data[k + 2], data[k + 3]
        t0 += float(x0)
        t1 += float(x1)
        t2 += float(x2)
        t3 += float(x3)
        w0, w1, w2, w3 = int(x0), int(x1), int(x2), int(x3)
        if (0 < w0 < lut_size and w0 == x0 and 0 < w1 < lut_size and w1 == x1 and 0 < w2 < lut_size and w2 == x2
                and 0 < w3 < lut_size and w3 == x3):
            seen[w0] = True
            seen[w1] = True
            seen[w2] = True
            seen[w3] = True
        else:  # the per-value test of the tail loop below, written out in the unrolled kernel on purpose
            for x in (x0, x1, x2, x3):
                w = int(x)
                if 0 < w < lut_size and w == x:
                    seen[w] = True
                else:
                    small = False
        k += 4
    while k < b:
        x = data[k]
        t0 += float(x)
        w = int(x)
        if 0 < w < lut_size and w == x:
            seen[w] = True
        else:
            small = False
        k += 1
    return (t0 + t1) + (t2 + t3), small

