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
def dask_client(scheduler: str | None, workers: int, threads_per_worker: int = 1) -> Iterator:
    """A dask.distributed ``Client`` for ``--scheduler ADDRESS`` or ``--workers N`` (a ``LocalCluster`` of
    N single-threaded worker processes, closed on exit); None when neither is given.

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
    with LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
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
