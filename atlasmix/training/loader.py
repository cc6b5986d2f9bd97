"""Stream the cells of a resolved mixture from the store as shuffled torch minibatches.

How an epoch is ordered
-----------------------
The cells of one manifest split (``cells``: unique soma_joinids, sorted) are cut into *locality
blocks* of ``block_size`` consecutive cells (store order), with block boundaries at a random phase
each epoch. Epoch ``e`` draws a fresh permutation of the full blocks from
``numpy.random.default_rng([seed, e])`` (the two shorter edge blocks go last) -- no offline
pre-shuffle, a new order every epoch, the same order for the same (seed, epoch). The permuted cell
sequence is then

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
3. Each shard is cut into *IO batches* of ``io_batch_size`` cells (a multiple of ``batch_size``).
   The joinids of one IO batch are sorted and read in one go -- from the store's x layout
   (:mod:`atlasmix.store.xlayout`: one byte range per run of consecutive cells, decoded in the read
   threads with the GIL released, projected onto the gene axis in the same pass) or, where a
   dataset has no layout (``s3://`` stores; stores made before it, until ``atlasmix store
   optimize``), from ``ms/RNA/X/raw`` with point coordinates on the cell axis only (genes are
   selected afterwards). ``x_source`` picks one explicitly. The IO batch is then shuffled in memory
   with ``default_rng([seed, e, k, io_index])`` and cut into minibatches.

With ``block_size=1`` every minibatch is a uniformly random subset of the corpus (i.i.d. quality);
``block_size > 1`` trades a little shuffle quality for read locality (a random cell costs a whole
TileDB data tile decoded). Measured on a simulated store with the old 2^17-nonzero data tiles
(~64 cells each at 2k nonzeros per cell; 1,700 nonzeros per cell, 2 CPU cores), reading 16,384
cells took 5.3 s with ``block_size=1``, 2.0 s with 64 (the default), 1.15 s with 512 and 0.9 s for
a contiguous run; with the current 2^13-nonzero tiles blocks of 64 read as fast as a contiguous
run (:mod:`atlasmix.store.schema`). After the in-memory
shuffle a minibatch holds cells from ``io_batch_size / block_size`` blocks, so per-batch
``dataset_id`` entropy stays at the i.i.d. level while ``io_batch_size / block_size >> batch_size``;
:func:`shuffle_entropy` measures it.

Prefetch and memory
-------------------
A background thread assembles minibatches (CPU tensors) into a bounded queue; it reads IO batches
with a pool of ``io_threads`` threads (TileDB releases the GIL), at most ``prefetch_io`` IO batches
ahead, and keeps at most 4 ready minibatches. Memory held is O((prefetch_io + io_threads + 1) x
io_batch_size x nonzeros per cell x ~20 bytes) for TileDB's arrow results and the CSR, plus 4
minibatches (dense on the CPU: 4 x batch_size x genes x 4 bytes), independent of corpus size, plus
the per-cell index arrays (joinids and covariate codes: ~8 bytes + 4 bytes per covariate per
manifest cell). Dense CPU minibatches are gathered, densified and summed in one compiled pass into
at most 8 pooled (batch_size, genes) buffers, each reused only once no minibatch (or view of one)
holds it (:mod:`atlasmix.training._dense`): a whole-transcriptome minibatch is 81 MB, and
allocating it fresh every time cost more than reading its counts. By default no processes are
used: each epoch opens X once per read thread before its first read and closes it after its last
(opens and closes of all loaders one at a time, never while this loader reads: concurrent opens
and reads have crashed tiledbsoma). For DataLoader worker processes wrap the loader in :class:`MixtureIterableDataset` and use
``multiprocessing_context="spawn"`` (forking after TileDB is opened hangs): the loader pickles by
store URI, and each worker serves its interleaved (rank, worker) shard.

GPU path
--------
On a CUDA device the host does no per-minibatch work on the counts: each IO batch (sorted CSR,
``io_batch_size`` cells) is pinned and copied to the GPU once, on a side stream, by the prefetch
thread (``indices`` int32, ``data`` float32: 8 bytes per nonzero, ~1 GiB of GPU memory for 65,536
cells at 2,000 nonzeros per cell; the IO batch being cut plus those of the <= 4 queued minibatches
are resident, at most 3). A minibatch is then
its row indices into that IO batch: the consumer gathers the rows' nonzeros (``repeat_interleave``
with host-known output sizes, so no device-to-host synchronisation) and scatters them into a zeroed
dense (B, genes) float32 tensor. Library sizes and obs codes are computed per IO batch on the host
(a few bytes per cell). Per-minibatch host cost is O(batch_size), not O(nonzeros).

Read processes
--------------
The read of an IO batch (TileDB decode, var joinid -> column mapping, CSR assembly) competes for the
GIL with the training loop when it runs in threads of the training process. With
``read_processes=N`` it runs in N processes started with ``spawn`` (forking after TileDB is
opened hangs), kept for the loader's lifetime (:meth:`MixtureLoader.close`). A worker writes the
CSR's three arrays into ``multiprocessing.shared_memory`` blocks and returns their names; the
training process maps them without a copy, uses them (pins and copies them to the GPU, or gathers
minibatches on the CPU) and unlinks them. Order, shuffle and resume are unchanged: every order is
still drawn in the training process. Memory: each worker holds one read's TileDB buffers; at most
``prefetch_io + 1`` IO batches are in shared memory at a time.

X cache
-------
``x_cache=DIR`` (opt-in, older than the x layout) reads from a per-mixture projection of X onto
the loader's cells x gene axis (:mod:`atlasmix.training.xcache`), built once by streaming the store.
Since the store keeps its own read-optimised layout the default path needs no such copy; the cache
only still pays for very small gene axes (see ``benchmarks/bench_loader.py``).

Resume
------
:meth:`MixtureLoader.state_dict` records ``epoch`` and ``batches_done`` (minibatches handed to the
consumer this epoch); after :meth:`MixtureLoader.load_state_dict` the next iteration continues
exactly with the next minibatch of that epoch (same cells, same order) because every order is a
pure function of (seed, epoch, shard, IO batch index).
"""

from __future__ import annotations

import contextlib
import math
import queue
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp
import torch

from atlasmix._ids import unique_ids
from atlasmix._prefetch import prefetch
from atlasmix.errors import AtlasmixError
from atlasmix.mixing.genes import mixture_genes
from atlasmix.store import schema as S
from atlasmix.store import xlayout
from atlasmix.training._dense import DenseBufferPool, gather_dense
# the data flow, one file each: order -> read -> (assemble: _dense and the methods below) -> dataset
from atlasmix.training.memory import InMemoryX, cap_bytes, load_split
from atlasmix.training.order import epoch_order, shard_length, shard_order, shuffle_entropy
from atlasmix.training.read import (_OPEN_LOCK, _attach, _cancel_pending, _close_handles, _free_result,
                                    _release, _worker_init, _worker_read, gene_columns, open_source, read_csr)

__all__ = ["MixtureLoader", "MixtureIterableDataset", "epoch_order", "shard_order", "shard_length",
           "shuffle_entropy", "gene_columns", "read_csr", "open_source", "LIBRARY_SOURCES", "X_SOURCES"]

LIBRARY_SOURCES = ("counts", "total_counts")
X_SOURCES = ("auto", "layout", "tiledb")


class MixtureLoader:
    """Minibatches of one split of a mixture, streamed from the store.

    Parameters
    ----------
    store : atlasmix.store.Store
    manifest : path, pyarrow.Table or numpy.ndarray
        A manifest ``.parquet`` (read with :func:`atlasmix.mixing.read_manifest`, which refuses a
        manifest of another store or of a changed store state), its table (``soma_joinid``,
        ``split``), or plain cell joinids (then ``split`` is ignored).
    split : str
        ``train``, ``validation`` or ``eval`` (cells of several eval sets are served once).
    genes : sequence of str, optional
        The gene axis (see :func:`mixture_genes`); default genes measured in every dataset.
    var_joinids : numpy.ndarray of int64, optional
        The gene axis as var joinids (overrides ``genes``), e.g. a trained model's genes.
    batch_size : int
        Cells per minibatch.
    io_batch_size : int
        Cells per store read; rounded up to a multiple of ``batch_size``.
    io_batch_bytes : int, optional
        Bound the reads in bytes instead: cells per read become ``io_batch_bytes / (8 x mean
        nonzeros per cell of the split)`` (obs ``n_genes_by_counts``; 8 bytes per nonzero: the
        float32 value and int32 column of the whole-row CSR a read decodes), rounded down to a
        multiple of ``batch_size``, at least ``batch_size`` and at most ``io_batch_size``. A read
        holds ~``io_batch_size / block_size`` random blocks, so its size stays close to the mean;
        memory in flight is then ~``(prefetch_io + 1) x io_batch_bytes`` whatever the sequencing
        depth of the mixture.
    block_size : int
        Locality block (consecutive store cells kept together in the permutation), see module doc.
    shuffle : bool
        False: store order, no permutation (inference, validation).
    seed : int
    drop_last : bool
        Drop each shard's last short minibatch.
    obs_columns : sequence of str
        obs columns delivered as int64 codes (shape (B,)); categories are the sorted distinct
        values over *all* the manifest's cells (every split), so train and validation agree; see
        :attr:`categories`.
    library : {"counts", "total_counts"}
        ``library_size`` of a minibatch: ``counts`` = sum of the counts over the loader's gene axis
        (what a model of these genes sees); ``total_counts`` = obs ``total_counts`` (all genes the
        source measured, computed at ingest).
    device : str or torch.device
        Where ``X`` and ``library_size`` are placed. On CUDA the CSR parts are pinned, copied
        asynchronously and densified on the GPU.
    sparse : bool
        Deliver ``X`` as a ``torch.sparse_csr_tensor`` instead of dense.
    rank, world_size : int
        DDP position (default: from ``torch.distributed`` when initialised, else 0 / 1).
    worker, num_workers : int
        Position among data workers of one rank (multi-process loading: each worker builds its own
        loader with its ``worker`` index).
    uneven : {"drop", "pad"}
        Equalising shards (see :func:`shard_order`).
    prefetch_io : int
        IO batches read ahead of the consumer (bounds memory).
    io_threads : int
        Threads issuing TileDB reads.
    read_buffer_bytes : int or None
        TileDB's ``soma.init_buffer_bytes`` for X reads (per read; larger results arrive in
        pieces); None keeps the store context's setting (tiledbsoma's default is larger).
    gather_on_device : bool or None
        Copy each IO batch's CSR to ``device`` once (pinned memory, a side CUDA stream, in the
        prefetch thread) and cut the shuffled minibatches out of it *on the device* (row gather +
        densify: a handful of kernels per minibatch). None (default): on for CUDA devices, off on
        the CPU, where the prefetch thread gathers and densifies. See "GPU path" in the module doc.
    read_processes : int
        0 (default): IO batches are read by ``io_threads`` threads of this process. N > 0: by a pool
        of N spawned worker processes (each opens the store once), which hand the CSR back through
        shared memory; the training process then only copies it to the device. See "Read processes".
    x_cache : str or pathlib.Path, optional
        A local folder: read X from a projection of the store onto this loader's cells x gene axis
        (:mod:`atlasmix.training.xcache`), built there on first use (about one epoch's read) and
        reused by later epochs and runs with the same store state, cells and genes. A gene subset
        (e.g. 2,000 HVGs) then costs only its own nonzeros per epoch instead of the whole
        transcriptome's. Same minibatches as without it.
    x_cache_format : {"tiledb", "h5"}
        The x cache's format: compressed TileDB (default) or uncompressed CSR in HDF5 (~4.7x the
        disk space, read as plain slices: faster, also for whole-transcriptome axes).
    x_cache_max_bytes : int, optional
        Size cap of the ``x_cache`` folder (default :func:`atlasmix.training.xcache.cap_bytes`:
        64 GiB or ``ATLASMIX_X_CACHE_MAX_GB``); least recently used projections not in use are
        deleted to fit it, and a projection larger than it is refused.
    x_source : {"auto", "layout", "tiledb"}
        Where X is read from (without ``x_cache``): ``auto`` (default) the store's x layout when
        every dataset of the split has one (:mod:`atlasmix.store.xlayout`), else TileDB X;
        ``layout`` requires the layout; ``tiledb`` always reads ``ms/RNA/X/raw``. The minibatches
        are the same either way.
    in_memory : {False, "auto", True}
        Hold the split's cells on the gene axis in memory (:mod:`atlasmix.training.memory`): read
        once in store order at the first iteration, then every IO batch is a gather from RAM, as
        scvi-tools trains from an in-memory AnnData. The minibatches are the same as streamed.
        ``"auto"``: only for a loader that is one shard (no DDP ranks or workers) and whose split
        fits ``in_memory_max_bytes`` (estimated from a sample read, enforced while reading: over
        it, the loader streams); ``True``: always (every shard holds the whole split); ``False``
        (default): stream. :func:`atlasmix.training.ldvae.train_ldvae` uses ``"auto"``.
    in_memory_max_bytes : int, optional
        Cap for ``in_memory="auto"`` (default :func:`atlasmix.training.memory.cap_bytes`: 2 GiB or
        ``ATLASMIX_IN_MEMORY_MAX_GB``); 8 bytes per nonzero on the gene axis + 16 per cell.
    augment : object, optional
        A count augmentation applied to every IO batch as it arrives, before minibatches are cut
        from it (so every path -- dense, sparse, GPU -- and the ``counts`` library size see it):
        ``augment.csr(csr, soma_joinids, epoch) -> csr``, e.g. read-depth-aware downsampling
        (:class:`atlasmix.training.rda.ReadDepthAugment`).

    Yields
    ------
    dict
        ``X`` float32 (B, n_genes) on ``device`` (dense, or CSR with ``sparse=True``);
        ``library_size`` float32 (B, 1) on ``device``; ``soma_joinid`` int64 (B,); one int64 (B,)
        tensor of codes per ``obs_columns`` entry.

    Raises
    ------
    AtlasmixError
        Empty split, bad options, manifest of another store, ``x_source="layout"`` without a layout.
    """

    def __init__(self, store, manifest: Any, split: str = "train", *, genes: Sequence[str] | None = None,
                 var_joinids: np.ndarray | None = None, batch_size: int = 1024, io_batch_size: int = 16384,
                 block_size: int = 64, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 obs_columns: Sequence[str] = ("dataset_id",), library: str = "counts",
                 device: str | torch.device = "cpu", sparse: bool = False, rank: int | None = None,
                 world_size: int | None = None, worker: int = 0, num_workers: int = 1, uneven: str = "drop",
                 prefetch_io: int = 2, io_threads: int = 2, categories: dict[str, list[str]] | None = None,
                 read_buffer_bytes: int | None = None, gather_on_device: bool | None = None,
                 read_processes: int = 0, x_cache: str | Path | None = None, x_cache_format: str = "tiledb",
                 x_source: str = "auto", x_cache_max_bytes: int | None = None,
                 io_batch_bytes: int | None = None, in_memory: bool | str = False,
                 in_memory_max_bytes: int | None = None, augment: Any = None):
        if batch_size < 1 or io_batch_size < 1 or block_size < 1:
            raise AtlasmixError("batch_size, io_batch_size and block_size must be >= 1")
        if io_batch_bytes is not None and io_batch_bytes < 1:
            raise AtlasmixError(f"io_batch_bytes must be >= 1, got {io_batch_bytes}")
        if library not in LIBRARY_SOURCES:
            raise AtlasmixError(f"library must be one of {LIBRARY_SOURCES}, got {library!r}")
        if uneven not in ("drop", "pad"):
            raise AtlasmixError(f"uneven must be 'drop' or 'pad', got {uneven!r}")
        if in_memory not in (False, True, "auto"):
            raise AtlasmixError(f"in_memory must be False, True or 'auto', got {in_memory!r}")
        if x_source not in X_SOURCES:
            raise AtlasmixError(f"x_source must be one of {X_SOURCES}, got {x_source!r}")
        if rank is None or world_size is None:
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = (torch.distributed.get_rank() if dist else 0) if rank is None else rank
            world_size = (torch.distributed.get_world_size() if dist else 1) if world_size is None else world_size
        if not (0 <= rank < world_size and 0 <= worker < num_workers):
            raise AtlasmixError(f"rank {rank}/{world_size}, worker {worker}/{num_workers} out of range")
        self.store = store
        self.split = split
        self.batch_size = int(batch_size)
        self.io_batch_size = int(math.ceil(io_batch_size / batch_size) * batch_size)
        self.block_size = int(block_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.obs_columns = list(obs_columns)
        self.library = library
        self.device = torch.device(device)
        self.sparse = bool(sparse)
        self.rank, self.world_size, self.worker, self.num_workers = int(rank), int(world_size), int(worker), int(num_workers)
        self.uneven = uneven
        self.prefetch_io = max(1, int(prefetch_io))
        self.io_threads = max(1, int(io_threads))
        self.read_buffer_bytes = read_buffer_bytes
        self.gather_on_device = gather_on_device
        self.read_processes = max(0, int(read_processes))
        self.x_cache = x_cache
        self.x_cache_format = x_cache_format
        self.x_cache_max_bytes = x_cache_max_bytes
        self.x_source = x_source
        self._x_cache_uri: str | None = None
        self.in_memory = "auto" if isinstance(in_memory, str) else bool(in_memory)
        self.in_memory_max_bytes = in_memory_max_bytes
        self._memory: InMemoryX | None = None
        self._memory_tried = False
        self._pool = None
        self.augment = augment
        self._order_cache: dict = {}
        self.epoch = 0
        self.batches_done = 0
        self.manifest_sha256: str | None = None

        all_ids, self.cells = self._cells(manifest, split)
        if len(self.cells) == 0:
            raise AtlasmixError(f"the manifest has no {split!r} cells")
        self.var_joinids = (np.asarray(var_joinids, dtype=np.int64) if var_joinids is not None
                            else mixture_genes(store, all_ids, genes))
        var_index = store.var().index
        self._n_var_store = int(var_index.max()) + 1 if len(var_index) else 0
        if len(np.unique(self.var_joinids)) != len(self.var_joinids):
            raise AtlasmixError("the gene list names a gene twice")
        self.io_batch_bytes = io_batch_bytes
        self._read_obs(all_ids, categories or {})
        # the store's x layout (atlasmix.store.xlayout) when every dataset of the split has one
        self._layout_datasets = (xlayout.datasets_for(store, self.cells)
                                 if x_source != "tiledb" and x_cache is None else None)
        if x_source == "layout" and self._layout_datasets is None:
            raise AtlasmixError("x_source='layout' but a dataset of this split has no x layout "
                                "(run `atlasmix store optimize`, or use an x_source of 'auto')")

    # -------------------------------------------------------------- setup
    def _cells(self, manifest: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
        if isinstance(manifest, (str, Path)):
            from atlasmix.mixing import read_manifest

            table, side = read_manifest(manifest, store=self.store)
            self.manifest_sha256 = side["manifest"]["sha256"]
            manifest = table
        if isinstance(manifest, pa.Table):
            ids = manifest["soma_joinid"].to_numpy()
            is_split = pc.equal(manifest["split"].cast(pa.string()), split).to_numpy(zero_copy_only=False)
            return unique_ids(ids), unique_ids(ids[is_split])
        ids = unique_ids(manifest)
        return ids, ids

    def _read_obs(self, all_ids: np.ndarray, categories: dict[str, list[str]]) -> None:
        cols = list(self.obs_columns) + (["total_counts"] if self.library == "total_counts" else [])
        if self.io_batch_bytes is not None:
            cols.append("n_genes_by_counts")
        obs = self.store.obs(cols, joinids=all_ids)  # the manifest's rows only: memory follows the manifest
        jid = obs["soma_joinid"].to_numpy()
        pos_all = np.searchsorted(jid, all_ids)
        if np.any(pos_all >= len(jid)) or np.any(jid[np.minimum(pos_all, len(jid) - 1)] != all_ids):
            raise AtlasmixError("the manifest names cells that are not (complete) in this store")
        pos = np.searchsorted(jid, self.cells)
        self.categories: dict[str, list[str]] = {}
        self.codes: dict[str, np.ndarray] = {}
        for c in self.obs_columns:
            # arrow's dictionary encoding: one O(n) pass, not a sort of n strings (10M cells: seconds)
            enc = pc.dictionary_encode(obs[c], null_encoding="encode").combine_chunks()
            values = enc.dictionary.to_pylist()
            idx = enc.indices.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
            seen = np.bincount(idx[pos_all], minlength=len(values)) > 0
            cats = list(categories.get(c) or sorted(values[i] for i in np.flatnonzero(seen)))
            lut = {v: i for i, v in enumerate(cats)}
            sub = idx[pos]
            here = np.flatnonzero(np.bincount(sub, minlength=len(values)) > 0)
            missing = [values[i] for i in here if values[i] not in lut]
            if missing:
                raise AtlasmixError(f"obs {c} value {missing[0]!r} is not among the given categories")
            code_of = np.full(len(values), -1, dtype=np.int32)
            for i in here:
                code_of[i] = lut[values[i]]
            self.categories[c] = cats
            self.codes[c] = code_of[sub]  # 4 B per cell
        self.total_counts = (obs["total_counts"].to_numpy()[pos].astype(np.float32)
                             if self.library == "total_counts" else None)
        if self.io_batch_bytes is not None:  # bound reads in bytes: cells per read from the mean row size
            nnz = float(np.mean(obs["n_genes_by_counts"].to_numpy()[pos]))
            fit = int(self.io_batch_bytes // max(8.0 * nnz, 1.0)) // self.batch_size * self.batch_size
            self.io_batch_size = min(self.io_batch_size, max(self.batch_size, fit))

    # -------------------------------------------------------------- sizes / order
    @property
    def n_obs(self) -> int:
        """Cells of the split (all shards)."""
        return int(len(self.cells))

    @property
    def n_vars(self) -> int:
        return int(len(self.var_joinids))

    @property
    def shard_size(self) -> int:
        """Cells this shard serves per epoch."""
        k = self.world_size * self.num_workers
        if k == 1:
            return self.n_obs
        b = self.block_size if self.shuffle else 1
        return shard_length(self.n_obs, k, self.uneven, b)

    def __len__(self) -> int:
        """Minibatches per epoch for this shard (the same on every shard)."""
        m = self.shard_size
        return m // self.batch_size if self.drop_last else -(-m // self.batch_size)

    def shard_positions(self, epoch: int | None = None) -> np.ndarray:
        """Positions into :attr:`cells` served by this shard in ``epoch``, in serving order before the
        in-memory shuffle of each IO batch (int64, shape (shard_size,))."""
        e = self.epoch if epoch is None else epoch
        cache = self._order_cache  # shared with with_shard copies: one order per process and epoch
        key = (e, self.seed, self.block_size, self.shuffle)
        order = cache.get(key)
        if order is None:
            order = epoch_order(self.n_obs, self.seed, e, self.block_size, self.shuffle)
            if self.n_obs < 2**31:
                order = order.astype(np.int32)  # 4 B per manifest cell
            cache.clear()
            cache[key] = order
        return shard_order(order, self.rank * self.num_workers + self.worker, self.world_size * self.num_workers,
                           self.uneven, self.block_size if self.shuffle else 1)

    def with_shard(self, rank: int, world_size: int, worker: int = 0, num_workers: int = 1,
                   uneven: str | None = None) -> "MixtureLoader":
        """A copy of this loader serving another shard (shares the cell and code arrays; no store reads).

        Raises
        ------
        AtlasmixError
            Position out of range.
        """
        import copy

        if not (0 <= rank < world_size and 0 <= worker < num_workers):
            raise AtlasmixError(f"rank {rank}/{world_size}, worker {worker}/{num_workers} out of range")
        other = copy.copy(self)
        other.rank, other.world_size, other.worker, other.num_workers = rank, world_size, worker, num_workers
        other.uneven = uneven or self.uneven
        if other.uneven not in ("drop", "pad"):
            raise AtlasmixError(f"uneven must be 'drop' or 'pad', got {other.uneven!r}")
        other.epoch, other.batches_done = self.epoch, 0
        return other

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first minibatch at the next iteration."""
        self.epoch, self.batches_done = int(epoch), 0

    # -------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Resume point: ``epoch``, ``batches_done`` (minibatches consumed this epoch) and the options
        that determine the order (checked on load)."""
        return {"epoch": self.epoch, "batches_done": self.batches_done, "seed": self.seed, "n_obs": self.n_obs,
                "batch_size": self.batch_size, "io_batch_size": self.io_batch_size, "block_size": self.block_size,
                "rank": self.rank, "world_size": self.world_size, "worker": self.worker,
                "num_workers": self.num_workers, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the next iteration continues with the next minibatch.

        Raises
        ------
        AtlasmixError
            The state was saved by a loader with another order (seed, cells, sizes, sharding).
        """
        for k in ("seed", "n_obs", "batch_size", "io_batch_size", "block_size", "rank", "world_size", "worker",
                  "num_workers", "shuffle"):
            if k in state and state[k] != getattr(self, k):
                raise AtlasmixError(f"loader state has {k}={state[k]}, this loader {getattr(self, k)}")
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])

    # -------------------------------------------------------------- reading
    def ensure_x_cache(self, progress: bool = False) -> dict:
        """Build (or find) this loader's x cache projection now; see ``x_cache``.

        Iteration does this on first use; call it explicitly to build before timing or before
        starting DDP ranks (rank 0 builds, the others then find it).

        Returns
        -------
        dict
            The projection's metadata (:func:`atlasmix.training.xcache.ensure_x_cache`).

        Raises
        ------
        AtlasmixError
            The loader has no ``x_cache`` folder, or the projection is unusable.
        """
        from atlasmix.training.xcache import ensure_x_cache

        if self.x_cache is None:
            raise AtlasmixError("this loader has no x_cache folder")
        uri, meta = ensure_x_cache(self.store, self.cells, self.var_joinids, self.x_cache, fmt=self.x_cache_format,
                                   progress=progress, max_bytes=self.x_cache_max_bytes)
        self._x_cache_uri = uri
        return meta

    def _read(self, X, ids_sorted: np.ndarray, col_of: np.ndarray | None) -> sp.csr_matrix:
        """One TileDB read of cells ``ids_sorted`` x the gene axis, as CSR (see :func:`read_csr`)."""
        return read_csr(X, ids_sorted, col_of, self.n_vars)

    def _row_keys(self, positions: np.ndarray) -> np.ndarray:
        """Rows of X for cells at ``positions``: their soma_joinids, or the positions themselves in an
        x cache projection (whose rows are this loader's cells in order). int64."""
        return positions.astype(np.int64) if self._x_cache_uri else self.cells[positions]

    @property
    def in_memory_bytes(self) -> int:
        """Bytes of the split held in memory (0 when it streams); see ``in_memory``."""
        return self._memory.nbytes if self._memory is not None else 0

    def _col_of(self) -> np.ndarray | None:
        """var joinid -> column of the gene axis (-1: not on it), covering every var joinid of the
        store; None when the gene axis is the whole store var in joinid order (no mapping needed)."""
        n = self._n_var_store
        if len(self.var_joinids) == n and np.array_equal(self.var_joinids, np.arange(n)):
            return None
        return gene_columns(self.var_joinids, n)

    def _io_batch(self, X, positions: np.ndarray, shard: int, io_index: int, col_of: np.ndarray | None):
        """Read one IO batch in store order and draw its in-memory shuffle.

        Returns (positions, csr, perm): the sorted rows' positions and counts; minibatch ``j`` is
        sorted rows ``perm[j * batch_size:(j + 1) * batch_size]`` (gathered per minibatch, so the IO
        batch is never copied whole)."""
        ids = self._row_keys(positions)
        order = np.argsort(ids, kind="stable")
        m = self._read(X, ids[order], col_of) if X is not None else None
        if self.shuffle:
            perm = np.random.default_rng([self.seed, self.epoch, shard, io_index]).permutation(len(ids))
        else:
            perm = np.arange(len(ids))
        return positions[order], m, perm

    def _batch_obs(self, pos: np.ndarray, lib: np.ndarray) -> dict[str, Any]:
        """A minibatch's per-cell fields: ``soma_joinid``, ``library_size`` (``lib`` as (B, 1)) and
        the obs codes of the cells at positions ``pos``."""
        out: dict[str, Any] = {"soma_joinid": torch.from_numpy(self.cells[pos]),
                               "library_size": torch.from_numpy(lib.reshape(-1, 1))}
        for c in self.obs_columns:
            out[c] = torch.from_numpy(self.codes[c][pos].astype(np.int64))
        return out

    def _dense_batch(self, pos: np.ndarray, rows: np.ndarray, m: sp.csr_matrix, pool: DenseBufferPool
                     ) -> dict[str, Any]:
        """A dense CPU minibatch: rows ``rows`` of the IO batch ``m``, gathered and densified in one
        pass into a reused buffer (run in the prefetch thread; see :mod:`atlasmix.training._dense`)."""
        buf, clear = pool.take(len(rows))
        lib = gather_dense(m.indptr, m.indices, m.data, rows, buf, clear=clear)
        out = self._batch_obs(pos, lib if self.library == "counts" else self.total_counts[pos])
        out["X"] = torch.from_numpy(buf)
        return out

    def _to_batch(self, pos: np.ndarray, m: sp.csr_matrix) -> dict[str, Any]:
        """A CSR minibatch (``m``: its rows) for :meth:`_finish` to move and build X on the device."""
        if self.library == "counts":
            lib = np.asarray(m.sum(axis=1), dtype=np.float32)
        else:
            lib = self.total_counts[pos]
        out = self._batch_obs(pos, lib)
        out["_csr"] = (torch.from_numpy(m.indptr.astype(np.int64)), torch.from_numpy(m.indices.astype(np.int64)),
                       torch.from_numpy(m.data))
        if self.device.type == "cuda":
            out["_csr"] = tuple(t.pin_memory() for t in out["_csr"])
        return out

    def _gathers_on_device(self) -> bool:
        if self.gather_on_device is None:
            return self.device.type == "cuda"
        return bool(self.gather_on_device)

    def _io_to_device(self, m: sp.csr_matrix) -> dict[str, Any]:
        """One IO batch's CSR on the device (run in the prefetch thread; see "GPU path")."""
        if self.library == "counts":
            lib = np.asarray(m.sum(axis=1), dtype=np.float32).reshape(-1)
        else:
            lib = None
        host = (torch.from_numpy(m.indptr.astype(np.int64, copy=False)),
                torch.from_numpy(m.indices.astype(np.int32, copy=False)), torch.from_numpy(m.data))
        if self.device.type == "cuda":
            if getattr(self, "_copy_stream", None) is None:
                self._copy_stream = torch.cuda.Stream(device=self.device)
            with torch.cuda.stream(self._copy_stream):
                dev = tuple(t.pin_memory().to(self.device, non_blocking=True) for t in host)
            self._copy_stream.synchronize()  # the copies are done before a consumer sees them
        else:  # a copy: the host arrays may be shared-memory views released after this call
            dev = tuple(t.to(self.device, copy=True) for t in host)
        return {"indptr": dev[0], "indices": dev[1], "data": dev[2], "lens": np.diff(m.indptr), "lib": lib}

    def _to_device_batch(self, pos: np.ndarray, rows: np.ndarray, dev_io: dict[str, Any]) -> dict[str, Any]:
        lib = dev_io["lib"][rows] if dev_io["lib"] is not None else self.total_counts[pos]
        out = self._batch_obs(pos, np.ascontiguousarray(lib, dtype=np.float32))
        lens = dev_io["lens"][rows]
        out["_dev"] = (dev_io, torch.from_numpy(rows.astype(np.int64)), torch.from_numpy(lens.astype(np.int64)),
                       int(lens.sum()))
        return out

    def _gather_device(self, b: dict[str, Any]) -> dict[str, Any]:
        """Cut a minibatch out of a device-resident IO batch (see "GPU path")."""
        dev_io, rows, lens, total = b.pop("_dev")
        dev = self.device
        cuda = dev.type == "cuda"
        indptr, indices, data = dev_io["indptr"], dev_io["indices"], dev_io["data"]
        if cuda:  # allocated on the copy stream, used on this one: keep the allocator from reusing early
            cur = torch.cuda.current_stream(dev)
            for t in (indptr, indices, data):
                t.record_stream(cur)
        rows = rows.to(dev, non_blocking=cuda)
        lens = lens.to(dev, non_blocking=cuda)
        n = rows.shape[0]
        starts = indptr[rows]
        offs = torch.cumsum(lens, 0) - lens
        pos = torch.arange(total, device=dev) + torch.repeat_interleave(starts - offs, lens, output_size=total)
        cols, vals = indices[pos], data[pos]
        if self.sparse:
            new_ptr = torch.zeros(n + 1, dtype=torch.int64, device=dev)
            new_ptr[1:] = torch.cumsum(lens, 0)
            b["X"] = torch.sparse_csr_tensor(new_ptr, cols.to(torch.int64), vals, size=(n, self.n_vars))
        else:
            r = torch.repeat_interleave(torch.arange(n, device=dev), lens, output_size=total)
            X = torch.zeros((n, self.n_vars), dtype=torch.float32, device=dev)
            X.view(-1).index_put_((r * self.n_vars + cols.to(torch.int64),), vals)
            b["X"] = X
        b["library_size"] = b["library_size"].to(dev, non_blocking=cuda)
        return b

    def _finish(self, b: dict[str, Any]) -> dict[str, Any]:
        """Move a CPU batch to the device and build X there (dense or CSR)."""
        if "_dev" in b:
            return self._gather_device(b)
        if "_csr" not in b:  # dense on the CPU: built by the prefetch thread
            if self.device.type != "cpu":  # the device changed after the batch was made
                b["X"], b["library_size"] = b["X"].to(self.device), b["library_size"].to(self.device)
            return b
        indptr, indices, data = b.pop("_csr")
        n = len(indptr) - 1
        nb = self.device.type == "cuda"
        indptr, indices, data = (t.to(self.device, non_blocking=nb) for t in (indptr, indices, data))
        if self.sparse:
            b["X"] = torch.sparse_csr_tensor(indptr, indices, data, size=(n, self.n_vars))
        elif self.device.type == "cpu":
            X = torch.zeros((n, self.n_vars), dtype=torch.float32)
            rows = torch.repeat_interleave(torch.arange(n), indptr.diff())
            X[rows, indices] = data
            b["X"] = X
        else:
            b["X"] = torch.sparse_csr_tensor(indptr, indices, data, size=(n, self.n_vars)).to_dense()
        b["library_size"] = b["library_size"].to(self.device, non_blocking=nb)
        return b

    def _source(self) -> tuple[Any, np.ndarray | None, Any]:
        """Where X is read from: ``(x_uri, col_of, context)`` for :func:`open_source` / :meth:`_read`
        (the x cache is built first when the loader has one)."""
        if self.x_cache is not None and self._x_cache_uri is None:
            self.ensure_x_cache()
        x_uri = (("layout", self.store.uri, self._layout_datasets) if self._layout_datasets is not None
                 else self._x_cache_uri or f"{self.store.uri}/ms/{S.MEASUREMENT}/X/{S.X_LAYER}")
        col_of = None if self._x_cache_uri else self._col_of()
        ctx = self.store.context
        if self.read_buffer_bytes:  # TileDB result buffers per read (bigger results come in pieces)
            cfg = dict(ctx.tiledb_config)
            cfg["soma.init_buffer_bytes"] = str(int(self.read_buffer_bytes))
            ctx = ctx.replace(tiledb_config=cfg)
        return x_uri, col_of, ctx

    def _open(self, x_uri: Any, ctx: Any) -> list:
        """One X handle per read thread (the thread-safe layout reader: one shared by all)."""
        with _OPEN_LOCK:
            if isinstance(x_uri, tuple):
                return [open_source(x_uri)] * self.io_threads
            return [open_source(x_uri, ctx) for _ in range(self.io_threads)]

    def ensure_in_memory(self) -> bool:
        """Read the split into memory now if ``in_memory`` asks for it (see there); iteration does
        this on first use. Returns whether the split is held in memory.

        With ``in_memory="auto"``, a sample of up to 512 cells is read first and the split's size on
        the gene axis extrapolated from it; the read stops (and the loader streams) once the rows
        read pass the cap.
        """
        if self._memory is not None or self.in_memory is False or self._memory_tried:
            return self._memory is not None
        self._memory_tried = True
        auto = self.in_memory == "auto"
        if auto and self.world_size * self.num_workers > 1:
            return False  # each shard would hold the whole split
        cap = (self.in_memory_max_bytes if self.in_memory_max_bytes is not None else cap_bytes()) if auto else None
        x_uri, col_of, ctx = self._source()
        keys = self._row_keys(np.arange(self.n_obs))
        opened = self._open(x_uri, ctx)
        handles: queue.SimpleQueue = queue.SimpleQueue()
        for h in opened:
            handles.put(h)

        def read(k: np.ndarray) -> sp.csr_matrix:
            X = handles.get()
            try:
                return self._read(X, k, col_of)
            finally:
                handles.put(X)

        try:
            if cap is not None:
                rng = np.random.default_rng(self.seed)
                sample = np.sort(rng.choice(len(keys), min(len(keys), 512), replace=False))
                m = read(keys[sample])
                est = (8.0 * m.nnz / max(len(sample), 1) + 16.0) * len(keys)
                if est > cap:
                    return False
            self._memory = load_split(read, keys, self.n_vars, self.io_batch_size, self.io_threads, cap)
        finally:
            _close_handles(opened)
        return self._memory is not None

    def _batches(self, start_batch: int) -> Iterator[Any]:
        """This epoch's minibatches (before :meth:`_finish`) from ``start_batch`` on; run by :func:`prefetch`."""
        shard = self.rank * self.num_workers + self.worker
        seq = self.shard_positions()
        nb = len(self)
        if self.drop_last:
            seq = seq[: nb * self.batch_size]
        x_uri, col_of, ctx = self._source()
        first_io = (start_batch * self.batch_size) // self.io_batch_size
        skip = start_batch - first_io * (self.io_batch_size // self.batch_size)
        io_starts = list(range(first_io * self.io_batch_size, len(seq), self.io_batch_size))
        self.ensure_in_memory()
        read_processes = 0 if self._memory is not None else self.read_processes

        # X handles for the read threads: opened here, before any read starts, and closed below after
        # the last read ended, so no open or close ever overlaps a read of this loader (concurrent
        # opens and reads in threads have crashed tiledbsoma: TileDB-SOMA PRs #2800, #2801)
        handles: queue.SimpleQueue = queue.SimpleQueue()
        opened: list = []
        if self._memory is not None:  # the split held in memory: every read is a gather from RAM
            opened = [self._memory] * self.io_threads
        elif read_processes == 0:
            opened = self._open(x_uri, ctx)
        for h in opened:
            handles.put(h)

        def job(i: int, s: int):
            X = handles.get()  # never waits: the pool runs at most io_threads jobs at once
            try:
                pos, m, perm = self._io_batch(X, seq[s:s + self.io_batch_size], shard, i, col_of)
            finally:
                handles.put(X)
            return pos, m, perm, None

        class _Proc:  # a read process's future, resolved to (pos, csr view, perm, shared blocks)
            def __init__(self, fut, pos, perm):
                self.fut, self.pos, self.perm = fut, pos, perm

            def result(self):
                m, shms = _attach(self.fut.result())
                return self.pos, m, self.perm, shms

            def cancel(self):  # not started: dropped; running or done: its blocks are freed when it ends
                if not self.fut.cancel():
                    self.fut.add_done_callback(_free_result)

        def submit(i: int, s: int):  # (pool: the read threads, entered below)
            if read_processes == 0:
                return pool.submit(job, i, s)
            pos, _, perm = self._io_batch(None, seq[s:s + self.io_batch_size], shard, i, col_of)
            rows = self._row_keys(pos)
            return _Proc(self._read_pool(ctx, col_of, x_uri).submit(_worker_read, rows), pos, perm)

        on_dev = self._gathers_on_device()
        dense_cpu = self.device.type == "cpu" and not self.sparse  # densified here, in the prefetch thread
        # the <= 4 queued minibatches, the consumer's and the one being built fit in 8 buffers
        buffers = DenseBufferPool(self.batch_size, self.n_vars, capacity=8) if dense_cpu else None
        futs: list = []
        # teardown runs in reverse, also when the consumer stops early: drop the reads not started
        # yet, wait for the running ones (pool shutdown), then close the read threads' handles
        with contextlib.ExitStack() as teardown:
            teardown.callback(_close_handles, opened)
            pool = teardown.enter_context(ThreadPoolExecutor(self.io_threads))
            teardown.callback(_cancel_pending, futs)
            # at most prefetch_io IO batches read ahead; minibatches cut from each in its shuffled order
            nxt = 0
            for k in range(len(io_starts)):
                while nxt < len(io_starts) and nxt <= k + self.prefetch_io:
                    futs.append(submit(first_io + nxt, io_starts[nxt]))
                    nxt += 1
                pos, m, perm, shms = futs[k].result()
                futs[k] = None
                if self.augment is not None:  # a new CSR: the read's (shared) arrays are not written
                    m = self.augment.csr(m, self.cells[pos], self.epoch)
                first = (skip if k == 0 else 0) * self.batch_size
                try:
                    if on_dev:
                        dev_io = self._io_to_device(m)
                        if shms:
                            _release(shms)
                            shms = None
                        for b0 in range(first, len(pos), self.batch_size):
                            idx = perm[b0:b0 + self.batch_size]
                            yield self._to_device_batch(pos[idx], idx, dev_io)
                        del dev_io
                    elif dense_cpu:
                        for b0 in range(first, len(pos), self.batch_size):
                            idx = perm[b0:b0 + self.batch_size]
                            yield self._dense_batch(pos[idx], idx, m, buffers)
                    else:
                        for b0 in range(first, len(pos), self.batch_size):
                            idx = perm[b0:b0 + self.batch_size]
                            yield self._to_batch(pos[idx], m[idx])
                finally:
                    del m
                    if shms:
                        _release(shms)
                del pos, perm

    def _read_pool(self, ctx, col_of, x_uri: str):
        """The loader's read processes (started once, on first use; see "Read processes")."""
        if self._pool is None:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(self.read_processes, mp_context=mp.get_context("spawn"),
                                             initializer=_worker_init,
                                             initargs=(x_uri, dict(ctx.tiledb_config), col_of, self.n_vars))
        return self._pool

    def close(self) -> None:
        """Stop the read processes (if any). The loader can still be iterated (they restart)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001  (interpreter shutdown)
            pass

    def __iter__(self) -> Iterator[dict[str, Any]]:
        n = len(self)
        if self.batches_done >= n:
            self.set_epoch(self.epoch + 1)
        # at most 4 ready minibatches wait (dense on the CPU: 4 x B x G x 4 bytes)
        for item in prefetch(self._batches(self.batches_done), depth=4, name="atlasmix-loader"):
            self.batches_done += 1
            yield self._finish(item)
        # epoch complete: the next iteration starts the next epoch
        self.set_epoch(self.epoch + 1)

    def __getstate__(self):
        d = dict(self.__dict__)
        d["store"] = self.store.uri
        d.pop("_copy_stream", None)  # a CUDA stream does not pickle; made again on first use
        d["_pool"] = None  # read processes belong to the process that started them
        d["_memory"], d["_memory_tried"] = None, False  # a worker process reads its own
        return d

    def __setstate__(self, d):
        from atlasmix.store import Store

        d["store"] = Store(d["store"])
        self.__dict__.update(d)


class MixtureIterableDataset(torch.utils.data.IterableDataset):
    """A :class:`MixtureLoader` for ``torch.utils.data.DataLoader`` worker processes.

    Each DataLoader worker serves the interleaved shard ``(rank, worker)`` of the epoch order
    (:meth:`MixtureLoader.with_shard`), so workers never see the same contiguous slice, and every
    worker yields the same number of minibatches. Use it with ``batch_size=None`` (minibatches are
    already formed) and ``multiprocessing_context="spawn"`` (TileDB must not be forked once opened;
    the loader pickles by store URI and reopens it in the worker). Minibatches are built on the
    CPU in the workers; set ``pin_memory=True`` on the DataLoader and move them to the GPU in the
    training loop. Call :meth:`set_epoch` before each epoch (workers are re-created per epoch unless
    ``persistent_workers``; with persistent workers the loaders advance their epoch themselves).

    Parameters
    ----------
    loader : MixtureLoader
        Built with the rank's ``rank``/``world_size`` (its ``device`` is forced to the CPU).
    """

    def __init__(self, loader: MixtureLoader):
        super().__init__()
        self.loader = loader
        self.loader.device = torch.device("cpu")

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        info = torch.utils.data.get_worker_info()
        n = 1 if info is None else info.num_workers
        return len(self.loader.with_shard(self.loader.rank, self.loader.world_size, 0, n)) * n

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        L = self.loader
        if info is not None and info.num_workers > 1:
            if not hasattr(self, "_shard"):
                self._shard = L.with_shard(L.rank, L.world_size, info.id, info.num_workers)
            L = self._shard
        yield from L
