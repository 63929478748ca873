"""The slow side of the lifecycle: start, probe, stop and remove model workers.

The pool decides (under its lock) and calls ``start_load`` / ``start_stop`` / ``start_cleanup``,
which only spawn a thread. The thread talks to supervisord and the worker without any lock and
reports back through the pool's methods, naming the generation it worked for.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from controlplane.adapters.procmem import pids_with_cmdline, terminate, tree_memory_mb
from controlplane.adapters.supervisord import (
    SupervisorClient,
    SupervisorError,
    SupervisorUnavailable,
    UnknownProgram,
)
from controlplane.adapters.worker import WorkerProbe
from controlplane.node import Node
from controlplane.pool import ModelPool
from controlplane.records import Lifecycle, Record
from controlplane.settings import IN_PROCESS_BACKENDS, ModelEntry
from controlplane.specs import build_spec

log = logging.getLogger("modelpool.lifecycle")

POLL_SECONDS = 0.05
#: Ports tried for one load when gunicorn finds its port taken.
PORT_ATTEMPTS = 3
#: What gunicorn logs when its port is taken (it retries for 5 s before giving up).
BIND_FAILED = "Connection in use"
PROCESS_CHECK_SECONDS = 0.5
#: supervisord states in which a worker that is loading is still alive.
STARTING_STATES = frozenset({"STARTING", "RUNNING"})


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b(:|$)")


def log_excerpt(tail: str, lines: int = 3) -> str:
    """What a worker log says went wrong, on one line: its last exception, else its last lines."""
    kept = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    exceptions = [ln for ln in kept if _EXCEPTION_LINE.match(ln)]
    if exceptions:
        return exceptions[-1]
    return " | ".join(kept[-lines:])


class Workers(Lifecycle):
    """Runs lifecycle side effects in background threads."""

    def __init__(
        self, pool: ModelPool, node: Node, supervisor: SupervisorClient, probe: WorkerProbe
    ) -> None:
        self.pool = pool
        self.node = node
        self.supervisor = supervisor
        self.probe = probe
        self.stopping = threading.Event()
        self._threads: set[threading.Thread] = set()
        self._threads_lock = threading.Lock()
        self._program_locks: dict[str, threading.Lock] = {}
        #: Size of each program's log when its worker was last started.
        self._log_offsets: dict[str, int] = {}
        #: Called before a worker is stopped (the service registry withdraws it first).
        self.before_stop: Callable[[str], None] = lambda model_id: None

    def spawn(self, name: str, fn: Callable[..., object], *args: Any) -> None:
        """Run ``fn(*args)`` in a daemon thread that is tracked for ``join``."""

        def run() -> None:
            try:
                fn(*args)
            except _Abandoned:
                pass
            except Exception:
                log.exception("lifecycle task %s failed", name)
            finally:
                with self._threads_lock:
                    self._threads.discard(threading.current_thread())

        t = threading.Thread(target=run, name=f"modelpool-{name}", daemon=True)
        with self._threads_lock:
            self._threads.add(t)
        try:
            t.start()
        except BaseException:
            with self._threads_lock:
                self._threads.discard(t)
            raise

    def join(self, timeout: float) -> None:
        """Wait for running tasks (used at shutdown and by tests)."""
        limit = time.monotonic() + timeout
        while True:
            with self._threads_lock:
                threads = list(self._threads)
            if not threads or time.monotonic() >= limit:
                return
            threads[0].join(max(0.0, limit - time.monotonic()))

    # --- Lifecycle ----------------------------------------------------------------------------

    def start_load(self, model_id: str, gen: int, adopt: bool) -> None:
        self.spawn(f"load-{model_id}", self._load, model_id, gen, adopt)

    def start_stop(self, model_id: str, gen: int, force: bool) -> None:
        self.spawn(f"stop-{model_id}", self._stop, model_id, gen, force)

    def hurry(self, model_id: str, gen: int) -> None:
        self.spawn(f"hurry-{model_id}", self._hurry, model_id, gen)

    def start_cleanup(self, model_id: str, gen: int) -> None:
        self.spawn(f"cleanup-{model_id}", self._cleanup, model_id, gen)

    def program_lock(self, program: str) -> threading.Lock:
        """One lock per program: jobs on the same supervisord program never interleave."""
        with self._threads_lock:
            return self._program_locks.setdefault(program, threading.Lock())

    # --- tasks --------------------------------------------------------------------------------

    def _load(self, model_id: str, gen: int, adopt: bool) -> None:
        rec = self.pool.load_info(model_id, gen)
        if rec is None or rec.port is None:
            return
        try:
            self._load_ports(model_id, gen, adopt, rec)
        except _Abandoned:
            raise
        except Exception as exc:
            # Whatever went wrong, the model must not stay WARMING with nobody to move it.
            log.exception("load of %s failed unexpectedly", model_id)
            self._fail(model_id, gen, rec.program, _Failure(f"load failed: {exc}", "start_error"))

    def _load_ports(self, model_id: str, gen: int, adopt: bool, rec: Record) -> None:
        """Start the worker, on another port if gunicorn finds its port taken."""
        assert rec.port is not None
        port = rec.port
        failure: _Failure | None = None
        with self.program_lock(rec.program):
            for attempt in range(PORT_ATTEMPTS):
                if not self.pool.still_warming(model_id, gen):
                    return
                failure = self._attempt(model_id, gen, rec.program, port, rec.entry, adopt)
                if failure is None:
                    return
                if failure.reason != "port_in_use" or attempt == PORT_ATTEMPTS - 1:
                    break
                # Someone took the port between our check and gunicorn's bind: another port.
                log.warning("port taken model=%s port=%s: %s", model_id, port, failure)
                if not self._remove(rec.program):
                    break
                new_port = self.pool.reassign_port(model_id, gen, port)
                if new_port is None:
                    break
                port = new_port
            if failure is None:
                return
            if failure.reason == "port_in_use":
                failure = _Failure(failure.message, "start_error")
            self._fail(model_id, gen, rec.program, failure)

    def _attempt(
        self, model_id: str, gen: int, program: str, port: int, entry: ModelEntry, adopt: bool
    ) -> _Failure | None:
        """Start (unless adopting) and wait for one worker; None once it is ready."""
        try:
            if not adopt:
                self._start_worker(model_id, gen, program, port, entry)
            return self._await_ready(model_id, gen, program, port, entry.backend)
        except _Abandoned:
            raise
        except SupervisorUnavailable as exc:
            return _Failure(f"supervisord is not reachable: {exc}", "supervisord")
        except Exception as exc:  # anything else must still end the load
            log.exception("starting %s failed", program)
            return _Failure(f"could not start worker {program}: {exc}", "start_error")

    def _start_worker(
        self, model_id: str, gen: int, program: str, port: int, entry: ModelEntry
    ) -> None:
        s = self.pool.settings
        spec = build_spec(entry, s, port, str(self.node.paths.api_key_file))
        self.pool.started_with(model_id, gen, spec.fingerprint())
        self.node.write_program(program, port, s.graceful_shutdown_seconds, spec.to_json())
        self._mark_log(program)
        self.supervisor.add_program(program)
        self.supervisor.start(program)

    def _mark_log(self, program: str) -> None:
        """Remember where this run's output starts in the program's (appended) log."""
        try:
            self._log_offsets[program] = self.node.paths.program_log(program).stat().st_size
        except OSError:
            self._log_offsets[program] = 0

    def _log_since_start(self, program: str, length: int = 2000) -> str:
        """The end of what the worker logged since it was started (not earlier runs)."""
        path = self.node.paths.program_log(program)
        try:
            with path.open("rb") as fh:
                size = fh.seek(0, 2)
                start = self._log_offsets.get(program, 0)
                start = 0 if start > size else start  # rotated meanwhile
                fh.seek(max(start, size - length))
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    def _fail(self, model_id: str, gen: int, program: str, failure: _Failure) -> None:
        log.warning("load failed model=%s reason=%s error=%s", model_id, failure.reason, failure)
        removed = self._remove(program)
        self.pool.load_failed(
            model_id,
            gen,
            str(failure),
            failure.reason,
            removed=removed,
            permanent=failure.permanent,
        )

    @staticmethod
    def measure(backend: str, pid: int | None, reported: float | None) -> float | None:
        """A worker's memory: its process tree's (PSS, else USS) for in-process backends, else
        what it reports (Ollama's own figure)."""
        if backend in IN_PROCESS_BACKENDS:
            return tree_memory_mb(pid)
        return reported

    def _await_ready(
        self, model_id: str, gen: int, program: str, port: int, backend: str
    ) -> _Failure | None:
        """Poll the worker until ready; None when ready (or superseded), else the error.

        Raises _Abandoned when the control plane shuts down: the worker keeps running and the
        next control plane adopts it.
        """
        timeout = self.pool.settings.load_timeout_seconds
        limit = time.monotonic() + timeout
        next_check = time.monotonic() + PROCESS_CHECK_SECONDS
        host = self.node.bind_host
        while True:
            if self.stopping.is_set():
                raise _Abandoned
            if not self.pool.still_warming(model_id, gen):
                return None
            health = self.probe.health(host, port, 1.0)
            if health is not None and health.model not in (None, model_id):
                return _Failure(
                    f"port {port} is answered by a worker for {health.model!r}", "start_error"
                )
            if health is not None and health.status == "ready":
                # The pid an operator sees in supervisorctl: gunicorn's master, not its worker.
                pid = self.supervisor.process(program).pid
                memory = self.measure(backend, pid, health.memory_mb)
                self.pool.became_ready(model_id, gen, memory, pid, health.requests_served)
                return None
            if health is not None and health.status == "error":
                error = health.error or "unknown error"
                return _Failure(
                    f"worker reported: {error}",
                    "backend_error",
                    permanent=health.error_kind == "permanent",
                )
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + PROCESS_CHECK_SECONDS
                gone = self._exited(program)
                if gone:
                    return _Failure(gone, "exited")
                if BIND_FAILED in self._log_since_start(program, 400):
                    return _Failure(f"port {port} is held by another process", "port_in_use")
            if time.monotonic() >= limit:
                return _Failure(f"not ready within load_timeout_seconds ({timeout:g} s)", "timeout")
            self.stopping.wait(POLL_SECONDS)

    def _exited(self, program: str) -> str | None:
        try:
            info = self.supervisor.process(program)
        except UnknownProgram:
            return f"worker {program} is no longer known to supervisord"
        if info.state in STARTING_STATES:
            return None
        tail = log_excerpt(self._log_since_start(program))
        return f"worker exited ({info.state}, exit status {info.exitstatus})" + (
            f": {tail}" if tail else ""
        )

    def _stop(self, model_id: str, gen: int, force: bool) -> None:
        rec = self.pool.load_info(model_id, gen)
        if rec is None:
            return
        removed = False
        try:
            self.before_stop(model_id)
            if force:
                # gunicorn's quick shutdown: no drain.
                self.supervisor.signal(rec.program, "QUIT")
            with self.program_lock(rec.program):
                removed = self._remove(rec.program)
        finally:
            if removed:
                self.pool.stopped(model_id, gen)
            else:
                self.pool.set_busy(model_id, gen, False)  # the reaper tries again

    def _hurry(self, model_id: str, gen: int) -> None:
        """Cut the drain of a worker that is already stopping (a forced unload)."""
        rec = self.pool.load_info(model_id, gen)
        if rec is not None:
            self.supervisor.signal(rec.program, "QUIT")

    def _cleanup(self, model_id: str, gen: int) -> None:
        rec = self.pool.load_info(model_id, gen)
        if rec is None:
            return
        removed = False
        try:
            with self.program_lock(rec.program):
                removed = self._remove(rec.program)
        finally:
            self.pool.cleaned(model_id, gen, removed=removed)

    def remove_stale(self, program: str) -> bool:
        """Remove a program that belongs to no loaded model (adoption, orphan sweep).

        Checked again under the program's lock: its model may have started loading since the
        process list that called it an orphan was read.
        """
        with self.program_lock(program):
            if program in self.pool.programs_in_use():
                return False
            return self._remove(program)

    def _remove(self, program: str) -> bool:
        """Stop (draining), forget and delete a worker's program; idempotent.

        Returns False (after logging) if supervisord could not be told, so that the caller keeps
        the port and retries instead of leaving an orphan holding it.
        """
        s = self.pool.settings
        try:
            self.supervisor.stop(program, timeout=s.graceful_shutdown_seconds + 30)
            self._kill_leftovers(program)
            self.node.delete_program(program)
            self.supervisor.remove_program(program)
        except (SupervisorError, OSError) as exc:
            log.error("removing program %s failed: %s", program, exc)
            return False
        return True

    def _kill_leftovers(self, program: str) -> None:
        """Stop what a killed gunicorn master left behind (its worker, holding port and model).

        supervisord kills the process group only when it stops a program itself; a master
        killed from outside orphans its worker. They carry the spec path on their command line.
        """
        leftovers = pids_with_cmdline(f"MODELPOOL_SPEC={self.node.paths.spec_file(program)}")
        if leftovers:
            log.warning("stopping leftover processes of %s: %s", program, leftovers)
            terminate(leftovers)


@dataclass(frozen=True)
class _Failure:
    """Why a load failed: a message, and its reason from ``stats.LOAD_FAILURE_REASONS``."""

    message: str
    reason: str
    #: Retrying will not help until the registry entry changes (bad file, unknown model).
    permanent: bool = False

    def __str__(self) -> str:
        return self.message


class _Abandoned(Exception):
    """The control plane is shutting down in the middle of a load."""
