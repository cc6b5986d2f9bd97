"""Stream the cells of a resolved mixture from the store as shuffled torch minibatches.

:class:`MixtureLoader` is the minibatch iterator the models use::

    from atlasmix.training.loader import MixtureLoader

    loader = MixtureLoader(store, "runs/mix.parquet", "train", batch_size=1024, obs_columns=("dataset_id",))
    for epoch in range(3):
        for batch in loader:      # X (B, genes) float32, library_size (B, 1), soma_joinid, dataset_id
            ...

A fresh shuffle every epoch, the same for the same (seed, epoch), with no offline pre-shuffle and
no per-mixture copy of the data. Its data flow, one module each:

1. :mod:`atlasmix.training.split_cells` -- the split's cells and their obs codes (manifest rows only);
2. :mod:`atlasmix.training.order` -- the epoch order: locality blocks in a fresh permutation, dealt
   in whole blocks to DDP ranks and DataLoader workers (how an epoch is ordered, and why);
3. :mod:`atlasmix.training.read` -- IO batches read as CSR from the store's x layout, TileDB X, an x
   cache or memory, in read threads or read processes;
4. :mod:`atlasmix.training.minibatches` -- minibatches cut out of each shuffled IO batch: dense on
   the CPU, CSR, or gathered on the GPU;
5. :mod:`atlasmix.training.dataset` -- :class:`~atlasmix.training.dataset.MixtureIterableDataset`
   for ``torch.utils.data.DataLoader`` worker processes.

Prefetch and memory
-------------------
A background thread assembles minibatches (CPU tensors) into a bounded queue; it reads IO batches
with a pool of ``io_threads`` threads (TileDB and the layout decoder release the GIL), at most
``prefetch_io`` IO batches ahead, and keeps at most 4 ready minibatches. Memory held is
O((prefetch_io + io_threads + 1) x io_batch_size x nonzeros per cell x ~20 bytes) for the reads'
buffers and the CSR (``io_batch_bytes`` bounds a read in bytes instead), plus 4 minibatches (dense
on the CPU: 4 x batch_size x genes x 4 bytes) and at most 8 pooled dense buffers, independent of
corpus size, plus the per-cell index arrays (joinids and covariate codes: ~8 bytes + 4 bytes per
covariate per manifest cell). ``in_memory`` holds a small split in RAM instead
(:mod:`atlasmix.training.memory`).

Where X is read from
--------------------
The store's x layout by default (:mod:`atlasmix.store.xlayout`); where a dataset has none
(``s3://`` stores; stores made before it, until ``atlasmix store optimize``), TileDB X
(``ms/RNA/X/raw``). ``x_source`` picks one explicitly. ``x_cache=DIR`` (opt-in, older than the x
layout) reads from a per-mixture projection of X onto the loader's cells x gene axis
(:mod:`atlasmix.training.xcache`), built once by streaming the store; it only still pays for very
small gene axes (see ``benchmarks/bench_loader.py``). The minibatches are the same either way.

Resume
------
:meth:`MixtureLoader.state_dict` records ``epoch`` and ``batches_done`` (minibatches handed to the
consumer this epoch); after :meth:`MixtureLoader.load_state_dict` the next iteration continues
exactly with the next minibatch of that epoch (same cells, same order) because every order is a
pure function of (seed, epoch, shard, IO batch index).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from atlasmix._prefetch import prefetch
from atlasmix.errors import AtlasmixError
from atlasmix.mixing.genes import mixture_genes
from atlasmix.store import Store, xlayout
from atlasmix.store import schema as S
from atlasmix.training import xcache
from atlasmix.training.memory import InMemoryX, cap_bytes, hold_split
from atlasmix.training.minibatches import Minibatches
from atlasmix.training.options import LIBRARY_SOURCES, X_SOURCES, LoaderOptions, route_options
from atlasmix.training.order import epoch_order, io_batch_permutation, shard_length, shard_order, shuffle_entropy
from atlasmix.training.read import (LayoutSource, ReadProcesses, ReadThreads, TileDBSource, XSource, column_map,
                                    gene_columns, open_handles, read_ahead, read_csr, release_held)
from atlasmix.training.split_cells import read_obs_fields, split_cells

__all__ = ["MixtureLoader", "LoaderOptions", "epoch_order", "shard_order", "shard_length", "shuffle_entropy",
           "gene_columns", "read_csr", "LIBRARY_SOURCES", "X_SOURCES"]


class MixtureLoader:
    """Minibatches of one split of a mixture, streamed from the store.

    Parameters
    ----------
    store : atlasmix.store.Store
    manifest : path, pyarrow.Table or numpy.ndarray
        A manifest ``.parquet`` (checked against the store), its table, or plain cell joinids (then
        ``split`` is ignored); see :func:`atlasmix.training.split_cells.split_cells`.
    split : str
        ``train``, ``validation`` or ``eval`` (cells of several eval sets are served once).
    options : LoaderOptions, optional
        How minibatches are made and read (:class:`atlasmix.training.options.LoaderOptions`: batch
        sizes, shuffle, seed, obs columns, library size, X source, threads, memory).
    genes : sequence of str, optional
        The gene axis (see :func:`atlasmix.mixing.genes.mixture_genes`); default genes measured in
        every dataset.
    var_joinids : numpy.ndarray of int64, optional
        The gene axis as var joinids (overrides ``genes``), e.g. a trained model's genes.
    categories : dict of str to list of str, optional
        Categories of the ``obs_columns`` (e.g. the training loader's, for a validation loader);
        default: the sorted distinct values over all the manifest's cells.
    device : str or torch.device
        Where ``X`` and ``library_size`` are placed. On CUDA the CSR parts are pinned, copied
        asynchronously and densified on the GPU.
    rank, world_size : int
        DDP position (default: from ``torch.distributed`` when initialised, else 0 / 1).
    worker, num_workers : int
        Position among data workers of one rank (multi-process loading: each worker builds its own
        loader with its ``worker`` index).
    augment : object, optional
        A count augmentation applied to every IO batch as it arrives, before minibatches are cut
        from it (so every path -- dense, sparse, GPU -- and the ``counts`` library size see it):
        ``augment.csr(csr, soma_joinids, epoch) -> csr``, e.g. read-depth-aware downsampling
        (:class:`atlasmix.training.rda.ReadDepthAugment`).
    **option_fields
        Fields of :class:`~atlasmix.training.options.LoaderOptions` by name (``batch_size=256``,
        ``in_memory=True``, ...), replacing those of ``options``.

    Attributes
    ----------
    options : LoaderOptions
        The options as given; the loader's attributes of the same names hold the settings in
        effect (``io_batch_size`` rounded up to a multiple of ``batch_size``, or sized by
        ``io_batch_bytes``; ``obs_columns`` as a list).
    cells : numpy.ndarray of int64
        The split's cells (ascending soma_joinids).
    var_joinids : numpy.ndarray of int64
        The gene axis.
    categories, codes : dict
        Per obs column, its categories and the cells' int32 codes.

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

    def __init__(self, store, manifest: Any, split: str = "train", options: LoaderOptions | None = None, *,
                 genes: Sequence[str] | None = None, var_joinids: np.ndarray | None = None,
                 categories: dict[str, list[str]] | None = None, device: str | torch.device = "cpu",
                 rank: int | None = None, world_size: int | None = None, worker: int = 0, num_workers: int = 1,
                 augment: Any = None, **option_fields: Any):
        options = route_options(option_fields, options or LoaderOptions())[0]
        if rank is None or world_size is None:
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = (torch.distributed.get_rank() if dist else 0) if rank is None else rank
            world_size = (torch.distributed.get_world_size() if dist else 1) if world_size is None else world_size
        if not (0 <= rank < world_size and 0 <= worker < num_workers):
            raise AtlasmixError(f"rank {rank}/{world_size}, worker {worker}/{num_workers} out of range")
        self.options = options
        self.store = store
        self.split = split
        # the options' fields as attributes, then the settings in effect where they differ
        for name in LoaderOptions.field_names():
            setattr(self, name, getattr(options, name))
        self.batch_size = int(options.batch_size)
        self.io_batch_size = int(math.ceil(options.io_batch_size / options.batch_size) * options.batch_size)
        self.block_size = int(options.block_size)
        self.shuffle = bool(options.shuffle)
        self.seed = int(options.seed)
        self.drop_last = bool(options.drop_last)
        self.obs_columns = list(options.obs_columns)
        self.sparse = bool(options.sparse)
        self.prefetch_io = max(1, int(options.prefetch_io))
        self.io_threads = max(1, int(options.io_threads))
        self.read_processes = max(0, int(options.read_processes))
        self.in_memory = "auto" if isinstance(options.in_memory, str) else bool(options.in_memory)
        self.device = torch.device(device)
        self.rank, self.world_size, self.worker, self.num_workers = int(rank), int(world_size), int(worker), int(num_workers)
        self.augment = augment
        self._x_cache_uri: str | None = None
        self._memory: InMemoryX | None = None
        self._memory_tried = False
        self._pool: ReadProcesses | None = None
        self._order_cache: dict = {}
        self.epoch = 0
        self.batches_done = 0
        self._setup(manifest, split, genes, var_joinids, categories)

    # -------------------------------------------------------------- setup
    def _setup(self, manifest: Any, split: str, genes: Sequence[str] | None, var_joinids: np.ndarray | None,
               categories: dict[str, list[str]] | None) -> None:
        """The split's cells, the gene axis, the obs codes and where X is read from."""
        store = self.store
        sc = split_cells(store, manifest, split)
        self.manifest_sha256: str | None = sc.manifest_sha256
        self.cells = sc.cells
        if len(self.cells) == 0:
            raise AtlasmixError(f"the manifest has no {split!r} cells")
        self.var_joinids = (np.asarray(var_joinids, dtype=np.int64) if var_joinids is not None
                            else mixture_genes(store, sc.all_ids, genes))
        var_index = store.var().index
        self._n_var_store = int(var_index.max()) + 1 if len(var_index) else 0
        if len(np.unique(self.var_joinids)) != len(self.var_joinids):
            raise AtlasmixError("the gene list names a gene twice")
        read_obs_fields(store, sc, self.obs_columns, categories or {}, total_counts=self.library == "total_counts",
                        mean_nnz=self.io_batch_bytes is not None)
        self.categories: dict[str, list[str]] = sc.categories
        self.codes: dict[str, np.ndarray] = sc.codes
        self.total_counts = sc.total_counts
        if self.io_batch_bytes is not None:  # bound reads in bytes: cells per read from the mean row size
            fit = int(self.io_batch_bytes // max(8.0 * sc.mean_nnz, 1.0)) // self.batch_size * self.batch_size
            self.io_batch_size = min(self.io_batch_size, max(self.batch_size, fit))
        # the store's x layout (atlasmix.store.xlayout) when every dataset of the split has one
        self._layout_datasets = (xlayout.datasets_for(store, self.cells)
                                 if self.x_source != "tiledb" and self.x_cache is None else None)
        # x_source applies without an x cache (with one, X is read from the cache)
        if self.x_source == "layout" and self.x_cache is None and self._layout_datasets is None:
            raise AtlasmixError("x_source='layout' but a dataset of this split has no x layout "
                                "(run `atlasmix store optimize`, or use an x_source of 'auto')")

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
        if not (0 <= rank < world_size and 0 <= worker < num_workers):
            raise AtlasmixError(f"rank {rank}/{world_size}, worker {worker}/{num_workers} out of range")
        # a plain attribute copy: the same Store (its context), held split and order cache; not
        # copy.copy, which pickles by URI (__getstate__) and so reopened the store with a default
        # context and dropped the held split. Read processes stay with the loader that started them.
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other._pool = None
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
                "num_workers": self.num_workers, "shuffle": self.shuffle, "uneven": self.uneven,
                "drop_last": self.drop_last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the next iteration continues with the next minibatch.

        Raises
        ------
        AtlasmixError
            The state was saved by a loader with another order (seed, cells, sizes, sharding).
        """
        for k in ("seed", "n_obs", "batch_size", "io_batch_size", "block_size", "rank", "world_size", "worker",
                  "num_workers", "shuffle", "uneven", "drop_last"):  # (a state saved before a key existed: skipped)
            if k in state and state[k] != getattr(self, k):
                raise AtlasmixError(f"loader state has {k}={state[k]}, this loader {getattr(self, k)}")
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])

    # -------------------------------------------------------------- sources
    def ensure_x_cache(self, progress: bool = False) -> dict:
        """Build (or find) this loader's x cache projection now; see ``x_cache``.

        Iteration does this on first use; call it explicitly to build before timing or before
        starting DDP ranks (rank 0 builds, the others then find it).

        Returns
        -------
        dict
            The projection's metadata (:func:`atlasmix.training.xcache.build.ensure_x_cache`).

        Raises
        ------
        AtlasmixError
            The loader has no ``x_cache`` folder, or the projection is unusable.
        """
        if self.x_cache is None:
            raise AtlasmixError("this loader has no x_cache folder")
        uri, meta = xcache.ensure_x_cache(self.store, self.cells, self.var_joinids, self.x_cache,
                                          fmt=self.x_cache_format, progress=progress, max_bytes=self.x_cache_max_bytes)
        self._x_cache_uri = uri
        return meta

    def _source(self) -> tuple[XSource, np.ndarray | None, Any]:
        """Where X is read from: ``(source, col_of, context)`` for the reads (the x cache is built
        first when the loader has one)."""
        if self.x_cache is not None and self._x_cache_uri is None:
            self.ensure_x_cache()
        if self._layout_datasets is not None:
            source: XSource = LayoutSource(self.store.uri, tuple(self._layout_datasets))
        elif self._x_cache_uri:
            source = xcache.XCacheSource(self._x_cache_uri)
        else:
            source = TileDBSource(f"{self.store.uri}/ms/{S.MEASUREMENT}/X/{S.X_LAYER}")
        col_of = None if self._x_cache_uri else column_map(self.var_joinids, self._n_var_store)
        ctx = self.store.context
        if self.read_buffer_bytes:  # TileDB result buffers per read (bigger results come in pieces)
            cfg = dict(ctx.tiledb_config)
            cfg["soma.init_buffer_bytes"] = str(int(self.read_buffer_bytes))
            ctx = ctx.replace(tiledb_config=cfg)
        return source, col_of, ctx

    def _row_keys(self, positions: np.ndarray) -> np.ndarray:
        """Rows of X for cells at ``positions``: their soma_joinids, or the positions themselves in an
        x cache projection (whose rows are this loader's cells in order). int64."""
        return positions.astype(np.int64) if self._x_cache_uri else self.cells[positions]

    def _read(self, X, ids_sorted: np.ndarray, col_of: np.ndarray | None) -> sp.csr_matrix:
        """One read of cells ``ids_sorted`` x the gene axis, as CSR (see :func:`read_csr`)."""
        return read_csr(X, ids_sorted, col_of, self.n_vars)

    # -------------------------------------------------------------- in memory
    @property
    def in_memory_bytes(self) -> int:
        """Bytes of the split held in memory (0 when it streams); see ``in_memory``."""
        return self._memory.nbytes if self._memory is not None else 0

    def ensure_in_memory(self) -> bool:
        """Read the split into memory now if ``in_memory`` asks for it (see there); iteration does
        this on first use. Returns whether the split is held in memory.

        With ``in_memory="auto"``, a sample of up to 512 cells is read first and the split's size on
        the gene axis extrapolated from it; the read stops (and the loader streams) once the rows
        read pass the cap (:func:`atlasmix.training.memory.hold_split`).
        """
        if self._memory is not None or self.in_memory is False or self._memory_tried:
            return self._memory is not None
        self._memory_tried = True
        auto = self.in_memory == "auto"
        if auto and self.world_size * self.num_workers > 1:
            return False  # each shard would hold the whole split
        cap = (self.in_memory_max_bytes if self.in_memory_max_bytes is not None else cap_bytes()) if auto else None
        source, col_of, ctx = self._source()
        with ReadThreads(open_handles(source, ctx, self.io_threads)) as reads:
            self._memory = hold_split(lambda k: reads.call(self._read, k, col_of), self._row_keys(np.arange(self.n_obs)),
                                      self.n_vars, self.io_batch_size, self.io_threads, cap, seed=self.seed)
        return self._memory is not None

    # -------------------------------------------------------------- iteration
    def _gathers_on_device(self) -> bool:
        if self.gather_on_device is None:
            return self.device.type == "cuda"
        return bool(self.gather_on_device)

    def _io_batch(self, X, positions: np.ndarray, shard: int, io_index: int, col_of: np.ndarray | None,
                  view: bool = False):
        """Read one IO batch in store order (``X`` None: only sort) and draw its in-memory shuffle.

        Returns (positions, csr, perm): the sorted rows' positions and counts (with ``view``, from a
        split in memory: a :class:`~atlasmix.training.memory.HeldRows` view, not a copy), and the
        permutation of :func:`atlasmix.training.order.io_batch_permutation`."""
        ids = self._row_keys(positions)
        order = np.argsort(ids, kind="stable")
        if X is None:
            m = None
        elif view and isinstance(X, InMemoryX):
            m = X.held_rows(ids[order])
        else:
            m = self._read(X, ids[order], col_of)
        perm = io_batch_permutation(len(ids), self.seed, self.epoch, shard, io_index, self.shuffle)
        return positions[order], m, perm

    def _batches(self, start_batch: int, cut: Minibatches) -> Iterator[Any]:
        """This epoch's minibatches (before :meth:`Minibatches.finish`) from ``start_batch`` on; run
        by :func:`prefetch`."""
        shard = self.rank * self.num_workers + self.worker
        seq = self.shard_positions()
        nb = len(self)
        if self.drop_last:
            seq = seq[: nb * self.batch_size]
        source, col_of, ctx = self._source()
        first_io = (start_batch * self.batch_size) // self.io_batch_size
        skip = start_batch - first_io * (self.io_batch_size // self.batch_size)
        io_starts = list(range(first_io * self.io_batch_size, len(seq), self.io_batch_size))
        self.ensure_in_memory()
        read_processes = 0 if self._memory is not None else self.read_processes

        # X handles for the read threads: opened here, before any read starts, and closed after the last
        # read ended (see ReadThreads)
        if self._memory is not None:  # the split held in memory: every read is a gather from RAM
            opened = [self._memory] * self.io_threads
        else:
            opened = open_handles(source, ctx, self.io_threads) if read_processes == 0 else []

        # dense CPU minibatches are gathered straight from a split in memory (nothing else reads it)
        view = cut.dense_cpu and self.augment is None

        def submit(j: int):  # IO batch first_io + j, read in a thread or a read process
            i, s = first_io + j, io_starts[j]
            if read_processes == 0:
                io = seq[s:s + self.io_batch_size]
                return reads.submit(lambda X: (*self._io_batch(X, io, shard, i, col_of, view), None))
            pos, _, perm = self._io_batch(None, seq[s:s + self.io_batch_size], shard, i, col_of)
            return self._read_processes(source, ctx, col_of).submit(self._row_keys(pos), pos, perm)

        # teardown runs in reverse, also when the consumer stops early: drop the reads not started
        # yet, wait for the running ones, then close the read threads' handles
        with contextlib.ExitStack() as teardown:
            reads = teardown.enter_context(ReadThreads(opened, self.io_threads))
            # at most prefetch_io IO batches read ahead; minibatches cut from each in its shuffled order
            ahead = teardown.enter_context(contextlib.closing(read_ahead(submit, len(io_starts), self.prefetch_io)))
            # not enumerate(ahead): enumerate keeps its last (k, item) tuple, so the IO batch just
            # consumed would stay alive while the next reads are submitted and could not lend them its
            # buffers (atlasmix._buffers; 12 % fewer cells/s, +0.2 GiB RSS)
            k = -1
            try:
                for pos, m, perm, shms in ahead:
                    k += 1
                    held = [shms] if shms else []  # the read's shared-memory blocks, freed once m is not read
                    try:
                        if (self.sparse or self.augment is not None) and not m.has_sorted_indices:
                            # an unsorted gene axis leaves each row's columns in var order: torch's
                            # sparse CSR wants them sorted, and the augment's draws follow their order
                            # (an x cache stores them sorted: the same draws either way)
                            m.sort_indices()
                        if self.augment is not None:  # a new CSR: the read's (shared) arrays are not written
                            m = self.augment.csr(m, self.cells[pos], self.epoch)
                        yield from cut.cut(pos, m, perm, (skip if k == 0 else 0) * self.batch_size,
                                           functools.partial(release_held, held))
                    finally:
                        del m
                        release_held(held)
                    del pos, perm
            except BrokenProcessPool as e:  # a read process died: its pool is unusable, start afresh next time
                self.close()
                raise AtlasmixError("a read process died (killed by the system: out of memory?); "
                                    "lower io_batch_size or read_processes, or read in threads "
                                    "(read_processes=0)") from e

    def _read_processes(self, source: XSource, ctx, col_of) -> ReadProcesses:
        """The loader's read processes (started once, on first use; see :mod:`atlasmix.training.read`)."""
        if self._pool is None:
            self._pool = ReadProcesses(self.read_processes, source, ctx.tiledb_config, col_of, self.n_vars)
        return self._pool

    def close(self) -> None:
        """Stop the read processes (if any). The loader can still be iterated (they restart)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001  (interpreter shutdown)
            pass

    def __iter__(self) -> Iterator[dict[str, Any]]:
        n = len(self)
        if n == 0:  # would yield nothing and skip epochs; a loop waiting for steps would never end
            shards = self.world_size * self.num_workers
            raise AtlasmixError(
                f"this shard has no minibatch: {self.n_obs:,} cells over {shards} shard(s) of whole "
                f"{self.block_size}-cell blocks (uneven={self.uneven!r}), batch_size {self.batch_size}, "
                f"drop_last={self.drop_last}; use uneven='pad', a smaller block_size, fewer shards or "
                f"drop_last=False")
        if self.batches_done >= n:
            self.set_epoch(self.epoch + 1)
        cut = Minibatches(cells=self.cells, codes=self.codes, library=self.library,
                          total_counts=self.total_counts, n_vars=self.n_vars, batch_size=self.batch_size,
                          device=self.device, sparse=self.sparse, on_device=self._gathers_on_device(),
                          io_threads=self.io_threads)
        # at most 4 ready minibatches wait (dense on the CPU: 4 x B x G x 4 bytes)
        items = prefetch(self._batches(self.batches_done, cut), depth=4, name="atlasmix-loader")
        try:
            for item in items:
                item = cut.finish(item)  # counted once delivered: a minibatch that failed is not done
                self.batches_done += 1
                yield item
        finally:
            items.close()  # the prefetch thread has stopped cutting: then the densify threads stop
            cut.close()
        # epoch complete: the next iteration starts the next epoch
        self.set_epoch(self.epoch + 1)

    def __getstate__(self):
        d = dict(self.__dict__)
        d["store"] = self.store.uri
        d["_pool"] = None  # read processes belong to the process that started them
        d["_memory"], d["_memory_tried"] = None, False  # a worker process reads its own
        return d

    def __setstate__(self, d):
        d["store"] = Store(d["store"])
        self.__dict__.update(d)
