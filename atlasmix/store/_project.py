"""Compiled kernel of :func:`atlasmix.store.xlayout.project_columns` (numba, ``nogil``)."""

from __future__ import annotations

from numba import njit


@njit(nogil=True, cache=True)
def project_inplace(indptr, indices, data, col_of, new_ptr):  # pragma: no cover - compiled
    """Keep the nonzeros whose ``col_of[column] >= 0``, renumbered, compacted in place.

    ``new_ptr`` (same length as ``indptr``) receives the new row starts; returns the new nonzero
    count. Column ids at or beyond ``len(col_of)`` are dropped.
    """
    n = indptr.shape[0] - 1
    m = 0
    n_col = col_of.shape[0]
    new_ptr[0] = 0
    for r in range(n):
        for k in range(indptr[r], indptr[r + 1]):
            c = indices[k]
            if c < n_col:
                j = col_of[c]
                if j >= 0:
                    indices[m] = j
                    data[m] = data[k]
                    m += 1
        new_ptr[r + 1] = m
    return m
