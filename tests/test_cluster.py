"""``atlasmix.cluster.dask_client``: the local cluster of ``--workers N`` (real worker processes)."""

from __future__ import annotations

import os

import pytest

from atlasmix.cluster import dask_client
from atlasmix.errors import AtlasmixError


def test_local_workers_are_processes_and_get_one_device_each():
    with dask_client(None, 2, threads_per_worker=1, devices=2) as client:
        pids = client.run(os.getpid)
        assert len(pids) == 2 and os.getpid() not in pids.values()  # worker processes, not threads of this one
        assert set(client.nthreads().values()) == {1}
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        assert sorted(seen.values()) == ["0", "1"]  # one device per worker


def test_no_client_without_workers_or_scheduler_and_bad_combinations_refused():
    with dask_client(None, 0) as client:
        assert client is None
    with pytest.raises(AtlasmixError, match="either --scheduler or --workers"):
        with dask_client("tcp://127.0.0.1:1", 2):
            pass
    with pytest.raises(AtlasmixError, match="--workers must be >= 0"):
        with dask_client(None, -1):
            pass
    with pytest.raises(AtlasmixError, match="no dask scheduler answers"):
        with dask_client("tcp://127.0.0.1:1", 0):
            pass
