"""Watching one node's workers from its process list: a worker that is gone, what each one's
``/health`` says (requests sent straight to a worker's port count like any other), and programs
that belong to no model (orphans holding memory and a port).

The reaper runs one for the stack's own supervisord; each remote node's monitor
(``controlplane.monitor``) runs its own, so one slow node never delays the others.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

from controlplane.adapters.supervisord import ProcessInfo, SupervisorClient
from controlplane.adapters.worker import WorkerProbe
from controlplane.core.slug import PROGRAM_PREFIX
from controlplane.drift import DriftRepair
from controlplane.lifecycle import Workers, log_excerpt
from controlplane.pool import ModelPool
from controlplane.records import Loaded

log = logging.getLogger("modelpool.watch")

HEALTH_TIMEOUT: Final = 0.5
ALIVE: Final = frozenset({"STARTING", "RUNNING"})
#: A serving model's worker in these states was stopped by someone else (supervisorctl stop).
OPERATOR_STOP: Final = frozenset({"STOPPING", "STOPPED"})


class WorkerWatch:
    """The workers of one node."""

    def __init__(
        self,
        pool: ModelPool,
        node: str,
        client: SupervisorClient,
        address: Callable[[], str],
        probe: WorkerProbe,
        *,
        local: bool,
    ) -> None:
        self.pool = pool
        self.node = node
        self.client = client
        self.address = address
        self.local = local
        self.probe = probe
        #: Removes a program of this node that belongs to no model (set by the service).
        self.remove: Callable[[str, str], None] = lambda node, name: None
        #: Checks the node's Ollama against its HOT Ollama models (set by the service).
        self.drift: DriftRepair | None = None
        self._sweeping: set[str] = set()

    def check(self, procs: dict[str, ProcessInfo], serving: set[str], loaded: list[Loaded]) -> None:
        """One look at the node's workers; ``serving`` and ``loaded`` were read before
        ``procs``, so a serving model whose worker is not in the list is gone."""
        host = self.address()
        for w in loaded:
            if w.model_id not in serving or w.node != self.node:
                continue
            info = procs.get(w.program)
            if info is None or info.state not in ALIVE:
                self._gone(w.model_id, w.gen, w.program, info)
                continue
            health = self.probe.health(host, w.port, HEALTH_TIMEOUT)
            if health is not None:
                self.pool.observe_worker(
                    w.model_id,
                    w.gen,
                    health.requests_served,
                    health.in_flight,
                    health.last_request_at,
                    Workers.measure(w.backend, info.pid, health.memory_mb, self.local),
                )
        self._sweep_orphans(procs)
        if self.drift is not None:
            self.drift.check(loaded, serving)

    def _sweep_orphans(self, procs: dict[str, ProcessInfo]) -> None:
        """Remove running model programs that no model owns (they would hold memory and a port)."""
        owned = self.pool.programs_in_use(self.node)
        orphans = {
            name
            for name, info in procs.items()
            if name.startswith(PROGRAM_PREFIX) and name not in owned and info.state in ALIVE
        }
        for name in orphans - self._sweeping:
            log.warning(
                "removing orphaned worker %s on node %s (pid %s)",
                name,
                self.node,
                procs[name].pid,
            )
            self.remove(self.node, name)
        self._sweeping = orphans

    def _gone(self, model_id: str, gen: int, program: str, info: ProcessInfo | None) -> None:
        state = info.state if info is not None else None
        if state in OPERATOR_STOP:
            detail = "stopped by an operator"
        elif info is None:
            detail = f"worker {program} disappeared from supervisord"
        else:
            tail = log_excerpt(self.client.log_tail(program))
            detail = f"worker exited unexpectedly ({state}, exit status {info.exitstatus})" + (
                f": {tail}" if tail else ""
            )
        self.pool.process_gone(model_id, gen, operator_stop=state in OPERATOR_STOP, detail=detail)
