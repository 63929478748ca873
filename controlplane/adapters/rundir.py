"""The run directory's lock: one stack per run directory.

Two control planes on one run dir would each take the other's workers for orphans and stop
them. The control plane holds an exclusive ``flock`` on ``<run dir>/modelpool.lock`` for the
life of its process (the kernel releases it when the process dies, however it dies), and
``modelpool up`` holds it while it writes the run dir and starts supervisord. The file records
the holder's pid, config dir and control port, so that whoever is refused can say who holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

LOCK_NAME: Final = "modelpool.lock"


def lock_path(run_dir: Path) -> Path:
    return run_dir / LOCK_NAME


@dataclass(frozen=True)
class Holder:
    """Who holds (or last held) a run directory; ``""`` and 0 stand for "not recorded"."""

    pid: int
    config_dir: str = ""
    control_port: int = 0

    def same_stack(self, config_dir: Path, control_port: int) -> bool:
        """Whether the holder runs the stack of ``config_dir`` on ``control_port``.

        What the record does not say is taken to match: only a recorded difference refuses.
        """
        return self.config_dir in ("", str(config_dir.resolve())) and self.control_port in (
            0,
            control_port,
        )

    def describe(self) -> str:
        details = []
        if self.config_dir:
            details.append(f"config dir {self.config_dir}")
        if self.control_port:
            details.append(f"control port {self.control_port}")
        who = f"pid {self.pid}" if self.pid else "another process"
        return f"{who} ({', '.join(details)})" if details else who


class RunDirBusy(Exception):
    """Another stack holds the run directory."""

    def __init__(self, run_dir: Path, holder: Holder) -> None:
        super().__init__(
            f"run dir {run_dir} is in use by {holder.describe()}: stop that stack first "
            "(modelpool down), or give this one another --run-dir"
        )
        self.run_dir = run_dir
        self.holder = holder


def _parse(text: str) -> Holder | None:
    try:
        data = json.loads(text)
        return Holder(
            int(data.get("pid", 0)),
            str(data.get("config_dir", "")),
            int(data.get("control_port", 0)),
        )
    except (ValueError, TypeError, AttributeError):
        return None


def last_holder(run_dir: Path) -> Holder | None:
    """The record of the process that holds the lock now, or held it last (None if none)."""
    try:
        text = lock_path(run_dir).read_text(encoding="utf-8")
    except OSError:
        return None
    return _parse(text)


def _read_holder(run_dir: Path) -> Holder:
    # The holder writes its record right after taking the lock: give it a moment to finish.
    for _ in range(10):
        found = last_holder(run_dir)
        if found is not None:
            return found
        time.sleep(0.02)
    return Holder(0)


def holder(run_dir: Path) -> Holder | None:
    """The process that holds the run dir's lock now, or None if it is free.

    Looks without writing anything: the file is opened read-only and not created.
    """
    try:
        fd = os.open(lock_path(run_dir), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        # A shared lock, dropped at once: it conflicts only with a holder's exclusive lock.
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_holder(run_dir)
    finally:
        os.close(fd)
    return None


class RunDirLock:
    """An exclusive lock on one run directory, held until ``release`` or the process ends."""

    def __init__(self, run_dir: Path, fd: int) -> None:
        self.run_dir = run_dir
        self._fd: int | None = fd

    @classmethod
    def acquire(
        cls,
        run_dir: Path,
        config_dir: Path,
        control_port: int,
        *,
        wait: float = 0.0,
        wait_same_stack: float = 0.0,
    ) -> RunDirLock:
        """Take the lock and record who holds it; raise RunDirBusy if another process has it.

        Waits up to ``wait`` seconds for the lock, or ``wait_same_stack`` while its holder is
        the same stack (a predecessor on its way out: a control plane being restarted).
        Creates the run directory (0700) if it is missing; changes nothing when refused.
        """
        run_dir = run_dir.resolve()
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(lock_path(run_dir), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        started = time.monotonic()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                current = _read_holder(run_dir)
                same = current.same_stack(config_dir, control_port)
                if time.monotonic() - started >= (wait_same_stack if same else wait):
                    os.close(fd)
                    raise RunDirBusy(run_dir, current) from None
                time.sleep(0.1)
        record = {
            "pid": os.getpid(),
            "config_dir": str(config_dir.resolve()),
            "control_port": control_port,
        }
        data = (json.dumps(record) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        return cls(run_dir, fd)

    def release(self) -> None:
        """Give the lock up (closing the file releases it); the record stays as the last one."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
