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

from controlplane.adapters.procmem import tree_memory_mb
from controlplane.adapters.supervisord import (
    SupervisorError,
    SupervisorUnavailable,
    UnknownProgram,
)
from controlplane.adapters.worker import WorkerProbe
from controlplane.nodes import WorkerNode
from controlplane.pool import ModelPool
from controlplane.records import Lifecycle, Record, model_of
from controlplane.settings import IN_PROCESS_BACKENDS, ModelEntry

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

    def __init__(self, pool: ModelPool, nodes: dict[str, WorkerNode], probe: WorkerProbe) -> None:
        self.pool = pool
        #: Every node by name (the local one included): where each record's worker runs.
        self.nodes = nodes
        self.probe = probe
        self.stopping = threading.Event()
        self._threads: set[threading.Thread] = set()
        self._threads_lock = threading.Lock()
        self._program_locks: dict[tuple[str, str], threading.Lock] = {}
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

    def program_lock(self, node: str, program: str) -> threading.Lock:
        """One lock per program and node: jobs on the same program never interleave (a model
        loaded again on another node does not wait for a stop on a node that is gone)."""
        with self._threads_lock:
            return self._program_locks.setdefault((node, program), threading.Lock())

    def node_of(self, rec: Record) -> WorkerNode | None:
        return self.nodes.get(rec.node) if rec.node is not None else None

    # --- tasks --------------------------------------------------------------------------------

    def _load(self, model_id: str, gen: int, adopt: bool) -> None:
        rec = self.pool.load_info(model_id, gen)
        node = None if rec is None else self.node_of(rec)
        if rec is None or rec.port is None or node is None:
            return
        try:
            self._load_ports(model_id, gen, adopt, rec, node)
        except _Abandoned:
            raise
        except Exception as exc:
            # Whatever went wrong, the model must not stay WARMING with nobody to move it.
            log.exception("load of %s failed unexpectedly", model_id)
            failure = _Failure(f"load failed: {exc}", "start_error")
            self._fail(model_id, gen, node, rec.program, failure)

    def _load_ports(
        self, model_id: str, gen: int, adopt: bool, rec: Record, node: WorkerNode
    ) -> None:
        """Start the worker, on another port if gunicorn finds its port taken."""
        assert rec.port is not None
        port = rec.port
        failure: _Failure | None = None
        with self.program_lock(node.name, rec.program):
            for attempt in range(PORT_ATTEMPTS):
                if not self.pool.still_warming(model_id, gen):
                    return
                failure = self._attempt(model_id, gen, node, rec.program, port, rec.entry, adopt)
                if failure is None:
                    return
                if failure.reason != "port_in_use" or attempt == PORT_ATTEMPTS - 1:
                    break
                # Someone took the port between our check and gunicorn's bind: another port.
                log.warning("port taken model=%s port=%s: %s", model_id, port, failure)
                if not self._remove(node, rec.program):
                    break
                new_port = self.pool.reassign_port(model_id, gen, port)
                if new_port is None:
                    break
                port = new_port
            if failure is None:
                return
            if failure.reason == "port_in_use":
                failure = _Failure(failure.message, "start_error")
            self._fail(model_id, gen, node, rec.program, failure)

    def _attempt(
        self,
        model_id: str,
        gen: int,
        node: WorkerNode,
        program: str,
        port: int,
        entry: ModelEntry,
        adopt: bool,
    ) -> _Failure | None:
        """Start (unless adopting) and wait for one worker; None once it is ready."""
        try:
            if not adopt:
                s = self.pool.settings
                spec = node.spec(entry, s, port)
                self.pool.started_with(model_id, gen, spec.fingerprint())
                node.start(program, port, spec, s)
            return self._await_ready(model_id, gen, node, program, port, entry.backend)
        except _Abandoned:
            raise
        except SupervisorUnavailable as exc:
            return _Failure(f"supervisord is not reachable: {exc}", "supervisord")
        except Exception as exc:  # anything else must still end the load
            log.exception("starting %s failed", program)
            return _Failure(f"could not start worker {program}: {exc}", "start_error")

    def _fail(
        self, model_id: str, gen: int, node: WorkerNode, program: str, failure: _Failure
    ) -> None:
        log.warning("load failed model=%s reason=%s error=%s", model_id, failure.reason, failure)
        removed = self._remove(node, program)
        self.pool.load_failed(
            model_id,
            gen,
            str(failure),
            failure.reason,
            removed=removed,
            permanent=failure.permanent,
        )

    @staticmethod
    def measure(
        backend: str, pid: int | None, reported: float | None, local: bool = True
    ) -> float | None:
        """A worker's memory: its process tree's (PSS, else USS) for in-process backends on this
        host, else what it reports (Ollama's own figure; a worker on a node, its own RSS)."""
        if backend in IN_PROCESS_BACKENDS and local:
            return tree_memory_mb(pid)
        return reported

    def _await_ready(
        self, model_id: str, gen: int, node: WorkerNode, program: str, port: int, backend: str
    ) -> _Failure | None:
        """Poll the worker until ready; None when ready (or superseded), else the error.

        Raises _Abandoned when the control plane shuts down: the worker keeps running and the
        next control plane adopts it. The load timeout counts from the last progress the worker
        reported: a long pull that keeps moving is not cut off, one that stalls is.
        """
        timeout = self.pool.settings.load_timeout_seconds
        limit = time.monotonic() + timeout
        progressed = False
        next_check = time.monotonic() + PROCESS_CHECK_SECONDS
        host = node.address(self.pool.settings)
        while True:
            if self.stopping.is_set():
                raise _Abandoned
            if not self.pool.still_warming(model_id, gen):
                return None
            health = self.probe.health(host, port, 1.0)
            # A replica's key is ``model#k``; its worker serves the model itself.
            if health is not None and health.model not in (None, model_of(model_id)):
                return _Failure(
                    f"port {port} is answered by a worker for {health.model!r}", "start_error"
                )
            if health is not None and health.status == "ready":
                # The pid an operator sees in supervisorctl: gunicorn's master, not its worker.
                pid = node.client.process(program).pid
                memory = self.measure(backend, pid, health.memory_mb, node.local)
                self.pool.became_ready(model_id, gen, memory, pid, health.requests_served)
                return None
            if health is not None and health.status == "loading":
                # The phase moves on with or without a figure; the timeout only with more.
                further = self.pool.load_progress(model_id, gen, health.progress)
                progressed = progressed or further
                limit = time.monotonic() + timeout if further else limit
            if health is not None and health.status == "error":
                error = health.error or "unknown error"
                return _Failure(
                    f"worker reported: {error}",
                    "backend_error",
                    permanent=health.error_kind == "permanent",
                )
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + PROCESS_CHECK_SECONDS
                gone = self._exited(node, program)
                if gone:
                    return _Failure(gone, "exited")
                if BIND_FAILED in node.log_since_start(program, 400):
                    return _Failure(f"port {port} is held by another process", "port_in_use")
            if time.monotonic() >= limit:
                return _Failure(
                    f"not ready within load_timeout_seconds ({timeout:g} s)"
                    + (" of its last progress" if progressed else ""),
                    "timeout",
                )
            self.stopping.wait(POLL_SECONDS)

    def _exited(self, node: WorkerNode, program: str) -> str | None:
        try:
            info = node.client.process(program)
        except UnknownProgram:
            return f"worker {program} is no longer known to supervisord"
        if info.state in STARTING_STATES:
            return None
        tail = log_excerpt(node.log_since_start(program))
        return f"worker exited ({info.state}, exit status {info.exitstatus})" + (
            f": {tail}" if tail else ""
        )

    def _stop(self, model_id: str, gen: int, force: bool) -> None:
        rec = self.pool.load_info(model_id, gen)
        if rec is None:
            return
        node = self.node_of(rec)
        removed = node is None  # its node was lost: nothing is left to stop here
        try:
            self.before_stop(model_id)
            if node is not None:
                if force:
                    # gunicorn's quick shutdown: no drain.
                    node.client.signal(rec.program, "QUIT")
                with self.program_lock(node.name, rec.program):
                    removed = self._remove(node, rec.program)
        finally:
            if removed:
                self.pool.stopped(model_id, gen)
            else:
                self.pool.stop_failed(model_id, gen)  # the reaper tries again

    def _hurry(self, model_id: str, gen: int) -> None:
        """Cut the drain of a worker that is already stopping (a forced unload)."""
        rec = self.pool.load_info(model_id, gen)
        node = None if rec is None else self.node_of(rec)
        if rec is not None and node is not None:
            node.client.signal(rec.program, "QUIT")

    def _cleanup(self, model_id: str, gen: int) -> None:
        rec = self.pool.load_info(model_id, gen)
        if rec is None:
            return
        node = self.node_of(rec)
        removed = node is None
        try:
            if node is not None:
                with self.program_lock(node.name, rec.program):
                    removed = self._remove(node, rec.program)
        finally:
            self.pool.cleaned(model_id, gen, removed=removed)

    def remove_stale(self, node_name: str, program: str) -> bool:
        """Remove a program that belongs to no loaded model on its node (adoption, orphan
        sweep, a node back after it was lost).

        Checked again under the program's lock: its model may have started loading since the
        process list that called it an orphan was read.
        """
        node = self.nodes.get(node_name)
        if node is None:
            return False
        with self.program_lock(node_name, program):
            if program in self.pool.programs_in_use(node_name):
                return False
            return self._remove(node, program)

    def _remove(self, node: WorkerNode, program: str) -> bool:
        """Stop (draining), forget and delete a worker's program; idempotent.

        Returns False (after logging) if supervisord could not be told, so that the caller keeps
        the port and retries instead of leaving an orphan holding it.
        """
        try:
            node.remove(program, self.pool.settings)
        except (SupervisorError, OSError) as exc:
            log.error("removing program %s on node %s failed: %s", program, node.name, exc)
            return False
        return True


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
