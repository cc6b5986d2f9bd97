"""A :class:`atlasmix.training.loader.MixtureLoader` as a torch ``IterableDataset`` for DataLoader workers.

The loader itself uses no worker processes (its reads run in threads, or in read processes of its
own: :mod:`atlasmix.training.read`). To load in ``torch.utils.data.DataLoader`` worker processes
instead, wrap it in :class:`MixtureIterableDataset`: each worker serves its interleaved (rank,
worker) shard of the epoch order (:func:`atlasmix.training.order.shard_order`). Use
``multiprocessing_context="spawn"`` (forking after TileDB is opened hangs): the loader pickles by
store URI and each worker reopens the store.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from atlasmix.errors import AtlasmixError

if TYPE_CHECKING:  # annotations only: the loader does not import this module
    from atlasmix.training.loader import MixtureLoader


class MixtureIterableDataset(torch.utils.data.IterableDataset):
    """A :class:`~atlasmix.training.loader.MixtureLoader` for ``torch.utils.data.DataLoader`` worker processes.

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
    num_workers : int, optional
        The DataLoader's ``num_workers`` (0 and 1: one shard). Needed for ``len()`` (the DataLoader
        asks its dataset's length in the main process, which cannot see its workers, and the
        number of minibatches depends on how many shards the rank's cells are dealt into); a
        worker checks it against the DataLoader's.

    Raises
    ------
    TypeError
        ``len()`` without ``num_workers`` (a length-less IterableDataset, as torch expects).
    AtlasmixError
        In a worker, when ``num_workers`` is not the DataLoader's.
    """

    def __init__(self, loader: MixtureLoader, num_workers: int | None = None):
        super().__init__()
        self.loader = loader
        self.loader.device = torch.device("cpu")
        self.num_workers = None if num_workers is None else max(1, int(num_workers))

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        if self.num_workers is None:
            raise TypeError("the length depends on the DataLoader's workers: "
                            "MixtureIterableDataset(loader, num_workers=...) to size it")
        n = self.num_workers
        return len(self.loader.with_shard(self.loader.rank, self.loader.world_size, 0, n)) * n

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        workers = 1 if info is None else info.num_workers
        if self.num_workers is not None and self.num_workers != workers:
            raise AtlasmixError(f"MixtureIterableDataset was sized for {self.num_workers} worker(s), the DataLoader "
                                f"has {workers}")
        L = self.loader
        if info is not None and info.num_workers > 1:
            if not hasattr(self, "_shard"):
                self._shard = L.with_shard(L.rank, L.world_size, info.id, info.num_workers)
            L = self._shard
        yield from L
