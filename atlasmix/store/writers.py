"""One writer at a time: a store's exclusive write lock and the recovery each writer runs under it.

A writer (an ingest, ``atlasmix store optimize``) takes :func:`write_lock` and then runs
:func:`recover`, which rolls back what a killed writer left behind; see :mod:`atlasmix.store.store`
for why a crash at any point is invisible and recoverable. :meth:`Store.write_lock
<atlasmix.store.store.Store.write_lock>` and :meth:`Store.recover <atlasmix.store.store.Store.recover>`
call these.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from atlasmix.errors import StoreError
from atlasmix.store import schema as S
from atlasmix.store.context import is_local, local_path

if TYPE_CHECKING:
    from atlasmix.store.store import Store

#: the lock file in a local store's directory
LOCK_NAME = ".atlasmix.lock"


@contextlib.contextmanager
def write_lock(uri: str, timeout: float = 3600.0, on_wait=None) -> Iterator[None]:
    """Hold the exclusive write lock of the store at ``uri`` (blocks up to ``timeout`` seconds).

    An exclusive ``fcntl.flock`` on ``STORE/.atlasmix.lock`` (its holder's pid written in it);
    object-store URIs (``s3://``) have no lock and go through at once.

    Parameters
    ----------
    uri : str
        The store's URI.
    timeout : float
        Seconds to wait for the lock.
    on_wait : callable, optional
        Called once, with no arguments, when another writer holds the lock.

    Raises
    ------
    StoreError
        The lock could not be taken within ``timeout``.
    """
    if not is_local(uri):
        yield
        return
    path = local_path(uri) / LOCK_NAME
    fh = open(path, "a+")
    try:
        t0 = time.monotonic()
        told = False
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told and on_wait is not None:
                    on_wait()
                    told = True
                if time.monotonic() - t0 > timeout:
                    raise StoreError(f"store {uri} is locked by another writer (waited {timeout:.0f} s)")
                time.sleep(0.2)
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def recover(store: Store) -> list[str]:
    """Clean up after killed ingests of ``store``; call with the write lock held.

    Deletes the cells of ``ingesting`` datasets (an ingest that holds no lock is dead) and marks
    them ``failed``; deletes leftover cells of ``replaced`` datasets (then ``retired``). Idempotent.

    Parameters
    ----------
    store : atlasmix.store.Store

    Returns
    -------
    list of str
        dataset_ids that were rolled back.
    """
    cat = store.catalog(include_all=True)
    rolled = []
    for jid, row in cat[cat["status"].isin([S.STATUS_INGESTING, S.STATUS_REPLACED])].iterrows():
        store.delete_dataset_cells(int(jid), int(row["obs_joinid_start"]), int(row["obs_joinid_end"]))
        if row["status"] == S.STATUS_INGESTING:
            rec = row.to_dict() | {"soma_joinid": int(jid), "status": S.STATUS_FAILED, "n_cells": 0}
            store.write_catalog_rows([rec])
            rolled.append(str(row["dataset_id"]))
        else:
            rec = row.to_dict() | {"soma_joinid": int(jid), "status": S.STATUS_RETIRED}
            store.write_catalog_rows([rec])
    return rolled
