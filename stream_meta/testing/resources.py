"""CPU time and resident memory of processes and their descendants, sampled from Linux
``/proc`` (None, or nothing counted, where a process is gone or ``/proc`` is missing): what
``make bench`` records of ``serve`` replicas and of the broker."""

from __future__ import annotations

import os
import resource
from pathlib import Path


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a live process, all threads (Linux ``/proc``; else None).

    >>> cpu_seconds(os.getpid()) is None or cpu_seconds(os.getpid()) >= 0
    True
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def children_cpu_seconds() -> float:
    """User + system CPU time of this process's reaped children so far."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def rss_bytes(pid: int) -> int | None:
    """Resident memory of one process (Linux ``/proc``; None when gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


def tree_pids(pid: int) -> list[int]:
    """A process and its live descendants (Linux ``/proc``)."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        if p in out:
            continue
        out.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and its live descendants (a child that exited is not counted)."""
    return sum(c for c in (cpu_seconds(p) for p in tree_pids(pid)) if c is not None)


def tree_rss_bytes(pid: int) -> int | None:
    """Resident memory of a process and its descendants (Linux ``/proc``; None when gone)."""
    if rss_bytes(pid) is None:
        return None
    return sum(r for r in (rss_bytes(p) for p in tree_pids(pid)) if r is not None)
