"""Minibatches of a :class:`atlasmix.training.loader.MixtureLoader`, cut out of one IO batch.

An IO batch arrives from :mod:`atlasmix.training.read` as a CSR of its cells in ascending joinid
order, with the permutation of its in-memory shuffle; minibatch ``j`` is the sorted rows
``perm[j * batch_size:(j + 1) * batch_size]``, gathered per minibatch, so the IO batch is never
copied whole. :class:`Minibatches` builds them in one of three ways:

Dense on the CPU
    Gathered, densified and summed (library size) in one compiled pass into at most 8 pooled
    ``(batch_size, genes)`` float32 buffers, each reused only once no minibatch (or view of one)
    holds it (:mod:`atlasmix.training._dense`): a whole-transcriptome minibatch is 81 MB, and
    allocating it fresh every time cost more than reading its counts. The loader's prefetch thread
    cuts the minibatches and takes their buffers. Streamed, it densifies them too (the read
    threads use the other cores). From a split held in memory the IO batch is a
    :class:`atlasmix.training.memory.HeldRows` view, never copied, and :data:`DENSIFY_THREADS`
    threads densify two minibatches at once (the compiled pass releases the GIL), handed to the
    consumer in order: on 2 CPU cores, 1M cells x 2,000 genes, the prefetch thread alone was the
    bound (~1.0 core busy, 1.0-1.1M cells/s; now 1.3-1.8M, ``benchmarks/bench_loader.py``).

CSR, moved to the device by the consumer
    The minibatch's rows as a CSR (``sparse=True``, or a dense minibatch for a device without the
    GPU path): :meth:`Minibatches.finish` moves the three arrays and builds ``X`` there.

GPU path
    On a CUDA device the host does no per-minibatch work on the counts: each IO batch (sorted CSR,
    ``io_batch_size`` cells) is pinned and copied to the GPU once, on a side stream, by the
    prefetch thread (``indices`` int32, ``data`` float32: 8 bytes per nonzero, ~1 GiB of GPU memory
    for 65,536 cells at 2,000 nonzeros per cell; the IO batch being cut plus those of the <= 4
    queued minibatches are resident, at most 3). A minibatch is then its row indices into that IO
    batch: the consumer gathers the rows' nonzeros (``repeat_interleave`` with host-known output
    sizes, so no device-to-host synchronisation) and scatters them into a zeroed dense (B, genes)
    float32 tensor. Library sizes and obs codes are computed per IO batch on the host (a few bytes
    per cell). Per-minibatch host cost is O(batch_size), not O(nonzeros).

Every minibatch also carries the per-cell fields: ``soma_joinid``, ``library_size`` and one code
array per obs column.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from atlasmix.training._dense import DenseBufferPool, gather_dense
from atlasmix.training.memory import HeldRows

#: Pooled dense CPU buffers: the <= 4 queued minibatches, the consumer's and the ones being built fit.
DENSE_BUFFERS = 8

DENSIFY_THREADS = 2
"""Most threads densifying dense CPU minibatches (see :meth:`Minibatches._densify_threads`)."""


class Minibatches:
    """Cuts the minibatches of IO batches for one pass over a loader's epoch (see module doc).

    Parameters
    ----------
    cells : numpy.ndarray of int64, shape (n_obs,)
        The split's cell soma_joinids (IO batches address cells by position into it).
    codes : dict of str to numpy.ndarray of int32, shape (n_obs,)
        obs codes per column, delivered as int64 tensors.
    library : {"counts", "total_counts"}
        ``library_size`` is the sum over the gene axis, or ``total_counts[pos]``.
    total_counts : numpy.ndarray of float32, shape (n_obs,), or None
        obs ``total_counts`` (needed for ``library="total_counts"``).
    n_vars : int
        Genes of the axis (columns of ``X``).
    batch_size : int
    device : torch.device
        Where ``X`` and ``library_size`` go.
    sparse : bool
        ``X`` as a ``torch.sparse_csr_tensor``.
    on_device : bool
        The GPU path: IO batches copied to ``device`` once, minibatches cut out there.
    io_threads : int
        The loader's read threads (they share the cores with the densify threads).
    """

    def __init__(self, *, cells: np.ndarray, codes: dict[str, np.ndarray], library: str,
                 total_counts: np.ndarray | None, n_vars: int, batch_size: int, device: torch.device,
                 sparse: bool, on_device: bool, io_threads: int = 1):
        self.cells, self.codes, self.library, self.total_counts = cells, codes, library, total_counts
        self.n_vars, self.batch_size, self.device, self.sparse = n_vars, batch_size, device, sparse
        self.on_device = on_device
        # densified on the host (see module doc); not when cut on the device, even a CPU device
        self.dense_cpu = device.type == "cpu" and not sparse and not on_device
        self._buffers = DenseBufferPool(batch_size, n_vars, capacity=DENSE_BUFFERS) if self.dense_cpu else None
        self.io_threads = io_threads
        self._densify: ThreadPoolExecutor | bool | None = None  # decided by the first dense minibatch
        self._copy_stream = None

    def _densify_threads(self, view: bool) -> ThreadPoolExecutor | None:
        """The densify threads, or None to densify in the prefetch thread: :data:`DENSIFY_THREADS`
        when the IO batches are views of a split in memory (reading them costs nothing), else only
        the cores the read threads leave. Streaming every gene on 2 cores (1M cells, IO batch
        16,384, ``bench_loader.py``), a second densify thread beside two read threads cost CPU (15.7
        vs 12.1 us per cell: two 81 MB minibatches written at once), and one densify thread handed
        its minibatches through a Future ran at 104-119k vs 131-137k cells/s inline, +0.2 GiB RSS."""
        if self._densify is None:
            cores = os.cpu_count() or 1
            n = min(DENSIFY_THREADS, cores if view else cores - self.io_threads)
            self._densify = ThreadPoolExecutor(n, thread_name_prefix="atlasmix-densify") if n > 1 else False
        return self._densify or None

    def close(self) -> None:
        """Stop the densify threads (after the minibatches being built); call once no more are cut."""
        if self._densify:
            self._densify.shutdown(wait=True, cancel_futures=True)

    def cut(self, pos: np.ndarray, m: sp.csr_matrix, perm: np.ndarray, first: int = 0,
            release: Callable[[], None] | None = None) -> Iterator[dict[str, Any]]:
        """The minibatches of one IO batch, before :meth:`finish` (run in the prefetch thread).

        Parameters
        ----------
        pos : numpy.ndarray, shape (n,)
            Positions into ``cells`` of the IO batch's rows (ascending joinid order).
        m : scipy.sparse.csr_matrix, float32, shape (n, n_vars), or HeldRows
            The IO batch (a :class:`HeldRows` view only for dense CPU minibatches).
        perm : numpy.ndarray, shape (n,)
            The in-memory shuffle: minibatch ``j`` is rows ``perm[j * batch_size:(j + 1) * batch_size]``.
        first : int
            Row of ``perm`` to start at (resuming mid-IO batch).
        release : callable, optional
            Called once ``m`` is no longer read here (the GPU path: right after the copy).
        """
        B = self.batch_size
        if self.on_device:
            dev_io = self._io_to_device(m)
            if release is not None:
                release()
            for b0 in range(first, len(pos), B):
                idx = perm[b0:b0 + B]
                yield self._device_batch(pos[idx], idx, dev_io)
        elif self.dense_cpu:
            view = isinstance(m, HeldRows)
            threads = self._densify_threads(view)
            # weak: a done Future holds its minibatch, whose buffer must go back to the pool once
            # the consumer drops it (a strong list kept a whole IO batch of them: 2x slower)
            jobs: list[weakref.ref] = []
            try:
                for b0 in range(first, len(pos), B):
                    idx = perm[b0:b0 + B]
                    rows = m.rows[idx] if view else idx
                    # the buffer (and its pool, used by this thread only) is named nowhere here: a
                    # local would keep it from the pool one minibatch longer
                    if threads is None:
                        yield self._dense_batch(pos[idx], rows, m, *self._buffers.take(len(idx)))
                        continue
                    # the consumer gets the Future
                    fut = threads.submit(self._dense_batch, pos[idx], rows, m, *self._buffers.take(len(idx)))
                    if not view:
                        jobs.append(weakref.ref(fut))
                    yield fut
                    del fut
            finally:
                # an IO batch with its own arrays is not read once this returns: the loader frees it
                # (read buffers back to their pool, shared memory released); a view needs no wait
                wait([f for f in (r() for r in jobs) if f is not None])
        else:
            for b0 in range(first, len(pos), B):
                idx = perm[b0:b0 + B]
                yield self._csr_batch(pos[idx], m[idx])

    def finish(self, b: dict[str, Any]) -> dict[str, Any]:
        """Move a minibatch from :meth:`cut` to the device and build ``X`` there (dense or CSR)."""
        if isinstance(b, Future):  # dense on the CPU, built by a densify thread
            return b.result()
        if "_dev" in b:
            return self._gather_device(b)
        if "_csr" not in b:  # dense on the CPU, built by the prefetch thread
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

    # -------------------------------------------------------------- per-cell fields
    def obs(self, pos: np.ndarray, lib: np.ndarray) -> dict[str, Any]:
        """A minibatch's per-cell fields: ``soma_joinid``, ``library_size`` (``lib`` as (B, 1)) and
        the obs codes (int64) of the cells at positions ``pos``."""
        out: dict[str, Any] = {"soma_joinid": torch.from_numpy(self.cells[pos]),
                               "library_size": torch.from_numpy(lib.reshape(-1, 1))}
        for c in self.codes:
            out[c] = torch.from_numpy(self.codes[c][pos].astype(np.int64))
        return out

    # -------------------------------------------------------------- on the CPU
    def _dense_batch(self, pos: np.ndarray, rows: np.ndarray, m: sp.csr_matrix | HeldRows, buf: np.ndarray,
                     clear: bool) -> dict[str, Any]:
        """A dense CPU minibatch: rows ``rows`` of ``m``'s arrays (of the held split for a
        :class:`HeldRows`), gathered and densified in one pass into ``buf``, a pooled buffer (see
        :mod:`atlasmix.training._dense`). Runs in a densify thread, or in the prefetch thread."""
        lib = gather_dense(m.indptr, m.indices, m.data, rows, buf, clear=clear)
        out = self.obs(pos, lib if self.library == "counts" else self.total_counts[pos])
        out["X"] = torch.from_numpy(buf)
        return out

    def _csr_batch(self, pos: np.ndarray, m: sp.csr_matrix) -> dict[str, Any]:
        """A CSR minibatch (``m``: its rows) for :meth:`finish` to move and build X on the device."""
        if self.library == "counts":
            lib = np.asarray(m.sum(axis=1), dtype=np.float32)
        else:
            lib = self.total_counts[pos]
        out = self.obs(pos, lib)
        out["_csr"] = (torch.from_numpy(m.indptr.astype(np.int64)), torch.from_numpy(m.indices.astype(np.int64)),
                       torch.from_numpy(m.data))
        if self.device.type == "cuda":
            out["_csr"] = tuple(t.pin_memory() for t in out["_csr"])
        return out

    # -------------------------------------------------------------- GPU path
    def _io_to_device(self, m: sp.csr_matrix) -> dict[str, Any]:
        """One IO batch's CSR on the device (run in the prefetch thread; see "GPU path")."""
        if self.library == "counts":
            lib = np.asarray(m.sum(axis=1), dtype=np.float32).reshape(-1)
        else:
            lib = None
        host = (torch.from_numpy(m.indptr.astype(np.int64, copy=False)),
                torch.from_numpy(m.indices.astype(np.int32, copy=False)), torch.from_numpy(m.data))
        if self.device.type == "cuda":
            if self._copy_stream is None:
                self._copy_stream = torch.cuda.Stream(device=self.device)
            with torch.cuda.stream(self._copy_stream):
                dev = tuple(t.pin_memory().to(self.device, non_blocking=True) for t in host)
            self._copy_stream.synchronize()  # the copies are done before a consumer sees them
        else:  # a copy: the host arrays may be shared-memory views released after this call
            dev = tuple(t.to(self.device, copy=True) for t in host)
        return {"indptr": dev[0], "indices": dev[1], "data": dev[2], "lens": np.diff(m.indptr), "lib": lib}

    def _device_batch(self, pos: np.ndarray, rows: np.ndarray, dev_io: dict[str, Any]) -> dict[str, Any]:
        """A minibatch of a device-resident IO batch: its rows, gathered by :meth:`_gather_device`."""
        lib = dev_io["lib"][rows] if dev_io["lib"] is not None else self.total_counts[pos]
        out = self.obs(pos, np.ascontiguousarray(lib, dtype=np.float32))
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
