"""Typed option groups of training, shared by the CLI, the study spec and the Python API.

As scvi-tools separates a model's constructor arguments from its data-splitter, training-plan and
trainer arguments, training options come in a few frozen groups, each with its defaults and checks
(a bad value raises one :class:`~atlasmix.errors.AtlasmixError` line when the group is built):

- :class:`LoaderOptions` -- how a :class:`~atlasmix.training.loader.MixtureLoader` batches,
  shuffles and reads (any model);
- :class:`LDVAEModelOptions` -- the LDVAE model (scvi-tools ``LinearSCVI``'s constructor, its batch
  covariate and the data it is initialised from);
- :class:`LDVAETrainOptions` -- how long and where LDVAE trains (training plan and trainer).

``atlasmix train ldvae`` builds the three from its options, a study's ``[ldvae]`` table
(:class:`atlasmix.study.spec.LDVAEOptions`) from its keys, and
:func:`atlasmix.training.ldvae.train_ldvae` takes them (or their fields as keyword arguments).
This module imports no torch, so that the CLI starts fast.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atlasmix.errors import AtlasmixError
from atlasmix.training.budget import Budget
from atlasmix.training.defaults import DEFAULTS

__all__ = ["LoaderOptions", "LDVAEModelOptions", "LDVAETrainOptions", "LDVAE_LOADER", "LIBRARY_SOURCES",
           "X_SOURCES", "ddp_strategy", "route_options"]

LIBRARY_SOURCES = ("counts", "total_counts")
X_SOURCES = ("auto", "layout", "tiledb")
GENE_LIKELIHOODS = ("nb", "zinb", "poisson")


class _Options:
    """Shared behaviour of the option groups (frozen dataclasses)."""

    def replace(self, **changes: Any):
        """A copy with ``changes`` (checked again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


@dataclass(frozen=True)
class LoaderOptions(_Options):
    """How a :class:`~atlasmix.training.loader.MixtureLoader` batches, shuffles and reads.

    The minibatches depend only on ``batch_size``, ``io_batch_size`` (or ``io_batch_bytes``),
    ``block_size``, ``shuffle``, ``seed``, ``drop_last``, ``uneven``, ``obs_columns``, ``library`` and
    ``sparse``; the rest says how they are made (same minibatches either way).

    Attributes
    ----------
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
        Locality block (consecutive store cells kept together in the permutation), see
        :mod:`atlasmix.training.order`.
    shuffle : bool
        False: store order, no permutation (inference, validation).
    seed : int
        Seed of the epoch order (>= 0: numpy's SeedSequence takes no negative seed).
    drop_last : bool
        Drop each shard's last short minibatch.
    uneven : {"drop", "pad"}
        Equalising shards (see :func:`atlasmix.training.order.shard_order`).
    obs_columns : tuple of str
        obs columns delivered as int64 codes (shape (B,)); categories are the sorted distinct
        values over *all* the manifest's cells (every split), so train and validation agree; see
        the loader's ``categories``.
    library : {"counts", "total_counts"}
        ``library_size`` of a minibatch: ``counts`` = sum of the counts over the loader's gene axis
        (what a model of these genes sees); ``total_counts`` = obs ``total_counts`` (all genes the
        source measured, computed at ingest).
    sparse : bool
        Deliver ``X`` as a ``torch.sparse_csr_tensor`` instead of dense.
    gather_on_device : bool or None
        Copy each IO batch's CSR to the device once (pinned memory, a side CUDA stream, in the
        prefetch thread) and cut the shuffled minibatches out of it *on the device* (row gather +
        densify: a handful of kernels per minibatch). None (default): on for CUDA devices, off on
        the CPU, where the prefetch thread gathers and densifies. See "GPU path" in
        :mod:`atlasmix.training.minibatches`.
    prefetch_io : int
        IO batches read ahead of the consumer (bounds memory).
    io_threads : int
        Threads issuing the reads.
    read_processes : int
        0 (default): IO batches are read by ``io_threads`` threads of this process. N > 0: by a pool
        of N spawned worker processes (each opens the store once), which hand the CSR back through
        shared memory; the training process then only copies it to the device. See
        :mod:`atlasmix.training.read`.
    read_buffer_bytes : int or None
        TileDB's ``soma.init_buffer_bytes`` for X reads (per read; larger results arrive in
        pieces); None keeps the store context's setting (tiledbsoma's default is larger).
    x_source : {"auto", "layout", "tiledb"}
        Where X is read from (without ``x_cache``): ``auto`` (default) the store's x layout when
        every dataset of the split has one (:mod:`atlasmix.store.xlayout`), else TileDB X;
        ``layout`` requires the layout; ``tiledb`` always reads ``ms/RNA/X/raw``. The minibatches
        are the same either way.
    x_cache : str or pathlib.Path, optional
        A local folder: read X from a projection of the store onto the loader's cells x gene axis
        (:mod:`atlasmix.training.xcache`), built there on first use (about one epoch's read) and
        reused by later epochs and runs with the same store state, cells and genes. A gene subset
        (e.g. 2,000 HVGs) then costs only its own nonzeros per epoch instead of the whole
        transcriptome's. Same minibatches as without it.
    x_cache_format : {"tiledb", "h5"}
        The x cache's format: compressed TileDB (default) or uncompressed CSR in HDF5 (~4.7x the
        disk space, read as plain slices: faster, also for whole-transcriptome axes).
    x_cache_max_bytes : int, optional
        Size cap of the ``x_cache`` folder (default :func:`atlasmix.training.xcache.folder.cap_bytes`:
        64 GiB or ``ATLASMIX_X_CACHE_MAX_GB``); least recently used projections not in use are
        deleted to fit it, and a projection larger than it is refused.
    in_memory : {False, "auto", True}
        Hold the split's cells on the gene axis in memory (:mod:`atlasmix.training.memory`): read
        once in store order at the first iteration, then every IO batch is a gather from RAM, as
        scvi-tools trains from an in-memory AnnData. The minibatches are the same as streamed.
        ``"auto"``: only for a loader that is one shard (no DDP ranks or workers) and whose split
        fits ``in_memory_max_bytes`` (estimated from a sample read, enforced while reading: over
        it, the loader streams); ``True``: always (every shard holds the whole split); ``False``
        (default): stream. LDVAE uses ``"auto"`` (:data:`LDVAE_LOADER`).
    in_memory_max_bytes : int, optional
        Cap for ``in_memory="auto"`` (default :func:`atlasmix.training.memory.cap_bytes`: 2 GiB or
        ``ATLASMIX_IN_MEMORY_MAX_GB``); 8 bytes per nonzero on the gene axis + 16 per cell.

    Raises
    ------
    AtlasmixError
        A size below 1, or a value not among the choices above.
    """

    batch_size: int = 1024
    io_batch_size: int = 16384
    io_batch_bytes: int | None = None
    block_size: int = 64
    shuffle: bool = True
    seed: int = 0
    drop_last: bool = False
    uneven: str = "drop"
    obs_columns: tuple[str, ...] = ("dataset_id",)
    library: str = "counts"
    sparse: bool = False
    gather_on_device: bool | None = None
    prefetch_io: int = 2
    io_threads: int = 2
    read_processes: int = 0
    read_buffer_bytes: int | None = None
    x_source: str = "auto"
    x_cache: str | Path | None = None
    x_cache_format: str = "tiledb"
    x_cache_max_bytes: int | None = None
    in_memory: bool | str = False
    in_memory_max_bytes: int | None = None

    def __post_init__(self):
        if self.batch_size < 1 or self.io_batch_size < 1 or self.block_size < 1:
            raise AtlasmixError("batch_size, io_batch_size and block_size must be >= 1")
        if self.seed < 0:
            raise AtlasmixError(f"seed must be >= 0, got {self.seed}")
        if self.io_batch_bytes is not None and self.io_batch_bytes < 1:
            raise AtlasmixError(f"io_batch_bytes must be >= 1, got {self.io_batch_bytes}")
        if self.library not in LIBRARY_SOURCES:
            raise AtlasmixError(f"library must be one of {LIBRARY_SOURCES}, got {self.library!r}")
        if self.uneven not in ("drop", "pad"):
            raise AtlasmixError(f"uneven must be 'drop' or 'pad', got {self.uneven!r}")
        if self.in_memory not in (False, True, "auto"):
            raise AtlasmixError(f"in_memory must be False, True or 'auto', got {self.in_memory!r}")
        if self.x_source not in X_SOURCES:
            raise AtlasmixError(f"x_source must be one of {X_SOURCES}, got {self.x_source!r}")
        object.__setattr__(self, "obs_columns", tuple(self.obs_columns))


#: The loader options of LDVAE unless given: scFM-datamix's minibatch of 128 cells, the split held in
#: memory when it fits (``obs_columns`` and ``seed`` are set from the model and training options).
LDVAE_LOADER = LoaderOptions(batch_size=DEFAULTS["batch_size"], in_memory="auto")


@dataclass(frozen=True)
class LDVAEModelOptions(_Options):
    """The LDVAE model: scvi-tools ``LinearSCVI``'s constructor, its batch covariate and the data
    it is initialised from (defaults: scFM-datamix's, :data:`atlasmix.training.defaults.DEFAULTS`).

    Attributes
    ----------
    n_latent, n_layers, n_hidden : int
        Latent dimensions, encoder hidden layers and units per hidden layer.
    dropout_rate : float
        Encoder dropout.
    gene_likelihood : {"nb", "zinb", "poisson"}
    dispersion : {"gene", "gene-batch", "gene-label", "gene-cell"}
    batch_key : str or None
        obs column used as the batch covariate (default ``dataset_id``; None: no batch).
    prior_cells : int
        Training cells sampled to estimate the library-size priors (see
        :mod:`atlasmix.training.ldvae.template`).
    n_template : int
        Cells in the template AnnData saved with the model.

    Raises
    ------
    AtlasmixError
        An unknown gene likelihood.
    """

    n_latent: int = DEFAULTS["n_latent"]
    n_layers: int = DEFAULTS["n_layers"]
    n_hidden: int = DEFAULTS["n_hidden"]
    dropout_rate: float = DEFAULTS["dropout_rate"]
    gene_likelihood: str = DEFAULTS["gene_likelihood"]
    dispersion: str = DEFAULTS["dispersion"]
    batch_key: str | None = "dataset_id"
    prior_cells: int = 50_000
    n_template: int = 1000

    def __post_init__(self):
        if self.gene_likelihood not in GENE_LIKELIHOODS:
            raise AtlasmixError(f"gene likelihood must be nb, zinb or poisson, got {self.gene_likelihood!r}")


def ddp_strategy(devices: int, strategy: str) -> str:
    """Lightning strategy for ``devices`` devices per node (``"auto"`` on one device).

    Parameters
    ----------
    devices : int
        Devices per node (Lightning's ``devices``), >= 1.
    strategy : str
        ``auto`` (``ddp_find_unused_parameters_true`` on several devices), ``ddp`` or
        ``ddp_find_unused_parameters_true``. LinearSCVI holds parameters that an ``nb`` or
        ``poisson`` likelihood never uses (the decoder's dropout head), which plain ``ddp`` refuses
        at the first step; scvi-tools' multi-GPU guide uses the same strategy.

    Returns
    -------
    str

    Raises
    ------
    AtlasmixError
        ``devices`` < 1, or a strategy other than these. ``ddp_spawn`` / ``ddp_fork`` are refused:
        they train in child processes and would have to pickle the store's loaders in and the model
        out; with ``ddp`` every rank re-runs the command (Lightning's subprocess launcher, or
        ``torchrun``), opens the store itself and reads only its shard.
    """
    if devices < 1:
        raise AtlasmixError(f"--devices must be >= 1, got {devices}")
    if strategy == "auto":
        return "ddp_find_unused_parameters_true" if devices > 1 else "auto"
    if strategy in ("ddp", "ddp_find_unused_parameters_true"):
        return strategy
    raise AtlasmixError(f"--strategy must be auto, ddp or ddp_find_unused_parameters_true, got {strategy!r}")


@dataclass(frozen=True)
class LDVAETrainOptions(_Options):
    """How long and where LDVAE trains: scvi-tools' training plan and Lightning trainer settings.

    Attributes
    ----------
    max_epochs : int
        Epochs (the budget when ``budget`` is not given).
    early_stopping : bool
        Stop when the validation loss stalls (with ``max_epochs``, when ``budget`` is not given).
    budget : Budget, optional
        How long to train (:class:`atlasmix.training.budget.Budget`, or its short form such as
        ``cells=200000``, parsed here): cells seen, steps, epochs or until converged. Validation
        runs every ``budget.val_every`` steps; the KL weight warms up over ``kl_warmup_fraction``
        of the steps (None: scvi-tools' 400-epoch warm-up for an ``epochs`` budget, as scFM-datamix
        trained, and 25 % of the steps otherwise). None: ``epochs=max_epochs`` (until converged
        with ``early_stopping``), see :meth:`resolved_budget`.
    lr : float
        Adam learning rate (> 0).
    seed : int
        Seed of the weights, dropout and the data order (the loaders' ``seed``).
    accelerator : str
        Lightning accelerator: ``auto`` (CUDA when present), ``cpu``, ``gpu``.
    devices, strategy, num_nodes : int, str, int
        Data-parallel training (Lightning DDP, :func:`ddp_strategy`) on ``devices`` devices per node
        and ``num_nodes`` nodes. Every rank runs :func:`~atlasmix.training.ldvae.train_ldvae`
        (Lightning's launcher re-runs the command for ranks 1.. of a node; under ``torchrun`` each
        rank is started by it), reads only its shard of the training split
        (:meth:`MixtureLoader.with_shard <atlasmix.training.loader.MixtureLoader.with_shard>`:
        whole blocks, equal batch counts, up to one block per rank dropped per epoch and served in
        another), and rank 0 writes the outputs. The loader's ``batch_size`` is per rank (the
        global minibatch is ``batch_size x ranks``) and the budget counts every rank's cells.
        Checkpoints hold every rank's loader position and RNG state; resume with the same number
        of ranks.
    validation : bool
        Compute validation losses on the manifest's validation split (if it has one).
    checkpoint_every : int
        Lightning checkpoint every this many epochs (and ``last.ckpt``); 0 disables.
    rda : dict, optional
        Read-depth-aware downsampling of the training cells (scFoundation's augmentation,
        :class:`atlasmix.training.rda.ReadDepthAugment`): ``{}`` for its defaults, or ``p``,
        ``beta``, ``min_total``; drawn anew each epoch (seeded by ``seed``), applied to every IO
        batch, so each minibatch's library size is the downsampled one (with the loader's default
        ``library="counts"``; ``"total_counts"`` keeps obs' whole-cell totals). Validation cells and the
        library-size prior's sample stay whole. None (default): off.

    Raises
    ------
    AtlasmixError
        A learning rate <= 0, ``devices`` or ``num_nodes`` < 1, an unknown strategy, a bad budget.
    """

    max_epochs: int = DEFAULTS["max_epochs"]
    early_stopping: bool = DEFAULTS["early_stopping"]
    budget: Budget | str | None = None
    lr: float = DEFAULTS["lr"]
    seed: int = 0
    accelerator: str = "auto"
    devices: int = 1
    strategy: str = "auto"
    num_nodes: int = 1
    validation: bool = True
    checkpoint_every: int = 10
    rda: dict[str, Any] | None = None

    def __post_init__(self):
        ddp_strategy(self.devices, self.strategy)
        if self.num_nodes < 1:
            raise AtlasmixError(f"--num-nodes must be >= 1, got {self.num_nodes}")
        if not self.lr > 0:
            raise AtlasmixError(f"the learning rate must be > 0, got {self.lr}")
        if isinstance(self.budget, str):
            object.__setattr__(self, "budget", Budget.parse(self.budget))

    @property
    def world_size(self) -> int:
        """Ranks: ``devices x num_nodes``."""
        return self.devices * self.num_nodes

    @property
    def lightning_strategy(self) -> str:
        """The Lightning strategy (:func:`ddp_strategy`)."""
        return ddp_strategy(self.devices, self.strategy)

    def resolved_budget(self) -> Budget:
        """``budget``, or ``epochs=max_epochs`` (until converged with ``early_stopping``) without one."""
        if self.budget is not None:
            return self.budget
        return Budget(unit="epochs", value=self.max_epochs, until_converged=self.early_stopping,
                      n_validations=self.max_epochs, kl_warmup_fraction=None)


def route_options(kwargs: dict[str, Any], *groups: _Options) -> list:
    """Option groups with keyword arguments applied to the group that has each field.

    Parameters
    ----------
    kwargs : dict
        Field names of the groups and their values (a name in several groups goes to each).
    *groups : option group instances
        The starting values.

    Returns
    -------
    list
        The groups, in order, with the fields of ``kwargs`` replaced.

    Raises
    ------
    TypeError
        A keyword that is no field of any group.
    """
    unknown = [k for k in kwargs if not any(k in g.field_names() for g in groups)]
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
    return [g.replace(**{k: v for k, v in kwargs.items() if k in g.field_names()}) for g in groups]
