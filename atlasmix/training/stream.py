"""Model-ready minibatches encoded on the fly from a :class:`~atlasmix.training.loader.MixtureLoader`.

A foundation model reads a cell as a sequence of tokens (Geneformer's rank value encoding, scGPT's
gene tokens and binned values). :class:`EncodedStream` runs an encoding over each loader minibatch
(a *megabatch*) in a background thread, then cuts it into training batches -- by default grouped by
length, as Geneformer's and Hugging Face's ``LengthGroupedSampler`` do, so that padding each batch
only to its own longest cell wastes little -- and records the consumer's position, so a resumed
stream continues with the next training batch. Subclasses say how a megabatch is encoded
(:meth:`EncodedStream.encode`) and what a training batch holds besides the encoded arrays
(:meth:`EncodedStream.finish`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from atlasmix.errors import AtlasmixError


class EncodedStream:
    """Training batches of encoded cells from a sparse loader (module doc).

    Parameters
    ----------
    loader : atlasmix.training.loader.MixtureLoader
        Built with ``sparse=True`` on the encoding's gene axis, CPU device; its ``batch_size`` is
        the megabatch.
    batch_size : int, optional
        Cells per training batch (default: the loader's batch size, no grouping).
    group_by_length : bool
        Length-grouped batches inside each megabatch (batch order shuffled with the loader's seed).
    drop_empty : bool
        Drop cells whose encoding holds no gene (length <= :attr:`n_special`). Under DDP (the loader
        has several ranks) a megabatch still gives as many batches as without dropping, so that
        every rank takes the same number of optimizer steps.
    prefetch : int
        Encoded megabatches made ahead of the consumer.

    Yields
    ------
    dict
        Each array of :meth:`encode` cut to the batch's cells and longest length (torch tensors),
        ``lengths`` int64 (b,), ``soma_joinid`` int64 (b,), the loader's obs code tensors, and what
        :meth:`finish` adds.
    """

    #: Tokens of a cell that are not genes (``<cls>``, ``<eos>``...).
    n_special = 0
    #: Name of the prefetch thread.
    thread_name = "atlasmix-encode"

    def __init__(self, loader, batch_size: int | None = None, group_by_length: bool = True,
                 drop_empty: bool = True, prefetch: int = 2):
        self.loader = loader
        self.batch_size = int(batch_size or loader.batch_size)
        self.group_by_length = bool(group_by_length)
        self.drop_empty = bool(drop_empty)
        self.sub_done = 0  # training batches handed out from the current megabatch
        self.prefetch = max(1, int(prefetch))

    def encode(self, b: dict[str, Any]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Arrays of shape (B, L) (padded) and the lengths (B,) of one loader minibatch."""
        raise NotImplementedError

    def finish(self, d: dict[str, Any]) -> dict[str, Any]:
        """Add fields to a training batch (default: none)."""
        return d

    def __len__(self) -> int:
        """Training batches per epoch (an upper bound when empty cells are dropped): each loader
        minibatch of ``loader.batch_size`` cells gives ceil(cells / ``batch_size``) batches, the
        epoch's last, shorter one fewer."""
        L = self.loader
        cells = len(L) * L.batch_size if L.drop_last else L.shard_size
        full, rest = divmod(cells, L.batch_size)
        return full * -(-L.batch_size // self.batch_size) + -(-rest // self.batch_size)

    def _split(self, b: dict[str, Any], arrays: dict[str, np.ndarray], lengths: np.ndarray,
               mega_index: int) -> list[dict]:
        n = len(lengths)
        keep = np.flatnonzero(lengths - self.n_special > 0) if self.drop_empty else np.arange(n)
        if self.group_by_length:
            keep = keep[np.argsort(-lengths[keep], kind="stable")]
        n_groups = -(-n // self.batch_size)
        if self.loader.world_size > 1 and len(keep) < n and n_groups:
            # DDP: every rank takes as many optimizer steps as without dropping (ranks step together),
            # the kept cells spread over them; a batch would be empty only if almost all were dropped
            if len(keep) < n_groups:
                keep = np.concatenate([keep, np.setdiff1d(np.arange(n), keep)[:n_groups - len(keep)]])
            groups = [g for g in np.array_split(keep, n_groups)]
        else:
            groups = [keep[i:i + self.batch_size] for i in range(0, len(keep), self.batch_size)]
        if self.group_by_length and self.loader.shuffle and len(groups) > 1:
            rng = np.random.default_rng([self.loader.seed, self.loader.epoch, 7919, mega_index])
            groups = [groups[i] for i in rng.permutation(len(groups))]
        extra = [k for k in b if k not in ("X", "library_size", "soma_joinid")]
        out = []
        for g in groups:
            L = int(lengths[g].max())
            tg = torch.from_numpy(g)
            d = {k: torch.from_numpy(np.ascontiguousarray(a[g, :L])) for k, a in arrays.items()}
            d["lengths"] = torch.from_numpy(lengths[g])
            d["soma_joinid"] = b["soma_joinid"][tg]
            for k in extra:
                d[k] = b[k][tg]
            out.append(self.finish(d))
        return out

    def _produce(self) -> Iterator[tuple[int, int, list[dict]]]:
        """(epoch, megabatch index, training batches) per loader minibatch; runs in a background thread."""
        for b in self.loader:
            epoch, mega_index = self.loader.epoch, self.loader.batches_done - 1
            arrays, lengths = self.encode(b)
            yield epoch, mega_index, self._split(b, arrays, lengths, mega_index)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from atlasmix._prefetch import prefetch

        L = self.loader
        if L.batches_done >= len(L):  # the loader would start the next epoch
            L.set_epoch(L.epoch + 1)
        self._epoch, self._mega = L.epoch, L.batches_done
        skip = self.sub_done
        # encoding runs ahead in a thread (the compiled encodings release the GIL): the training loop
        # only waits when the loader + encoding are slower than the model
        for epoch, mega_index, subs in prefetch(self._produce(), depth=self.prefetch, name=self.thread_name):
            self._epoch, self._mega = epoch, mega_index
            for j in range(skip, len(subs)):
                self.sub_done = j + 1
                yield subs[j]
            skip = 0
            self.sub_done = 0
            self._mega = mega_index + 1
        self._epoch, self._mega = L.epoch, 0

    def state_dict(self) -> dict[str, Any]:
        """The consumer's position (the loader itself may have read ahead): loader state with
        ``epoch`` / ``batches_done`` of the megabatch being consumed, and ``sub_done``."""
        st = self.loader.state_dict()
        if hasattr(self, "_epoch"):
            st["epoch"], st["batches_done"] = self._epoch, self._mega
        return {"loader": st, "sub_done": self.sub_done, "batch_size": self.batch_size,
                "group_by_length": self.group_by_length, "drop_empty": self.drop_empty}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`.

        Raises
        ------
        AtlasmixError
            The state was saved with another split of the megabatches into training batches
            (``sub_done`` would point elsewhere), or by a loader with another order.
        """
        from atlasmix.errors import AtlasmixError

        for k in ("batch_size", "group_by_length", "drop_empty"):  # (older states lack them: skipped)
            if k in state and state[k] != getattr(self, k):
                raise AtlasmixError(f"stream state has {k}={state[k]}, this run {getattr(self, k)}")
        self.loader.load_state_dict(state["loader"])
        self.sub_done = int(state.get("sub_done", 0))
        self._epoch, self._mega = self.loader.epoch, self.loader.batches_done


def train_loader(store, manifest, var_joinids: np.ndarray, *, batch_size: int, group_batches: int,
                 io_batch_size: int, block_size: int, seed: int, **options):
    """The loader of a pretraining stream: a manifest's train split on a model's gene axis, sparse,
    in megabatches of ``group_batches`` training batches of ``batch_size`` cells.

    Parameters
    ----------
    store : atlasmix.store.Store
    manifest : path
    var_joinids : numpy.ndarray of int64
        The model's gene axis in the store.
    batch_size, group_batches : int
        Cells per training batch and batches per megabatch (the loader's batch size is their product).
    io_batch_size : int
        Cells per store read (at least a megabatch).
    block_size, seed
        :class:`~atlasmix.training.loader.MixtureLoader` shuffling.
    **options
        Other :class:`~atlasmix.training.loader.MixtureLoader` options (``library``, ``prefetch_io``...).

    Returns
    -------
    atlasmix.training.loader.MixtureLoader
        With ``obs_columns=("dataset_id",)``; DDP shards when a process group is up.
    """
    from atlasmix.training.loader import MixtureLoader  # tiledbsoma, numba: loaded when a run starts

    mega = batch_size * group_batches
    return MixtureLoader(store, manifest, "train", var_joinids=var_joinids, batch_size=mega,
                         io_batch_size=max(io_batch_size, mega), block_size=block_size, seed=seed,
                         obs_columns=("dataset_id",), sparse=True, **options)


def cells_to_embed(joinids) -> np.ndarray:
    """``joinids`` sorted and unique (int64).

    Raises
    ------
    AtlasmixError
        No cells.
    """
    joinids = np.unique(np.asarray(joinids, dtype=np.int64))
    if len(joinids) == 0:
        raise AtlasmixError("no cells to embed")
    return joinids


def embedding_loader(store, joinids: np.ndarray, var_joinids: np.ndarray, *, batch_size: int, io_batch_size: int,
                     **options):
    """A loader of ``joinids`` (:func:`cells_to_embed`) in order, on one rank, sparse, on a model's gene
    axis: the cells of an embedding. ``**options``: other
    :class:`~atlasmix.training.loader.MixtureLoader` options (``library``)."""
    from atlasmix.training.loader import MixtureLoader  # tiledbsoma, numba: loaded when embedding starts

    return MixtureLoader(store, joinids, var_joinids=var_joinids, batch_size=batch_size,
                         io_batch_size=max(io_batch_size, batch_size), shuffle=False, obs_columns=(), sparse=True,
                         rank=0, world_size=1, **options)


def embedding_table(store, joinids: np.ndarray, ids: list[np.ndarray], embs: list[np.ndarray],
                    n_tokens: list[np.ndarray], dim: int, obs_columns=()):
    """Cell embeddings gathered from streamed batches as one table over ``joinids``.

    Parameters
    ----------
    store : atlasmix.store.Store
    joinids : numpy.ndarray of int64
        Every cell asked for, sorted and unique.
    ids, embs, n_tokens : lists of numpy.ndarray
        Per batch: the cells embedded, their embeddings (b, dim) and token counts (b,).
    dim : int
    obs_columns : sequence of str
        obs columns copied in.

    Returns
    -------
    pandas.DataFrame
        Index ``soma_joinid``; ``obs_columns``; ``n_tokens``; ``emb_0..emb_{dim-1}`` float32 (NaN and
        ``n_tokens = 0`` for cells no batch held).
    """
    import pandas as pd

    full = np.full((len(joinids), dim), np.nan, dtype=np.float32)
    nt = np.zeros(len(joinids), dtype=np.int64)
    if ids:
        pos = np.searchsorted(joinids, np.concatenate(ids))
        full[pos] = np.concatenate(embs)
        nt[pos] = np.concatenate(n_tokens)
    df = pd.DataFrame(full, columns=[f"emb_{i}" for i in range(dim)], index=pd.Index(joinids, name="soma_joinid"))
    df.insert(0, "n_tokens", nt)
    cols = list(obs_columns)
    if cols:
        obs = store.obs(cols, joinids=joinids).to_pandas().set_index("soma_joinid").loc[joinids]  # these cells only
        for i, c in enumerate(cols):
            df.insert(i, c, obs[c].astype(str).to_numpy())
    return df
