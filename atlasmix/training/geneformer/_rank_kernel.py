"""The compiled (numba) kernel of the rank value encoding: per-cell sort keys, bucket sort, tokens.

:func:`_encode_cells` encodes the cells ``r0:r1`` of a CSR batch into rows of a preallocated
token array without the GIL; :func:`atlasmix.training.geneformer.tokenizer.rank_value_encode`
validates its inputs, allocates the output and runs it over chunks of cells in threads. The
constants below fix the layout of the int64 sort key (float64 bits of the value, then the token
id) and the bucket table's size. The kernel is compiled on first use and cached on disk next to
this module.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

_HI_BITS = np.int64(np.float64(2.0 ** 64).view(np.int64))  # x is clipped to [2^-64, 2^64): 2^59 bit patterns
#: low bits of x's float64 pattern dropped in the sort key: values within a relative 2^-36 (1.5e-11)
#: of each other count as tied (float64 rounding noise of equal ratios) and come in token-id order.
_TIE_BITS = 16
_MAX_POS_BITS = 63 - (59 - _TIE_BITS)  # token ids below 2^20 fit next to the 43 value bits
#: bucket sort: a cell of n nonzeros gets 2 n to 2^k buckets, 2^k the power of two >= 4 n; on the
#: pisces PBMCs 4.4 buckets per nonzero on average, leaving 0.14 out-of-order neighbours per
#: nonzero for the insertion pass.
_BUCKETS_PER_NONZERO = 4
#: most keys of a cell for the bucket sort (its table is uint16: -2 to -5% time per nonzero vs int32,
#: the table of a 2,000-gene cell fits L1 next to the keys); larger cells use a comparison sort
_MAX_BUCKET_N = 65_535


@intrinsic
def _float64_bits(typingctx, x):
    """The IEEE-754 bit pattern of a float64 as an int64 (an LLVM ``bitcast``, in registers).

    numba has no bit-cast of scalars; going through a float64 array and an int64 view of it costs
    ~14% of the encoder (store-to-load round trips). Source: numba's documented extension API,
    ``numba.extending.intrinsic``.
    """
    if isinstance(x, types.Float) and x.bitwidth == 64:
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(types.int64))
        return types.int64(types.float64), codegen
    return None


@njit(cache=True, nogil=True)
def _encode_cells(out, lengths, r0, r1, indptr, indices, data, inv_medians, token_ids, pos_bits, n_genes_max,
                  cls_id, eos_id, pad_id):  # pragma: no cover - compiled; tested through rank_value_encode
    """Rank value encode cells ``r0:r1`` of a CSR batch into rows of ``out`` (compiled, GIL released).

    Per cell: one pass keeps the nonzeros with ``x = count / median > 0`` (explicit zeros and NaN
    medians drop out) and makes an int64 key per kept nonzero, ``(descending x, token id)``, from
    the bit pattern of x (monotonic for positive float64; x clipped to [2^-64, 2^64)); a counting
    sort scatters the keys into 2 to 8 buckets per nonzero, equal steps of the cell's key range
    (the key is close to linear in log x), straight into the cell's output row unless the cell is
    truncated; an insertion pass orders the few keys that share a bucket; the low bits of the first
    ``n_genes_max`` keys are the tokens, written with ``<cls>`` / ``<eos>`` (``cls_id >= 0``) and
    padding. Expected O(n) per cell; a cell whose keys crowd into few buckets (over 16 insertion
    shifts per nonzero) is sorted with ``ndarray.sort`` instead, so the worst case stays
    O(n log n). ``lengths[i]`` gets the row's length, special tokens included.
    """
    max_n = 1
    for i in range(r0, r1):
        max_n = max(max_n, indptr[i + 1] - indptr[i])
    keys = np.empty(max_n, np.int64)
    tmp = np.empty(max_n, np.int64)  # sorted keys of a truncated cell (longer than its output row)
    counts = np.empty(2 * _BUCKETS_PER_NONZERO * max_n, np.uint16)  # 16 KB for 2,000 nonzeros: stays in L1
    mask = (np.int64(1) << pos_bits) - 1
    top = _HI_BITS - 1
    lo, hi = 2.0 ** -64, 2.0 ** 64 * (1 - 2.0 ** -53)
    off = 1 if cls_id >= 0 else 0
    width = out.shape[1]
    for i in range(r0, r1):
        a = indptr[i]
        n = 0
        kmin = np.int64(9223372036854775807)
        kmax = np.int64(0)
        for j in range(a, indptr[i + 1]):
            g = indices[j]
            x = data[j] * inv_medians[g]  # counts / median: 10,000 / n_counts does not change the order
            if not x > 0:
                continue
            k = (((top - _float64_bits(min(max(x, lo), hi))) >> _TIE_BITS) << pos_bits) | token_ids[g]
            keys[n] = k
            kmin = min(kmin, k)
            kmax = max(kmax, k)
            n += 1
        if n > _MAX_BUCKET_N:  # bucket positions would overflow uint16: comparison sort
            dst = keys[:n]
            dst.sort()
        elif n > 1:
            # buckets: (k - kmin) >> shift with the smallest shift giving under 2^n_bits (>= 4 n) of
            # them: 2 to 8 per nonzero, equal steps of log x (the key is close to linear in log x)
            n_bits = 0
            while (np.int64(1) << n_bits) < _BUCKETS_PER_NONZERO * n:
                n_bits += 1
            shift = 0
            while ((kmax - kmin) >> shift) >> n_bits:
                shift += 1
            nb = ((kmax - kmin) >> shift) + 1
            counts[:nb] = 0
            for j in range(n):
                counts[(keys[j] - kmin) >> shift] += np.uint16(1)
            start = 0
            for t in range(nb):  # exclusive prefix sum, running total in a register
                c = counts[t]
                counts[t] = np.uint16(start)
                start += c
            # sorted in place in the output row when the cell is not truncated (saves a copy pass)
            dst = out[i, off:off + n] if n + 2 * off <= width else tmp
            for j in range(n):
                k = keys[j]
                b = (k - kmin) >> shift
                dst[counts[b]] = k
                counts[b] += np.uint16(1)
            # insertion pass with the running maximum in a register: dst[:p - 1] is sorted and
            # u >= all of it; min(u, v) goes to p - 1 without a branch, so a key one place out of
            # order (most of them) costs no mispredict; only a key that belongs >= 2 places back
            # takes the shifting branch (-7% per nonzero vs a plain insertion pass, same output)
            budget = 16 * n
            u = dst[0]
            for p in range(1, n):
                v = dst[p]
                w = min(u, v)
                u = max(u, v)
                if p >= 2 and dst[p - 2] > w:
                    q = p - 2
                    while q >= 0 and dst[q] > w:
                        dst[q + 1] = dst[q]
                        q -= 1
                    dst[q + 1] = w
                    budget -= p - 2 - q
                    if budget < 0:  # crowded buckets: comparison sort (u is the key not yet placed)
                        dst[p] = u
                        dst[:n].sort()
                        u = -1
                        break
                else:
                    dst[p - 1] = w
            if u >= 0:  # keys are >= 0; -1: the fallback sorted the cell
                dst[n - 1] = u
        else:  # zero or one key: already in order
            dst = keys
        m = min(n, n_genes_max)
        row = out[i]
        for j in range(m):
            row[off + j] = dst[j] & mask
        if off:
            row[0] = cls_id
            row[m + 1] = eos_id
        row[m + 2 * off:] = pad_id
        lengths[i] = m + 2 * off
