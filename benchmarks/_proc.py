"""CPU time of a process and its descendants, and its peak RSS, from Linux ``/proc`` (standard library only).

Shared by ``bench_loader.py`` and ``peer_annbatch.py`` (which runs in annbatch's own Python 3.12
venv, so this module imports nothing outside the standard library).

Why: on a machine with few cores a loader's throughput is capped by the CPU it spends per cell,
whatever it overlaps. ``cores / (CPU seconds per cell)`` is the most cells per second that loader can
reach there, so a table of cells/s next to CPU per cell says how far each loader is from its own
ceiling and how far any goal is from what the cores allow.
"""

from __future__ import annotations

import os
from pathlib import Path


def _ticks(pid: int) -> int:
    """CPU clock ticks of ``pid`` (every thread) and of the children it has reaped; 0 once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = raw[raw.rindex(")") + 2:].split()  # the command name may hold spaces
    # stat fields 14-17 (proc(5)): utime, stime, and cutime, cstime of waited-for children
    return sum(int(f) for f in fields[11:15])


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tasks:
        try:
            out += [int(c) for c in Path(f"/proc/{pid}/task/{t}/children").read_text().split()]
        except OSError:
            pass
    return out


def tree_cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system, all threads) used so far by ``pid`` and its live descendants.

    Parameters
    ----------
    pid : int, optional
        Default: this process.

    Returns
    -------
    float
        Seconds; ``nan`` off Linux (no ``/proc``). Each process of the tree counts with the children
        it has reaped, so the difference of two calls is the CPU spent between them by the tree,
        whether its workers were alive at both ends or exited and were waited for in between (a
        worker that outlives its parent, re-parented to init, is lost).
    """
    if not Path("/proc/self/stat").exists():
        return float("nan")
    todo, seen, ticks = [pid or os.getpid()], set(), 0
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        ticks += _ticks(p)
        todo += _children(p)
    return ticks / os.sysconf("SC_CLK_TCK")


def peak_rss_mib() -> float:
    """Peak RSS (MiB) of this process's own address space: Linux ``VmHWM``, reset by ``execve``
    (``ru_maxrss`` is kept across ``execve``, so a benchmark subprocess would report its parent's
    peak); ``nan`` without ``/proc``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")
