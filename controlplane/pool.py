"""ModelPool: the one writer of model state.

Every state change goes through ``_apply`` under one short lock, which checks it against the
table in ``core.states``, records it, logs one line and wakes whoever waits. No lock is held
across an XML-RPC or HTTP call: the slow work (starting, probing, stopping a worker) runs in
``controlplane.lifecycle`` outside the lock and reports back through the pool's methods, which
re-check the record's generation so that a late report from an old load changes nothing.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from controlplane import views
from controlplane.core import eviction, policy
from controlplane.core.chores import ChoreEvent, next_chore
from controlplane.core.jobs import Job
from controlplane.core.slug import program_name
from controlplane.core.states import OCCUPYING, SERVING, Event, State, next_state
from controlplane.errors import (
    UnknownModel,
)
from controlplane.nodeconfig import LOCAL
from controlplane.pool_admission import Admission
from controlplane.pool_jobs import Jobs
from controlplane.pool_leases import Leasing
from controlplane.pool_nodes import Nodes, NodeSlot
from controlplane.pool_parts import Ticket
from controlplane.pool_registry import Registry
from controlplane.pool_replicas import Replicas, Scaling, best
from controlplane.pool_ttl import Ttl
from controlplane.pool_unload import Unloading
from controlplane.records import Lifecycle, Loaded, Record, Transition
from controlplane.settings import (
    MAX_WAITING_TOTAL,
    ModelEntry,
    Settings,
)
from controlplane.specs import wanted_fingerprint
from controlplane.stats import PoolStats

log = logging.getLogger("modelpool.pool")

Clock = Callable[[], float]


#: A model that crashes within this many seconds of becoming HOT keeps its failure count
#: (and so its backoff); one that ran longer starts counting again.
STABLE_SECONDS = 60.0


class ModelPool(Admission, Jobs, Unloading, Ttl, Registry, Leasing, Nodes, Replicas):
    """Registry plus lifecycle state of every model, on every node."""

    def __init__(
        self,
        settings: Settings,
        entries: tuple[ModelEntry, ...],
        clock: Clock = time.time,
        max_waiting_total: int = MAX_WAITING_TOTAL,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._records: dict[str, Record] = {
            e.model_id: Record(entry=e, program=program_name(e.model_id)) for e in entries
        }
        self._order: list[str] = [e.model_id for e in entries]
        #: Each model's replicas beyond its first (``pool_replicas``), by number; also in
        #: ``_records`` under ``model#k``.
        self._extras: dict[str, list[Record]] = {}
        #: What scaling remembers per model (``pool_replicas``).
        self._scaling: dict[str, Scaling] = {}
        self.lifecycle: Lifecycle = Lifecycle()
        self.is_port_free: Callable[[int], bool] = lambda port: True
        #: Size in MiB of a model file (None: unknown); set by the service (a stat).
        self.file_mb: Callable[[str], float | None] = lambda path: None
        #: Called (outside the lock) after a change that may move the next deadline.
        self.on_change: Callable[[], None] = lambda: None
        #: Called under the lock after every transition: they must only record, never block.
        self.listeners: list[Callable[[Record, State, State], None]] = []
        #: Counts transitions and settings changes; the state file holds version ``_saved``.
        self._version = 0
        self._saved = 0
        #: Deadlines moved by requests: counted apart (saved less eagerly than transitions).
        self._moved = 0
        self._moved_saved = 0
        self.stats = PoolStats()
        #: Every node by name; the stack's own supervisord is ``local``. While it does not answer
        #: the reaper, no load starts on it.
        self._nodes: dict[str, NodeSlot] = {LOCAL: NodeSlot(LOCAL, None, up=True)}
        #: The fingerprint a record's worker would have if started now (on its node).
        self.fingerprint_for: Callable[[Record], str] = lambda rec: wanted_fingerprint(
            rec.entry, self.settings
        )
        #: Set by ``drain``: the stack is shutting down, no new load starts.
        self.draining = False
        #: Ports (by node) found taken by someone else at bind time, avoided until the given time.
        self._avoid: dict[tuple[str, int], float] = {}
        #: Models inside one of their warmup schedule windows right now.
        self._scheduled: set[str] = set()
        #: Callers waiting for a load, and requests being relayed (between ``begin_request`` and
        #: ``release``): each holds a thread; together at most ``max_waiting_total``.
        self._waiting = 0
        self._held = 0
        #: Generations are unique across the pool: a record deleted and registered again never
        #: reuses one, so a late report (or release) for the old record matches nothing.
        self._generations = 0
        self.max_waiting_total = max_waiting_total
        #: Callers waiting for room to load their model, in arrival order (FIFO): only the
        #: first may start a load when room frees (``capacity_wait_seconds``).
        self._room_queue: list[Ticket] = []
        #: Load jobs, oldest first: every live one and the last finished (``pool_jobs``).
        self._jobs: list[Job] = []

    # --- reading ------------------------------------------------------------------------------

    @property
    def available(self) -> bool:
        """Whether the stack's own supervisord answered the reaper's last call."""
        return self._nodes[LOCAL].up

    def set_available(self, available: bool) -> bool:
        """Record whether the stack's own supervisord answers; returns the previous value."""
        with self._lock:
            slot = self._nodes[LOCAL]
            was, slot.up = slot.up, available
            if available != was:
                slot.since = self.clock()
                slot.error = "" if available else "supervisord is not reachable"
            if available:
                slot.last_seen = self.clock()
            if available and not was:
                self._changed.notify_all()
            return was

    @property
    def dirty(self) -> bool:
        """A transition or a settings change not yet in the state file."""
        return self._version != self._saved

    @property
    def deadlines_moved(self) -> bool:
        """Deadlines moved by requests since the state file was written."""
        return self._moved != self._moved_saved

    def entries(self) -> tuple[ModelEntry, ...]:
        with self._lock:
            return tuple(self._records[m].entry for m in self._order)

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._order)

    def _get(self, model_id: str) -> Record:
        """A model's record (its first replica's); a replica's key ``model#k`` is no model."""
        rec = self._records.get(model_id)
        if rec is None or rec.deleting or rec.replica != 1:
            raise UnknownModel(model_id)
        return rec

    def record(self, model_id: str) -> Record:
        """A copy of one model's record."""
        with self._lock:
            rec = self._get(model_id)
            return replace(rec, history=deque(rec.history, maxlen=20))

    def worker(self, key: str) -> Record:
        """A copy of one worker's record by its key (a model id, or ``model#k`` for a replica)."""
        with self._lock:
            rec = self._records.get(key)
            if rec is None or rec.deleting:
                raise UnknownModel(key)
            return replace(rec, history=deque(rec.history, maxlen=20))

    def records(self) -> list[Record]:
        """Copies of all records, in registry order."""
        with self._lock:
            return [
                replace(self._records[m], history=deque(self._records[m].history, maxlen=20))
                for m in self._order
            ]

    def describe(self, rec: Record, now: float | None = None) -> dict[str, Any]:
        """The public JSON view of a model (``GET /models``) from a copy of one of its records
        (``rec``, taken as it is): the model shows its best replica's state and its replicas'
        counts summed, and lists every replica (``replicas``)."""
        now = self.clock() if now is None else now
        model_id = rec.entry.model_id
        with self._lock:
            group = [rec if r.key == rec.key else replace(r) for r in self._group(model_id)]
            group = group or [rec]  # deleted meanwhile: the copy alone
            first = group[0]
            shown = best(group)
            ttl = self.ttl_minutes(shown)
            warm = model_id in self._warmups()
            scheduled = model_id in self._scheduled
            host = self.address_of(shown.node)
            hosts = {r.key: self.address_of(r.node) for r in group}
            job = first.job.view() if first.job is not None else None
            scaling = self._scaling.get(model_id)
        view = views.model_view(shown, ttl, warm, scheduled, host, now)
        view.update(views.replicas_view(group, hosts, rec.entry.replicas, scaling))
        view["leases"] = views.leases_view(first)  # leases hold the model: its first record
        view["job"] = job  # its latest load job (live, or how the last load ended)
        return view

    def _views(self) -> list[policy.ModelView]:
        warm = self._kept()
        now = self.clock()
        return [
            policy.ModelView(
                model_id=r.key,
                state=r.state,
                warmup=r.entry.model_id in warm and r.replica <= r.entry.min_replicas,
                # Callers waiting for the model are requests about to be in flight: a model
                # that just became HOT is not expired or evicted before they are counted.
                # A live lease holds the model like a request in flight.
                in_flight=r.total_in_flight + r.waiters + len(r.leases),
                deadline=r.deadline,
                grace_until=r.grace_until,
                last_used=r.last_used,
                memory_mb=r.memory(),
                priority=r.entry.priority,
                loaded_at=r.loaded_at if r.state in SERVING else None,
                load_seconds=r.load_seconds,
                rate=eviction.decayed_rate(r.rate, r.rate_at, now),
            )
            for r in self._records.values()
        ]

    # --- the one writer -----------------------------------------------------------------------

    def _apply(self, rec: Record, event: Event, reason: str) -> State:
        """Apply ``event`` to ``rec`` (lock held). Raises InvalidTransitionError if not allowed."""
        old = rec.state
        new = next_state(old, event)
        now = self.clock()
        took = now - rec.since if rec.since else 0.0
        rec.state = new
        rec.since = now
        rec.history.append(Transition(old, new, now, reason))
        self._version += 1
        log.info(
            "transition model=%s from=%s to=%s event=%s reason=%s after=%.3fs port=%s",
            rec.key,
            old.value,
            new.value,
            event.value,
            reason,
            took,
            rec.port,
        )
        self._job_follows(rec, old, new, reason)
        for listener in self.listeners:
            # A listener only records; one that raises must not leave the transition half done
            # (the caller goes on to start the job that moves the model out of this state).
            try:
                listener(rec, old, new)
            except Exception:
                log.exception("transition listener %r failed", listener)
        self._changed.notify_all()
        return new

    def _count(self, rec: Record) -> None:
        """A request for ``rec`` begins now (lock held): its visit rate, for eviction's cost."""
        now = self.clock()
        if eviction.new_visit(rec.rate_at, now):
            rec.rate = eviction.count_request(rec.rate, rec.rate_at, now)
            rec.rate_at = now

    def _chore(self, rec: Record, event: ChoreEvent) -> None:
        """Apply ``event`` to ``rec``'s chore (lock held): the second table, ``core.chores``.
        Raises InvalidChoreError if not allowed."""
        old = rec.chore
        rec.chore = next_chore(old, event)
        if rec.chore is not old:
            log.debug(
                "chore model=%s from=%s to=%s event=%s",
                rec.key,
                old.value,
                rec.chore.value,
                event.value,
            )

    # --- loading ------------------------------------------------------------------------------

    # No reaper wake-up: touch() only moved the deadline later, and the reaper checks
    # every second anyway (waking it per request kept it busy under load).

    def load_info(self, model_id: str, gen: int) -> Record | None:
        """The record for a lifecycle worker, if ``gen`` is still current."""
        with self._lock:
            rec = self._records.get(model_id)
            if rec is None or rec.gen != gen:
                return None
            return replace(rec)

    def still_warming(self, model_id: str, gen: int) -> bool:
        with self._lock:
            rec = self._records.get(model_id)
            return rec is not None and rec.gen == gen and rec.state is State.WARMING

    def became_ready(
        self, model_id: str, gen: int, memory_mb: float | None, pid: int | None, requests: int = 0
    ) -> None:
        """WARMING → HOT once the worker's /health said ready."""
        with self._lock:
            rec = self._records.get(model_id)
            if rec is None or rec.gen != gen or rec.state is not State.WARMING:
                return
            now = self.clock()
            rec.measured_mb = memory_mb
            if memory_mb is not None:
                rec.last_measured_mb = memory_mb
            rec.pid = pid
            rec.loaded_at = now
            rec.last_used = now
            rec.worker_requests = requests
            ttl = self.ttl_minutes(rec)
            fresh = policy.deadline_after(now, ttl)
            rec.deadline = rec.restore_deadline if rec.restore_deadline and fresh else fresh
            rec.grace_until = None
            if not rec.adopting:
                self.stats.loaded(rec.entry.model_id, now - rec.since)
                rec.load_seconds = eviction.average_load(rec.load_seconds, now - rec.since)
            self._apply(rec, Event.BECAME_READY, "adopted" if rec.adopting else "ready")
            if rec.adopting:
                self._chore(rec, ChoreEvent.ADOPTION_ENDED)
            if self.draining:
                # Shutting down: a load that finished meanwhile is unloaded as well, or the
                # drain would wait for it until its timeout.
                self._begin_unload(rec, Event.UNLOAD_REQUESTED, "shutdown")
        self.on_change()

    def load_failed(
        self,
        model_id: str,
        gen: int,
        error: str,
        reason: str,
        *,
        removed: bool = True,
        permanent: bool = False,
    ) -> None:
        """WARMING → FAILED, after the lifecycle tried to stop and remove the worker.

        ``reason`` is one of ``stats.LOAD_FAILURE_REASONS``; "supervisord" (it was away) and a
        failed adoption are not failures of the model and do not grow its backoff.
        ``removed``: False keeps the port until a later cleanup succeeds.
        """
        with self._lock:
            rec = self._records.get(model_id)
            if rec is None or rec.gen != gen or rec.state is not State.WARMING:
                return
            # Taking over a worker of an earlier life (a restart, a node back) that turns out
            # gone or broken is not a failure of the model: the next request loads it afresh.
            if reason != "supervisord" and not rec.adopting:
                rec.failures += 1
                rec.retry_at = policy.retry_not_before(rec.failures, self.clock())
            if permanent:
                rec.retry_at = math.inf  # until the entry changes, or a load call asks
            rec.last_error = error
            if removed:
                self._forget_process(rec)
                if rec.adopting:
                    self._chore(rec, ChoreEvent.ADOPTION_ENDED)
            else:
                self._chore(rec, ChoreEvent.CLEANUP_FAILED)  # it keeps its port until removed
            self.stats.load_failed(rec.entry.model_id, reason)
            self._apply(rec, Event.LOAD_FAILED, reason)

    # --- monitoring (called by the reaper) ----------------------------------------------------

    def observe_worker(
        self,
        model_id: str,
        gen: int,
        requests: int,
        in_flight: int,
        last_at: float | None,
        memory_mb: float | None,
    ) -> None:
        """Fold a worker's /health into the record (requests sent straight to its port count)."""
        with self._lock:
            rec = self._records.get(model_id)
            if rec is None or rec.gen != gen or rec.state not in SERVING:
                return
            active = requests != rec.worker_requests or in_flight > 0
            rec.worker_requests = requests
            rec.worker_in_flight = in_flight
            if memory_mb is not None:
                rec.measured_mb = rec.last_measured_mb = memory_mb
            if active:
                self.touch(rec, max(last_at or 0.0, self.clock() if in_flight else 0.0))

    def process_gone(self, model_id: str, gen: int, operator_stop: bool, detail: str) -> None:
        """supervisord no longer runs a loaded model's worker."""
        with self._lock:
            rec = self._records.get(model_id)
            if rec is None or rec.gen != gen or rec.state not in (*SERVING, State.WARMING):
                return
            if operator_stop and rec.state in SERVING:
                self._begin_unload(rec, Event.UNLOAD_REQUESTED, "operator")
                return
            if rec.state is State.WARMING:
                return  # the load in progress notices and reports it with the log tail
            now = self.clock()
            rec.last_error = detail
            stable = rec.loaded_at is not None and now - rec.loaded_at >= STABLE_SECONDS
            rec.failures = 1 if stable else rec.failures + 1
            rec.retry_at = policy.retry_not_before(rec.failures, now)
            self.stats.unloaded(rec.entry.model_id, "crash")
            self._apply(rec, Event.PROCESS_EXITED, "crash")
            self._start_cleanup(rec)

    def loaded(self) -> list[Loaded]:
        """Every model with a worker (loading, serving or stopping)."""
        with self._lock:
            return [
                Loaded(
                    r.key,
                    r.gen,
                    r.program,
                    r.port,
                    r.entry.backend,
                    r.pid,
                    r.node or LOCAL,
                )
                for r in self._records.values()
                if r.state in OCCUPYING and r.port is not None
            ]

    def programs_in_use(self, node: str = LOCAL) -> set[str]:
        """Programs on ``node`` of every model that holds a port there (loading, serving,
        stopping, cleaning)."""
        with self._lock:
            return {
                r.program
                for r in self._records.values()
                if r.port is not None and (r.node or LOCAL) == node
            }

    def serving_ids(self) -> set[str]:
        """The keys of every serving worker (a model's replicas beyond its first included)."""
        with self._lock:
            return {m for m, r in self._records.items() if r.state in SERVING}

    # --- registry and settings ----------------------------------------------------------------

    # --- state file ---------------------------------------------------------------------------

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Block until ``predicate()`` (evaluated under the lock) holds; for callers that wait."""
        limit = time.monotonic() + timeout
        with self._lock:
            while not predicate():
                remaining = limit - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(min(remaining, 0.5))
            return True

    def summary(self) -> dict[str, Any]:
        """Counts for ``GET /health``."""
        with self._lock:
            recs = list(self._records.values())
            firsts = [self._records[m] for m in self._order]
            serving = {r.entry.model_id for r in recs if r.state in SERVING}
            nodes = self._placeable()
            limits = [self._node_limits(slot) for slot in nodes]
            free = sum(v.free_ports for v in self._node_views())
            return {
                "active_models": len(serving),
                "loading_models": len({r.entry.model_id for r in recs if r.state is State.WARMING}),
                "total_models": len(firsts),
                "workers": sum(1 for r in recs if r.state in OCCUPYING),
                "total_memory_mb": round(sum(r.memory() for r in recs if r.state in OCCUPYING), 1),
                "memory_limit_mb": sum(x[2] for x in limits),
                "max_concurrent_models": sum(x[3] for x in limits),
                "available_ports": free,
                "failed_models": sum(1 for r in firsts if r.state is State.FAILED),
                "nodes": len(nodes),
                "nodes_up": sum(1 for slot in nodes if slot.up),
            }
