"""The epoch order of a :class:`atlasmix.training.loader.MixtureLoader` and its shards.

One epoch's order is a pure function of (seed, epoch, block size): locality blocks of consecutive
store cells in a fresh permutation (:func:`epoch_order`), dealt in whole blocks to DDP ranks and
DataLoader workers (:func:`shard_order`, :func:`shard_length`). :func:`shuffle_entropy` measures
how close minibatches come to i.i.d. sampling.

How an epoch is ordered
-----------------------
The cells of one manifest split (unique soma_joinids, sorted) are cut into *locality blocks* of
``block_size`` consecutive cells (store order), with block boundaries at a random phase each epoch.
Epoch ``e`` draws a fresh permutation of the full blocks from ``numpy.random.default_rng([seed,
e])`` (the two shorter edge blocks go last) -- no offline pre-shuffle, a new order every epoch, the
same order for the same (seed, epoch). The permuted cell sequence is then

1. dealt out in whole blocks: shard ``k = rank * num_workers + worker`` takes blocks ``k, k + K,
   k + 2K, ...`` of the order (``K = world_size * num_workers``), so each shard's IO batch reads
   runs of ``block_size`` consecutive cells whatever the number of shards (dealing single cells,
   as before, left 8 shards with runs of ~1 cell: one data tile or chunk decoded per cell);
2. made equal across shards (``uneven="drop"``: only ``K * (n // (block_size * K))`` whole blocks
   are dealt, the rest -- fewer than ``K + 1`` blocks, mostly the edge blocks, which change every
   epoch -- waits for another epoch; ``uneven="pad"``: every block is dealt and short shards repeat
   their own first cells). Every shard has the same number of cells, hence the same number of
   minibatches: DDP ranks never wait on each other at the end of an epoch, and no rank or worker
   ever owns a fixed contiguous slice of the store (tiledbsoma-ml 0.1.0's defect). One shard serves
   every cell every epoch.
3. Each shard is cut into *IO batches* of ``io_batch_size`` cells (a multiple of ``batch_size``),
   each read in one go in joinid order (:mod:`atlasmix.training.read`), shuffled in memory with
   ``default_rng([seed, e, k, io_index])`` and cut into minibatches
   (:mod:`atlasmix.training.minibatches`).

With ``block_size=1`` every minibatch is a uniformly random subset of the corpus (i.i.d. quality);
``block_size > 1`` trades a little shuffle quality for read locality (a random cell costs a whole
TileDB data tile decoded). Measured on a simulated store with the old 2^17-nonzero data tiles
(~64 cells each at 2k nonzeros per cell; 1,700 nonzeros per cell, 2 CPU cores), reading 16,384
cells took 5.3 s with ``block_size=1``, 2.0 s with 64 (the default), 1.15 s with 512 and 0.9 s for
a contiguous run; with the current 2^13-nonzero tiles blocks of 64 read as fast as a contiguous
run (:mod:`atlasmix.store.schema`). After the in-memory shuffle a minibatch holds cells from
``io_batch_size / block_size`` blocks, so per-batch ``dataset_id`` entropy stays at the i.i.d.
level while ``io_batch_size / block_size >> batch_size``; :func:`shuffle_entropy` measures it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from atlasmix.errors import AtlasmixError


# ---------------------------------------------------------------------------------------------- ordering
def epoch_order(n_cells: int, seed: int, epoch: int, block_size: int = 1, shuffle: bool = True) -> np.ndarray:
    """Positions ``0..n_cells-1`` (into the sorted cell array) in epoch ``epoch``'s order.

    Parameters
    ----------
    n_cells : int
        Cells in the split.
    seed, epoch : int
        The order is drawn from ``default_rng([seed, epoch])``.
    block_size : int
        Consecutive cells (store order) kept together; 1 = a uniform permutation of cells.
    shuffle : bool
        False: store order (validation / inference).

    Returns
    -------
    numpy.ndarray of int64, shape (n_cells,)

    Notes
    -----
    With ``block_size = b > 1`` the block boundaries start at a random phase ``o`` in ``[0, b)``
    each epoch (blocks ``[o + k b, o + (k + 1) b)``), the full blocks come first in a random order,
    then the (at most two, shorter) edge blocks ``[0, o)`` and the tail. Cells inside each block are
    permuted too. So every ``b`` consecutive positions of the order up to ``b * (n_cells // b)``
    hold at most two runs of consecutive cells (one for every full block), which is what
    :func:`shard_order` deals out, and which edge cells fall at the end changes every epoch.
    """
    pos = np.arange(n_cells, dtype=np.int64)
    if not shuffle or n_cells == 0:
        return pos
    rng = np.random.default_rng([int(seed), int(epoch)])
    if block_size <= 1:
        return rng.permutation(n_cells).astype(np.int64)
    o = int(rng.integers(block_size)) if n_cells > block_size else 0
    n_full = (n_cells - o) // block_size
    starts = o + rng.permutation(n_full).astype(np.int64) * block_size
    lens = np.full(n_full, block_size, dtype=np.int64)
    tail = o + n_full * block_size
    edges = [(s, e - s) for s, e in ((0, o), (tail, n_cells)) if e > s]
    if edges:
        starts = np.concatenate([starts, [s for s, _ in edges]]).astype(np.int64)
        lens = np.concatenate([lens, [n for _, n in edges]]).astype(np.int64)
    offs = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
    pos = np.repeat(starts, lens) + offs
    within = np.lexsort((rng.random(n_cells), np.repeat(np.arange(len(starts)), lens)))
    return pos[within]


def shard_order(order: np.ndarray, shard: int, n_shards: int, uneven: str = "drop", block_size: int = 1) -> np.ndarray:
    """Shard ``shard`` of ``n_shards`` of an epoch order, dealt in whole blocks; all shards equal-sized.

    Parameters
    ----------
    order : numpy.ndarray of int64
        An epoch order (:func:`epoch_order` with the same ``block_size``).
    shard, n_shards : int
        ``shard = rank * num_workers + worker``; ``n_shards = world_size * num_workers``.
    uneven : {"drop", "pad"}
        How shards are made equal when the blocks do not divide evenly (``n_shards > 1``).
        ``drop``: only the first ``n_shards * (len(order) // (block_size * n_shards))`` whole
        blocks of the order are dealt; the rest of the epoch (fewer than ``n_shards + 1`` blocks:
        mostly the edge blocks, whose cells change every epoch, see :func:`epoch_order`) is left
        out. ``pad``: every block is dealt and each shard is extended with its own first cells
        (cycled) to the longest shard's length, so a few cells are seen twice. With barely more
        cells than ``block_size * n_shards`` a shard may own a single short block (cycled to a full
        block) or none (filled with the order's first cells): cells are then seen several times.
    block_size : int
        The order's block size: consecutive chunks of ``block_size`` positions are dealt
        round-robin (shard ``k`` takes chunks ``k, k + n_shards, ...``), so a shard's IO batch
        reads runs of ``block_size`` consecutive cells whatever the number of shards (dealing
        single cells gave runs of ~1 cell at 8 shards).

    Returns
    -------
    numpy.ndarray of int64
        Shape ``(block_size * (len(order) // (block_size * n_shards)),)`` for drop, ``len(order)``
        for one shard.

    Raises
    ------
    AtlasmixError
        ``shard`` out of range or ``uneven`` not drop/pad.
    """
    if not 0 <= shard < n_shards:
        raise AtlasmixError(f"shard {shard} out of range for {n_shards} shards")
    if uneven not in ("drop", "pad"):
        raise AtlasmixError(f"uneven must be 'drop' or 'pad', got {uneven!r}")
    if n_shards == 1:
        return order
    b = max(1, int(block_size))
    n = len(order)
    if uneven == "drop":
        per = n // (b * n_shards)  # whole blocks per shard
        chunks = order[: per * b * n_shards].reshape(per * n_shards, b) if per else np.zeros((0, b), order.dtype)
        return chunks[shard::n_shards].reshape(-1)
    n_chunks = -(-n // b)
    mine = [order[c * b:(c + 1) * b] for c in range(shard, n_chunks, n_shards)]
    seq = np.concatenate(mine) if mine else order[:0]
    longest = shard_length(n, n_shards, "pad", b)
    if len(seq) < longest:
        seq = np.concatenate([seq, np.resize(seq if len(seq) else order, longest - len(seq))])
    return seq


def shard_length(n_cells: int, n_shards: int, uneven: str = "drop", block_size: int = 1) -> int:
    """Cells per shard and epoch under :func:`shard_order` (the same for every shard)."""
    if n_shards == 1:
        return int(n_cells)
    b = max(1, int(block_size))
    if uneven == "drop":
        return b * (n_cells // (b * n_shards))
    n_chunks = -(-n_cells // b)
    if n_chunks == 0:
        return 0
    last = n_cells - (n_chunks - 1) * b
    count = -(-n_chunks // n_shards)  # shard 0 has the most chunks
    return count * b - ((b - last) if (n_chunks - 1) % n_shards == 0 else 0)


def io_batch_permutation(n: int, seed: int, epoch: int, shard: int, io_index: int, shuffle: bool = True) -> np.ndarray:
    """The in-memory shuffle of one IO batch of ``n`` cells (rows in joinid order): minibatch ``j``
    is rows ``perm[j * batch_size:(j + 1) * batch_size]``.

    Returns
    -------
    numpy.ndarray of int64, shape (n,)
        A permutation from ``default_rng([seed, epoch, shard, io_index])``, or ``arange(n)`` without
        ``shuffle``.
    """
    if shuffle:
        return np.random.default_rng([seed, epoch, shard, io_index]).permutation(n)
    return np.arange(n)


# ---------------------------------------------------------------------------------------------- entropy
def _entropy(codes: np.ndarray, n_categories: int) -> float:
    p = np.bincount(codes, minlength=n_categories).astype(np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log2(p)).sum())


def shuffle_entropy(batches: Sequence[np.ndarray], seed: int = 0, n_categories: int | None = None) -> dict[str, float]:
    """Per-minibatch covariate entropy of a loader against i.i.d. sampling of the same cells.

    Parameters
    ----------
    batches : sequence of numpy.ndarray of int
        The covariate codes (e.g. ``dataset_id``) of each minibatch, in order.
    seed : int
        Seed of the i.i.d. reference: the same codes, uniformly permuted and cut into minibatches
        of the same sizes.
    n_categories : int, optional
        Default: max code + 1.

    Returns
    -------
    dict
        ``entropy_bits`` (mean Shannon entropy, bits, over minibatches), ``iid_entropy_bits`` (the
        same for the i.i.d. reference), ``ratio`` (entropy / i.i.d.; 1 = as good as i.i.d., a loader
        that serves one dataset at a time gives ~0), ``n_batches``.
    """
    batches = [np.asarray(b, dtype=np.int64).ravel() for b in batches if len(b)]
    if not batches:
        return {"entropy_bits": 0.0, "iid_entropy_bits": 0.0, "ratio": float("nan"), "n_batches": 0}
    allc = np.concatenate(batches)
    k = int(n_categories or allc.max() + 1)
    ent = float(np.mean([_entropy(b, k) for b in batches]))
    perm = np.random.default_rng(seed).permutation(allc)
    cuts = np.cumsum([len(b) for b in batches])[:-1]
    iid = float(np.mean([_entropy(b, k) for b in np.split(perm, cuts)]))
    return {"entropy_bits": ent, "iid_entropy_bits": iid, "ratio": ent / iid if iid > 0 else float("nan"),
            "n_batches": len(batches)}


