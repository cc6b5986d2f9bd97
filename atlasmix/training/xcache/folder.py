"""The x cache folder: its size cap, the leases on projections in use, and their deletion.

A cache folder holds at most ``max_bytes`` of projections (:data:`X_CACHE_MAX_BYTES`,
``ATLASMIX_X_CACHE_MAX_GB``, ``train ldvae --x-cache-max-gb``): a build that would pass the cap on
its own stops and is refused, and after every build or use the least recently used other projections
are deleted until the folder fits. A process that uses a projection holds a shared ``flock`` on its
metadata file (:data:`META`) until it exits, and deletion takes the exclusive lock without waiting,
so a projection another run is reading is never deleted (the folder can then stay over the cap until
that run ends). :func:`clean_x_cache` (``atlasmix x-cache clean``) also deletes projections of an
older state of a store (never read again: the name hashes the state) and the temporary folders of
builds whose process is gone; :func:`list_x_cache` (``atlasmix x-cache list``) shows what a folder
holds.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from atlasmix.errors import AtlasmixError

#: file with what a projection holds (written last, before the rename).
META = "atlasmix_x_cache.json"

#: default size cap of one cache folder, bytes (``ATLASMIX_X_CACHE_MAX_GB`` overrides it): 64 GiB,
#: e.g. 2 h5 projections of 1M whole-transcriptome cells (13.7 GB each) and many of 2,000 genes.
X_CACHE_MAX_BYTES = 64 << 30

#: shared locks this process holds on projections it uses: path of the metadata file -> fd.
_LEASES: dict[str, int] = {}


def cap_bytes(max_bytes: int | None = None) -> int:
    """The size cap of a cache folder in bytes: ``max_bytes``, else ``ATLASMIX_X_CACHE_MAX_GB`` (GB of
    10^9 bytes), else :data:`X_CACHE_MAX_BYTES`.

    Raises
    ------
    AtlasmixError
        A negative cap, or an environment value that is not a number.
    """
    if max_bytes is None:
        env = os.environ.get("ATLASMIX_X_CACHE_MAX_GB")
        if env is None:
            return X_CACHE_MAX_BYTES
        try:
            max_bytes = int(float(env) * 1e9)
        except (ValueError, OverflowError):  # not a number, nan, inf
            raise AtlasmixError(f"ATLASMIX_X_CACHE_MAX_GB must be a finite number of GB, got {env!r}") from None
    if max_bytes < 0:
        raise AtlasmixError(f"x cache size cap must be >= 0 bytes, got {max_bytes}")
    return int(max_bytes)


def _lease(final: Path) -> bool:
    """Hold a shared lock on projection ``final`` for the rest of this process; False when it was
    deleted while we waited for the lock (then it must be built again)."""
    key = str(final / META)
    if key in _LEASES:
        os.utime(key)
        return True
    try:
        fd = _shared_lock(key)  # waits only while a clean-up holds it to delete the projection
    except FileNotFoundError:
        return False
    if not os.path.exists(key):
        os.close(fd)
        return False
    _LEASES[key] = fd
    os.utime(key)  # last use, for least-recently-used eviction
    return True


def _shared_lock(path: str | Path) -> int:
    """An fd of ``path`` holding a shared ``flock``: a lease on a projection's metadata file, which
    deletion (an exclusive lock, :func:`_lock_unused`) cannot take. Raises FileNotFoundError."""
    import fcntl

    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def _adopt_lease(final: Path, fd: int) -> None:
    """Record ``fd``, a shared lock taken on a build's metadata file before its folder was renamed to
    ``final`` (the lock moves with the file), as this process's lease on ``final``: no clean-up can
    delete the projection between the rename and the lease."""
    key = str(final / META)
    old = _LEASES.pop(key, None)
    if old is not None:
        os.close(old)
    _LEASES[key] = fd
    os.utime(key)


def release_leases(under: str | Path | None = None) -> None:
    """Drop the shared locks this process holds on projections (they become deletable): every one, or
    only those inside folder ``under`` (a run's own cache folder, before it is deleted)."""
    base = None if under is None else os.path.join(os.path.abspath(under), "")
    for key in [k for k in _LEASES if base is None or os.path.abspath(k).startswith(base)]:
        os.close(_LEASES.pop(key))


def _size(path: Path) -> int:
    """Bytes of the files under ``path``; files another process deletes meanwhile count as gone."""
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(d, f)).st_size
            except FileNotFoundError:
                pass
    return total


def _lock_unused(final: Path) -> int | None:
    """The exclusive lock on projection ``final``'s metadata file, taken without waiting: its fd, or
    None when a process (this one included) holds the projection. Raises FileNotFoundError when the
    metadata file is gone."""
    import fcntl

    key = final / META
    if str(key) in _LEASES:
        return None
    fd = os.open(key, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _delete_unless_in_use(final: Path) -> bool:
    """Delete projection ``final`` if no process holds it (exclusive lock, not waiting)."""
    try:
        fd = _lock_unused(final)
    except FileNotFoundError:  # another clean-up renamed it away meanwhile; never delete blind here:
        return True            # a build may have just renamed a finished projection into its place
    if fd is None:
        return False
    try:  # the metadata file goes first: a reader that got its lock after us finds it gone and rebuilds
        doomed = final.with_name(f"{final.name}.del-{os.getpid()}-{time.time_ns()}")
        os.rename(final, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    finally:
        os.close(fd)
    return True


def _same_store(a: str | None, b: str) -> bool:
    """Whether two store URIs name the same store: local paths compared resolved (``s6``, ``./s6``
    and ``/abs/s6`` alike), object-store URIs as written (less a trailing slash)."""
    if a is None:
        return False
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return os.path.realpath(a) == os.path.realpath(b)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_x_cache(cache_dir: str | Path) -> list[dict]:
    """What a cache folder holds, most recently used first.

    Returns
    -------
    list of dict
        One per entry: ``name``, ``kind`` (``projection``, ``unfinished`` for the temporary folder of
        a build, ``unknown`` for a folder without readable metadata), ``bytes``, ``last_used``
        (seconds since the epoch: the metadata file's mtime), ``in_use`` (another process holds it),
        and for projections ``format``, ``store_uri``, ``state_hash``, ``n_obs``, ``n_vars``, ``nnz``.
    """
    root = Path(cache_dir)
    out = []
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            row = _entry(p)
        except FileNotFoundError:  # deleted by another process (a clean-up, a finished build) meanwhile
            continue
        if row is not None:
            out.append(row)
    return sorted(out, key=lambda r: -r["last_used"])


def _entry(p: Path) -> dict | None:
    """:func:`list_x_cache`'s row for folder ``p`` (None: not an x cache entry)."""
    if not p.is_dir() or not p.name.startswith("x-"):
        return None
    row = {"name": p.name, "bytes": _size(p), "last_used": p.stat().st_mtime, "in_use": False}
    if ".tmp-" in p.name or ".del-" in p.name:  # <name>.tmp-<pid>-<ns>: in use while <pid> lives
        pid = p.name.split("-")[-2]
        row.update(kind="unfinished", in_use=pid.isdigit() and _pid_alive(int(pid)))
    elif (p / META).exists():
        try:
            meta = json.loads((p / META).read_text())
        except (OSError, ValueError):
            meta = None
        if meta is None:
            row["kind"] = "unknown"
        else:
            row.update(kind="projection", last_used=(p / META).stat().st_mtime,
                       **{k: meta.get(k) for k in ("format", "store_uri", "state_hash", "n_obs", "n_vars", "nnz")})
            fd = _lock_unused(p)
            row["in_use"] = fd is None
            if fd is not None:
                os.close(fd)
    else:
        row["kind"] = "unknown"
    return row


def clean_x_cache(cache_dir: str | Path, *, max_bytes: int | None = None, stale_for=None,
                  everything: bool = False, keep: Path | None = None) -> dict:
    """Delete from a cache folder what will not be read again, then the least recently used
    projections until the folder fits ``max_bytes``.

    Parameters
    ----------
    cache_dir : str or pathlib.Path
    max_bytes : int, optional
        Cap in bytes (None: no cap applied by this call; see :func:`cap_bytes` for the default one
        :func:`~atlasmix.training.xcache.build.ensure_x_cache` applies).
    stale_for : atlasmix.store.Store, optional
        Delete this store's projections of an older state (``state_hash`` differs from the
        store's: they can never be read again).
    everything : bool
        Delete every projection not in use.
    keep : pathlib.Path, optional
        A projection never deleted by this call (the one just built or found).

    Returns
    -------
    dict
        ``removed`` (names), ``freed_bytes``, ``kept_in_use`` (names a running process holds) and
        ``bytes`` (what the folder holds afterwards).

    Notes
    -----
    Temporary folders of builds whose process is gone (``<name>.tmp-<pid>-<ns>``) are always deleted;
    those of live processes never. Projections in use by any process are never deleted.
    """
    rows = list_x_cache(cache_dir)
    root = Path(cache_dir)
    removed, freed, held = [], 0, []
    state = stale_for.identity()["state_hash"] if stale_for is not None else None

    def drop(r):
        nonlocal freed
        p = root / r["name"]
        if keep is not None and p == Path(keep):
            return False
        if r["kind"] == "unfinished":  # only those of dead processes reach here
            shutil.rmtree(p, ignore_errors=True)
            ok = True
        else:
            ok = _delete_unless_in_use(p)
        if ok:
            removed.append(r["name"])
            freed += r["bytes"]
        elif r["kind"] == "projection":
            held.append(r["name"])
        return ok

    left = []
    for r in rows:
        if r["kind"] == "unfinished" and not r["in_use"]:
            drop(r)
        elif r["kind"] == "projection" and (everything or (
                state is not None and _same_store(r["store_uri"], stale_for.uri) and r["state_hash"] != state)):
            if not drop(r):
                left.append(r)
        else:
            left.append(r)
    if max_bytes is not None:
        total = sum(r["bytes"] for r in left)
        for r in sorted((r for r in left if r["kind"] == "projection"), key=lambda r: r["last_used"]):
            if total <= max_bytes:
                break
            if drop(r):
                total -= r["bytes"]
    return {"removed": removed, "freed_bytes": int(freed), "kept_in_use": sorted(set(held)),
            "bytes": int(sum(r["bytes"] for r in rows) - freed)}
