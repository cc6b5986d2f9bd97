"""A dask.distributed client for the commands that fan work out (``ingest``, ``study run``).

``--scheduler ADDRESS`` connects to a running cluster (``dask scheduler`` + ``dask worker``, or one
started by ``dask-jobqueue`` / ``dask-kubernetes``: see the README's multi-node recipe);
``--workers N`` starts a local cluster of N worker processes for the command's lifetime.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from atlasmix.errors import AtlasmixError


@contextlib.contextmanager
def dask_client(scheduler: str | None, workers: int, threads_per_worker: int = 1, devices: int = 0) -> Iterator:
    """A dask.distributed ``Client`` for ``--scheduler ADDRESS`` or ``--workers N`` (a local cluster of N
    worker processes, closed on exit); None when neither is given.

    Parameters
    ----------
    scheduler : str or None
        Address of a running scheduler (``tcp://host:8786``).
    workers : int
        Local worker processes to start (0: none).
    threads_per_worker : int
        Threads of each local worker (dask's ``nthreads``; tasks size their torch threads by it).
    devices : int
        GPUs to deal to the local workers, one each in turn: worker ``i`` starts with
        ``CUDA_VISIBLE_DEVICES=i % devices`` (as ``dask-cuda`` does), so every task of a worker
        trains on its own device. 0: leave the variable alone. A ``--scheduler`` cluster's
        workers are configured where they are started.

    Raises
    ------
    AtlasmixError
        Both given, ``workers`` < 0, or no scheduler answers at ``scheduler`` within 30 s.
    """
    if scheduler and workers:
        raise AtlasmixError("give either --scheduler or --workers, not both")
    if workers < 0:
        raise AtlasmixError(f"--workers must be >= 0, got {workers}")
    if not scheduler and not workers:
        yield None
        return
    from distributed import Client, LocalCluster

    if scheduler:
        _check_reachable(scheduler)
        try:
            client = Client(scheduler, timeout="30s")
        except OSError as e:
            raise AtlasmixError(f"no dask scheduler answers at {scheduler}: {e}") from None
        with client:
            yield client
        return
    if devices > 0:
        from distributed import Nanny, Scheduler, SpecCluster

        spec = {i: {"cls": Nanny, "options": {"nthreads": threads_per_worker,
                                              "env": {"CUDA_VISIBLE_DEVICES": str(i % devices)}}}
                for i in range(workers)}
        cluster = SpecCluster(workers=spec, scheduler={"cls": Scheduler, "options": {"dashboard_address": None}})
    else:
        cluster = LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker, processes=True,
                               dashboard_address=None)
    with cluster, Client(cluster) as client:
        yield client


def _check_reachable(address: str) -> None:
    """Fail at once (not after the client's 30 s of retries) when nothing listens at a ``tcp://``
    scheduler address."""
    import socket
    from urllib.parse import urlsplit

    u = urlsplit(address if "://" in address else f"tcp://{address}")
    if u.scheme != "tcp" or not u.hostname or not u.port:
        return  # tls://, inproc://... are left to distributed
    try:
        with socket.create_connection((u.hostname, u.port), timeout=10):
            pass
    except OSError as e:
        raise AtlasmixError(f"no dask scheduler answers at {address}: {e}") from None
