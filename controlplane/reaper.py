"""The reaper: one thread that watches workers and enforces TTLs and grace periods.

Each pass it asks supervisord for every process (one call), reads each loaded worker's
``/health`` (requests sent straight to a worker's port count like any other), lets the pool
apply the TTL events that are due, and saves the state file if anything changed. It then sleeps
until the next deadline, at most ``MONITOR_SECONDS`` (so a dead worker is noticed within about a
second), and wakes early when the pool signals a change.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from controlplane.adapters.supervisord import SupervisorClient, SupervisorUnavailable
from controlplane.adapters.worker import WorkerProbe
from controlplane.configstore import atomic_write
from controlplane.nodeconfig import LOCAL
from controlplane.pool import ModelPool
from controlplane.watch import WorkerWatch

log = logging.getLogger("modelpool.reaper")

MONITOR_SECONDS = 1.0
#: Deadlines that requests moved are saved at most this often (transitions at once).
SAVE_DEADLINES_SECONDS = 5.0


class StateFile:
    """The run directory's ``state.json``: deadlines that survive a control-plane restart."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> dict[str, Any]:
        """The saved models, or {} (a corrupt file is reported and ignored)."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            models = data.get("models", {})
            return models if isinstance(models, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError) as exc:
            log.warning(
                "state file %s is unreadable (%s); rebuilding from supervisord", self.path, exc
            )
            return {}

    def read_pinned(self) -> dict[str, int]:
        """Replica counts pinned by hand (``modelpool scale``), by model; {} if none."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            pinned = data.get("pinned", {})
        except (OSError, ValueError, AttributeError):
            return {}
        if not isinstance(pinned, dict):
            return {}
        return {
            m: n
            for m, n in pinned.items()
            if isinstance(m, str) and isinstance(n, int) and not isinstance(n, bool)
        }

    def write(self, data: dict[str, Any]) -> None:
        atomic_write(self.path, json.dumps(data, indent=2, sort_keys=True))


class Reaper:
    """The monitoring and TTL thread of one pool."""

    def __init__(
        self,
        pool: ModelPool,
        supervisor: SupervisorClient,
        probe: WorkerProbe,
        host: str,
        state_file: StateFile,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.pool = pool
        self.supervisor = supervisor
        #: The stack's own supervisord's workers (each remote node has a monitor of its own).
        self.watch = WorkerWatch(pool, LOCAL, supervisor, lambda: host, probe, local=True)
        self.state_file = state_file
        self.clock = clock
        self.last_tick: float | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Called at the end of every pass (the service keeps warmup models loaded).
        self.after_tick: Callable[[], None] = lambda: None
        self._saved_at = 0.0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="modelpool-reaper", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """End the thread; it writes the state file one last time as it ends.

        The reaper is the state file's only writer: if a slow pass outlasts ``timeout``, the
        thread still saves when that pass ends, and nobody else writes meanwhile.
        """
        self._stop.set()
        self._wake.set()
        if self._thread is None:
            self.save(force=True)
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("reaper pass still running after %.0f s; it saves when it ends", timeout)

    def save(self, force: bool = False) -> None:
        """Write the state file if something changed (deadlines moved: at most every 5 s)."""
        now = self.clock()
        moved = self.pool.deadlines_moved and now - self._saved_at >= SAVE_DEADLINES_SECONDS
        if not (self.pool.dirty or moved or (force and self.pool.deadlines_moved)):
            return
        version, data = self.pool.persisted()
        try:
            self.state_file.write(data)
        except OSError as exc:
            log.error("writing %s failed: %s (tried again next pass)", self.state_file.path, exc)
            return
        self.pool.saved(version)
        self._saved_at = now

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:
                log.exception("reaper pass failed")
            self._wake.wait(self.delay())
            self._wake.clear()
        try:
            self.save(force=True)
        except Exception:
            log.exception("final save of the state file failed")

    def delay(self) -> float:
        """Seconds until the next pass: the next deadline, capped by the monitor interval."""
        cap = min(MONITOR_SECONDS, self.pool.settings.check_interval_seconds)
        wakeup = self.pool.next_wakeup()
        if wakeup is None:
            return cap
        return max(0.02, min(cap, wakeup - self.clock() + 0.01))

    def tick(self) -> None:
        """One pass: processes, worker health, TTL events, state file."""
        # The pool first, then supervisord: a model that is serving in this snapshot had its
        # worker running before the process list was read, so "not in the list" means gone.
        serving = self.pool.serving_ids()
        loaded = self.pool.loaded()
        try:
            procs = {p.name: p for p in self.supervisor.all_processes()}
        except SupervisorUnavailable as exc:
            if self.pool.set_available(False):
                log.error("supervisord unavailable: %s", exc)
            procs = None  # no unload, stop or restart on it while it is away; other nodes go on
        else:
            self.pool.set_available(True)
        local = time.localtime(self.clock())
        self.pool.refresh_schedules(local.tm_wday, local.tm_hour * 60 + local.tm_min)
        if procs is not None:
            self.watch.check(procs, serving, loaded)
        # Stops and cleanups that failed earlier (supervisord was away): try them again.
        for model_id, gen, _program in self.pool.unloading_idle():
            self.pool.retry_stop(model_id, gen)
        self.pool.retry_cleanups()
        for model_id in self.pool.enforce_memory_limit():
            log.warning("model=%s evicted: measured memory is over memory_limit_mb", model_id)
        for model_id in self.pool.reload_changed():
            log.info("model=%s serves an outdated spec: draining and reloading", model_id)
        self.pool.expire(self.clock())
        self.pool.scale_replicas()
        self.save()
        self.last_tick = self.clock()
        self.after_tick()
