"""procmem on real processes: the memory of a tree, leftovers found by command line, terminate.

Each test starts a small python script (a parent with a child, or one process) and stops it by
PID when done. The script prints a PID once every process has touched its memory, so nothing is
measured before it is there.
"""

from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from controlplane.adapters import procmem
from controlplane.adapters.procmem import pids_with_cmdline, terminate, tree_memory_mb, tree_rss_mb
from tests.stack import wait_until

BALLAST_MB = 40
SHARED_MB = 128

SCRIPT = r"""
import mmap, os, signal, subprocess, sys

role, marker = sys.argv[1], sys.argv[2]


def ballast():
    return b"\x01" * (BALLAST_MB << 20)  # written, so resident


if role == "tree":  # a parent that starts a leaf, then holds memory of its own
    child = subprocess.Popen(
        [sys.executable, __file__, "leaf", marker + "-child"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    child.stdout.readline()
    held = ballast()
    print(child.pid, flush=True)
    sys.stdin.read()
    child.stdin.close()
    child.wait()
elif role == "leaf":  # exits when its parent closes stdin or dies
    held = ballast()
    print(os.getpid(), flush=True)
    sys.stdin.read()
elif role == "stubborn":  # ignores SIGTERM
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(os.getpid(), flush=True)
    sys.stdin.read()
elif role == "shared":  # a shared mapping, resident in both parent and forked child
    size = SHARED_MB << 20
    shared = mmap.mmap(-1, size, flags=mmap.MAP_SHARED)
    for at in range(0, size, mmap.PAGESIZE):
        shared[at] = 1
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        sum(shared[at] for at in range(0, size, mmap.PAGESIZE))  # fault every page in
        os.write(ready_w, b"x")
        sys.stdin.read()
        os._exit(0)
    os.read(ready_r, 1)
    print(pid, flush=True)
    sys.stdin.read()
    os.waitpid(pid, 0)
"""


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("procmem") / "tree.py"
    path.write_text(
        SCRIPT.replace("BALLAST_MB", str(BALLAST_MB)).replace("SHARED_MB", str(SHARED_MB))
    )
    return path


@pytest.fixture
def marker() -> str:
    return f"mp-procmem-{uuid.uuid4().hex}"


@contextmanager
def spawned(script: Path, role: str, marker: str) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """Start ``script`` as ``role``; yield it and the PID it printed once ready; stop by PID."""
    proc = subprocess.Popen(
        [sys.executable, str(script), role, marker],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    other: int | None = None
    try:
        other = int(proc.stdout.readline())
        yield proc, other
    finally:
        proc.stdin.close()  # the script and its child exit on EOF
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            for pid in (other, proc.pid):
                if pid:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            proc.wait(timeout=10)
        proc.stdout.close()


def _gone(pid: int) -> bool:
    """No such process, or a zombie (what an orphan stays where nobody reaps it)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_tree_memory_counts_parent_and_child(script: Path, marker: str) -> None:
    with spawned(script, "tree", marker) as (parent, child):
        total = tree_memory_mb(parent.pid)
        child_only = tree_memory_mb(child)
    assert total is not None and child_only is not None
    assert total >= 2 * BALLAST_MB * 0.9, total
    assert BALLAST_MB * 0.9 <= child_only < total, (child_only, total)


def test_tree_memory_is_none_for_a_gone_or_zombie_pid(script: Path, marker: str) -> None:
    with spawned(script, "leaf", marker) as (proc, _):
        proc.kill()
        # Not yet reaped: a zombie, which counts as gone.
        wait_until(lambda: psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE)
        assert tree_memory_mb(proc.pid) is None
    assert tree_memory_mb(proc.pid) is None  # reaped
    assert tree_memory_mb(None) is None
    assert tree_memory_mb(0) is None


def test_shared_mapping_is_not_counted_twice(script: Path, marker: str) -> None:
    """Deterministic: both processes have faulted in every page before the tree is measured."""
    with spawned(script, "shared", marker) as (parent, child):
        rss_sum = sum(psutil.Process(p).memory_info().rss for p in (parent.pid, child)) / 2**20
        total = tree_memory_mb(parent.pid)
    assert rss_sum >= 2 * SHARED_MB * 0.95, rss_sum  # what a sum of RSS would report
    assert total is not None
    assert total < 1.5 * SHARED_MB, total
    if sys.platform == "linux":  # PSS: the mapping once, split between the two
        assert total >= SHARED_MB * 0.9, total


def test_tree_memory_falls_back_to_rss_when_full_info_is_denied(
    script: Path, marker: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def denied(self: psutil.Process) -> None:
        raise psutil.AccessDenied(self.pid)

    monkeypatch.setattr(psutil.Process, "memory_full_info", denied)
    with spawned(script, "tree", marker) as (parent, _):
        total = tree_memory_mb(parent.pid)
    assert total is not None and total >= 2 * BALLAST_MB * 0.9, total


def test_pids_with_cmdline_finds_the_child_by_its_marker(script: Path, marker: str) -> None:
    with spawned(script, "tree", marker) as (parent, child):
        assert pids_with_cmdline(f"{marker}-child") == [child]
        assert sorted(pids_with_cmdline(marker)) == sorted([parent.pid, child])
    assert pids_with_cmdline(marker) == []


def test_terminate_stops_a_tree_with_sigterm(script: Path, marker: str) -> None:
    with spawned(script, "tree", marker) as (parent, child):
        started = time.monotonic()
        terminate([parent.pid, child], grace=10.0)
        took = time.monotonic() - started
        # The parent is a zombie until we reap it: terminate counted it gone at once.
        assert took < 10.0, took
        assert _gone(parent.pid) and _gone(child)
        assert pids_with_cmdline(marker) == []
        assert parent.wait(timeout=10) == -signal.SIGTERM


def test_terminate_kills_a_process_that_ignores_sigterm(script: Path, marker: str) -> None:
    with spawned(script, "stubborn", marker) as (proc, pid):
        terminate([pid], grace=0.3)
        assert proc.wait(timeout=10) == -signal.SIGKILL


def test_terminate_skips_gone_pids(script: Path, marker: str) -> None:
    with spawned(script, "leaf", marker) as (proc, pid):
        proc.kill()
        proc.wait(timeout=10)
    started = time.monotonic()
    terminate([pid], grace=5.0)  # neither raises nor waits for it
    assert time.monotonic() - started < 5.0


def test_linux_only_proc_walk_module_does_not_read_proc(script: Path, marker: str) -> None:
    """Deterministic: reads the module's fixed source, and measures a tree only once ready.

    The module used to walk /proc, which macOS lacks: unloads never finished there.
    """
    assert "/proc" not in inspect.getsource(procmem)
    assert tree_rss_mb is tree_memory_mb  # the old name still works for callers
    with spawned(script, "tree", marker) as (parent, child):
        assert (tree_rss_mb(parent.pid) or 0) >= 2 * BALLAST_MB * 0.9
        assert pids_with_cmdline(f"{marker}-child") == [child]
        terminate([parent.pid, child])
        assert _gone(parent.pid) and _gone(child)
