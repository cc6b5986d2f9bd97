"""Read-depth-aware (RDA) downsampling of minibatches, a loader augmentation for any model.

scFoundation (Hao et al. 2024, *Nature Methods* 21:1481, Methods "read-depth-aware pretraining")
trains on cells whose counts were binomially downsampled to a lower depth: each count ``c`` of a
chosen cell becomes ``Binomial(c, gamma)`` with one fraction ``gamma`` per cell, and the model is
told both depths (its S token is the downsampled total, T the original one:
:mod:`atlasmix.training.scfoundation.encoding`). The same augmentation teaches any count model --
LDVAE included -- to be robust to sequencing depth.

Defaults: half of the cells (``p = 0.5``) with ``gamma ~ Beta(2, 2)``; cells with fewer than 1,000
counts on the gene axis stay whole (``min_total``). scFoundation's training code is not public: these
follow the paper's description (a random fraction, part of the cells, shallow cells left whole) and
are parameters, not its exact values. A downsampled cell that would lose every count stays whole.

The draws come from a numpy ``Generator`` seeded by ``(seed, epoch, the batch's soma_joinids)``, so a
batch is augmented the same way whenever it recurs (a resumed run, another process) and differently
each epoch (:meth:`ReadDepthAugment.set_epoch`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from atlasmix.errors import AtlasmixError


def downsample(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, cell_keys: np.ndarray, *, p: float = 0.5,
               beta: tuple[float, float] = (2.0, 2.0), min_total: float = 1000.0,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Binomially downsample a CSR batch of counts (module doc).

    Parameters
    ----------
    indptr, indices, data : numpy.ndarray
        CSR of the batch, shape (B + 1,), (nnz,), (nnz,); ``data`` whole counts.
    cell_keys : numpy.ndarray of int64, shape (B,)
        The cells' ``soma_joinid`` (they seed the draws).
    p : float
        Fraction of the cells downsampled, in [0, 1].
    beta : (float, float)
        Parameters of the Beta distribution of the kept fraction ``gamma``.
    min_total : float
        Cells with fewer counts on the axis are never downsampled.
    seed : int

    Returns
    -------
    indptr, indices, data, original_total
        The downsampled CSR (zeros removed; ``data`` of the input dtype) and, per cell, the library
        size before downsampling (float64, (B,); -1 for cells left whole).

    Raises
    ------
    AtlasmixError
        ``p`` outside [0, 1], a Beta parameter <= 0, or counts that are not whole numbers.
    """
    if not 0.0 <= p <= 1.0 or min(beta) <= 0:
        raise AtlasmixError(f"RDA needs 0 <= p <= 1 and Beta parameters > 0, got p={p}, beta={beta}")
    indptr = np.asarray(indptr, dtype=np.int64)
    data = np.asarray(data)
    B = len(indptr) - 1
    counts = np.rint(data).astype(np.int64)
    if not np.array_equal(counts, data):
        raise AtlasmixError("RDA downsamples raw counts; this batch has values that are not whole numbers")
    cs = np.concatenate([[0], np.cumsum(counts)])
    totals = (cs[indptr[1:]] - cs[indptr[:-1]]).astype(np.float64)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & (2**63 - 1)]
                                                       + [int(k) & (2**63 - 1) for k in cell_keys]))
    chosen = (rng.random(B) < p) & (totals >= min_total)
    gamma = rng.beta(beta[0], beta[1], B)
    per_nz = np.repeat(np.arange(B), np.diff(indptr))
    sel = chosen[per_nz]
    new = counts.copy()
    new[sel] = rng.binomial(counts[sel], gamma[per_nz[sel]])
    ncs = np.concatenate([[0], np.cumsum(new)])
    emptied = chosen & ((ncs[indptr[1:]] - ncs[indptr[:-1]]) == 0)
    if emptied.any():  # a cell never loses every count: it stays whole
        back = emptied[per_nz]
        new[back] = counts[back]
        chosen &= ~emptied
    keep = new > 0
    kcs = np.concatenate([[0], np.cumsum(keep)])
    out_indptr = kcs[indptr]
    original = np.where(chosen, totals, -1.0)
    return out_indptr, np.asarray(indices)[keep], new[keep].astype(data.dtype), original


class ReadDepthAugment:
    """RDA as a transform of the loader's sparse minibatches (module doc).

    Parameters
    ----------
    p, beta, min_total, seed
        As :func:`downsample`.

    Notes
    -----
    Two ways in: as the loader's ``augment`` (:meth:`csr`, every IO batch, any model: LDVAE's
    ``train_ldvae(rda=...)``), or called on a :class:`~atlasmix.training.loader.MixtureLoader` batch
    built with ``sparse=True``, which it returns with ``X`` downsampled, ``original_total`` (float64
    (B,), -1 where whole) and, when present, ``library_size`` scaled by each cell's kept fraction of
    its counts on the axis.
    :meth:`set_epoch` changes the draws between epochs.
    """

    def __init__(self, *, p: float = 0.5, beta: tuple[float, float] = (2.0, 2.0), min_total: float = 1000.0,
                 seed: int = 0):
        if not 0.0 <= p <= 1.0 or min(beta) <= 0:
            raise AtlasmixError(f"RDA needs 0 <= p <= 1 and Beta parameters > 0, got p={p}, beta={beta}")
        self.p, self.beta, self.min_total, self.seed, self.epoch = float(p), tuple(beta), float(min_total), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def csr(self, m, cell_keys: np.ndarray, epoch: int):
        """:func:`downsample` of a scipy CSR (a loader's IO batch, ``augment=``); draws keyed by the seed,
        ``epoch`` and the cells' ``soma_joinid``.

        Returns
        -------
        scipy.sparse.csr_matrix
            Same shape and dtype, zeros removed.
        """
        import scipy.sparse as sp

        indptr, indices, data, _ = downsample(m.indptr, m.indices, m.data, cell_keys, p=self.p, beta=self.beta,
                                              min_total=self.min_total, seed=self.seed * 1_000_003 + int(epoch))
        return sp.csr_matrix((data, indices, indptr), shape=m.shape)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        X = batch["X"]
        indptr, indices, data, orig = downsample(
            X.crow_indices().numpy(), X.col_indices().numpy(), X.values().numpy(), batch["soma_joinid"].numpy(),
            p=self.p, beta=self.beta, min_total=self.min_total, seed=self.seed * 1_000_003 + self.epoch)
        out = dict(batch)
        out["X"] = torch.sparse_csr_tensor(torch.from_numpy(indptr), torch.from_numpy(indices.astype(np.int64)),
                                           torch.from_numpy(data), size=tuple(X.shape))
        out["original_total"] = torch.from_numpy(orig)
        if "library_size" in batch:
            c = np.concatenate([[0.0], np.cumsum(data, dtype=np.float64)])
            new_tot = c[indptr[1:]] - c[indptr[:-1]]
            frac = np.where(orig > 0, new_tot / np.where(orig > 0, orig, 1.0), 1.0)
            out["library_size"] = batch["library_size"] * torch.from_numpy(frac.astype(np.float32)).reshape(-1, 1)
        return out
