"""Processes seen through psutil: the memory of a process tree, leftovers to stop.

psutil works on Linux, macOS and the BSDs, so an unload finishes and a worker's memory is
measured wherever supervisord runs. A zombie counts as gone: it holds no memory and no port,
and nothing but its parent can make it go away.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Final

import psutil

log = logging.getLogger("modelpool.procmem")

MIB: Final = 1024.0 * 1024.0
POLL_SECONDS: Final = 0.05


def _alive(proc: psutil.Process) -> bool:
    """Whether ``proc`` (that very process, not a later one with its PID) runs, not a zombie."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # ZombieProcess too
        return False
    except psutil.AccessDenied:
        return True


def _process(pid: int) -> psutil.Process | None:
    try:
        proc = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None
    return proc if _alive(proc) else None


def _memory_bytes(proc: psutil.Process) -> int:
    """Memory ``proc`` is accountable for: PSS where known (Linux), else USS, else RSS.

    RSS counts a page shared by a gunicorn master and its worker (or a model file both map)
    once in each; PSS splits it between them and USS leaves it out, so a tree's sum is not
    inflated. RSS is the fallback where the full info is not permitted.
    """
    try:
        full = proc.memory_full_info()
    except psutil.AccessDenied:
        try:
            return int(proc.memory_info().rss)
        except psutil.Error:
            return 0
    except psutil.Error:
        return 0
    for field in ("pss", "uss", "rss"):
        value = getattr(full, field, None)
        if value is not None:
            return int(value)
    return 0


def tree_memory_mb(pid: int | None) -> float | None:
    """Memory of ``pid`` and all its descendants in MiB; None if the process is gone."""
    root = _process(pid) if pid else None
    if root is None:
        return None
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return None
    except psutil.AccessDenied:
        procs = [root]
    return sum(_memory_bytes(p) for p in procs if _alive(p)) / MIB


tree_rss_mb = tree_memory_mb  # the name callers used before the tree was measured by PSS/USS


def pids_with_cmdline(fragment: str) -> list[int]:
    """Live processes whose command line contains ``fragment`` (this process excluded)."""
    me = os.getpid()
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid == me:
            continue
        cmdline = proc.info.get("cmdline") or []
        if fragment in " ".join(cmdline) and _alive(proc):
            found.append(proc.pid)
    return found


def _signal(procs: list[psutil.Process], sig: signal.Signals) -> list[psutil.Process]:
    """Send ``sig`` to each of ``procs`` still alive; return those it reached."""
    reached = []
    for proc in procs:
        if not _alive(proc):
            continue
        try:
            proc.send_signal(sig)  # checks the PID still names the same process
        except psutil.NoSuchProcess:
            continue
        except psutil.AccessDenied:
            log.warning("not permitted to stop pid %d", proc.pid)
            continue
        reached.append(proc)
    return reached


def terminate(pids: list[int], grace: float = 2.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds, the given processes (ours, by PID)."""
    procs = [p for p in map(_process, pids) if p is not None]
    alive = _signal(procs, signal.SIGTERM)
    limit = time.monotonic() + grace
    while alive and time.monotonic() < limit:
        time.sleep(POLL_SECONDS)
        alive = [p for p in alive if _alive(p)]
    _signal(alive, signal.SIGKILL)
