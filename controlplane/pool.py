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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from controlplane import views
from controlplane.core import leases, policy, schedule
from controlplane.core.ports import PortRequest, PortUnavailableError, choose_port, warmup_ports
from controlplane.core.slug import program_name
from controlplane.core.states import OCCUPYING, SERVING, Event, State, next_state
from controlplane.errors import (
    BackendDown,
    Conflict,
    LoadFailed,
    LoadTimeout,
    NoCapacity,
    UnknownModel,
)
from controlplane.nodeconfig import LOCAL
from controlplane.pool_leases import Leasing
from controlplane.pool_nodes import Nodes, NodeSlot
from controlplane.records import Lifecycle, Loaded, Record, Transition
from controlplane.settings import (
    IN_PROCESS_BACKENDS,
    MAX_WAITING_TOTAL,
    ModelEntry,
    Settings,
    warmup_ids,
)
from controlplane.specs import wanted_fingerprint
from controlplane.stats import PoolStats

log = logging.getLogger("modelpool.pool")

Clock = Callable[[], float]


#: A model that crashes within this many seconds of becoming HOT keeps its failure count
#: (and so its backoff); one that ran longer starts counting again.
STABLE_SECONDS = 60.0
#: How long a port that another process took at bind time is left alone.
AVOID_PORT_SECONDS = 60.0


class ModelPool(Leasing, Nodes):
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

    def warmup_ids(self) -> tuple[str, ...]:
        with self._lock:
            return self._warmups()

    def _warmups(self) -> tuple[str, ...]:
        return warmup_ids(tuple(self._records[m].entry for m in self._order), self.settings)

    def _kept(self) -> set[str]:
        """Models kept loaded now: warmup models and those inside a schedule window."""
        return set(self._warmups()) | self._scheduled

    def scheduled_ids(self) -> set[str]:
        with self._lock:
            return set(self._scheduled)

    def refresh_schedules(self, weekday: int, minute: int) -> set[str]:
        """Recompute which models are inside a warmup window (local time); return them.

        A model whose window opens stops expiring; one whose window closes gets a deadline of
        now + its TTL, as if it had just been used.
        """
        with self._lock:
            now_in = {
                m
                for m, r in self._records.items()
                if r.entry.schedule and schedule.active(r.windows, weekday, minute)
            }
            if now_in != self._scheduled:
                self._scheduled = now_in
                self._refit_deadlines()
            return set(now_in)

    def _refit_deadlines(self) -> None:
        """After the kept set or the TTL settings changed (lock held): models that now never
        expire lose their deadline, models that now expire get one from now, and no deadline
        lies beyond now + max TTL."""
        now = self.clock()
        for rec in self._records.values():
            if rec.state not in SERVING:
                continue
            ttl = self.ttl_minutes(rec)
            if ttl == 0:
                rec.deadline = None
            elif rec.deadline is None:
                rec.deadline = policy.deadline_after(now, ttl)
            else:
                rec.deadline = min(rec.deadline, now + self.settings.max_ttl_minutes * 60)
        self._version += 1

    def ttl_minutes(self, rec: Record) -> float:
        """The model's effective TTL (0: never expires)."""
        warm = rec.entry.model_id in self._kept()
        return policy.effective_ttl_minutes(rec.entry.ttl_minutes, warm, self._bounds())

    def _bounds(self) -> policy.TtlBounds:
        s = self.settings
        return policy.TtlBounds(
            s.default_ttl_minutes, s.min_ttl_minutes, s.max_ttl_minutes, s.grace_period_minutes
        )

    def _get(self, model_id: str) -> Record:
        rec = self._records.get(model_id)
        if rec is None or rec.deleting:
            raise UnknownModel(model_id)
        return rec

    def record(self, model_id: str) -> Record:
        """A copy of one model's record."""
        with self._lock:
            rec = self._get(model_id)
            return replace(rec, history=deque(rec.history, maxlen=20))

    def records(self) -> list[Record]:
        """Copies of all records, in registry order."""
        with self._lock:
            return [
                replace(self._records[m], history=deque(self._records[m].history, maxlen=20))
                for m in self._order
            ]

    def describe(self, rec: Record, now: float | None = None) -> dict[str, Any]:
        """The public JSON view of a record (``GET /models``)."""
        now = self.clock() if now is None else now
        with self._lock:
            ttl = self.ttl_minutes(rec)
            warm = rec.entry.model_id in self._warmups()
            scheduled = rec.entry.model_id in self._scheduled
            host = self.address_of(rec.node)
        return views.model_view(rec, ttl, warm, scheduled, host, now)

    def _views(self) -> list[policy.ModelView]:
        warm = self._kept()
        return [
            policy.ModelView(
                model_id=r.entry.model_id,
                state=r.state,
                warmup=r.entry.model_id in warm,
                # Callers waiting for the model are requests about to be in flight: a model
                # that just became HOT is not expired or evicted before they are counted.
                # A live lease holds the model like a request in flight.
                in_flight=r.total_in_flight + r.waiters + len(r.leases),
                deadline=r.deadline,
                grace_until=r.grace_until,
                last_used=r.last_used,
                memory_mb=r.memory(),
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
            rec.entry.model_id,
            old.value,
            new.value,
            event.value,
            reason,
            took,
            rec.port,
        )
        for listener in self.listeners:
            # A listener only records; one that raises must not leave the transition half done
            # (the caller goes on to start the job that moves the model out of this state).
            try:
                listener(rec, old, new)
            except Exception:
                log.exception("transition listener %r failed", listener)
        self._changed.notify_all()
        return new

    # --- loading ------------------------------------------------------------------------------

    def ensure_loaded(
        self,
        model_id: str,
        timeout: float | None = None,
        *,
        manual: bool = False,
        wait: bool = True,
    ) -> Record:
        """Make ``model_id`` HOT (or start it, with ``wait=False``) and return its record.

        Single-flight: concurrent callers for a COLD model cause one load and all wait for it.
        A model that is UNLOADING is waited for and loaded again. ``manual`` (a ``load`` call)
        skips the retry backoff of a FAILED model. Raises UnknownModel, NoCapacity, LoadFailed,
        LoadTimeout.
        """
        return self._ensure(model_id, timeout, manual=manual, wait=wait, hold=False)

    def begin_request(self, model_id: str, timeout: float | None = None) -> Record:
        """Load if needed and count a request as in flight, in one hold of the lock.

        Between "the model is HOT" and "a request is in flight" nothing can unload it: the
        reaper never expires a model with a request in flight, so a request can never race an
        unload into a model that is going away. Pair with ``release``.
        """
        return self._ensure(model_id, timeout, manual=False, wait=True, hold=True)

    def try_begin_request(self, model_id: str) -> tuple[str, int, int] | None:
        """``begin_request`` for a model that is serving now, without waiting or raising:
        (worker address, port, generation), or None when the request needs more (a load, a
        wait, an error). Pair with ``release(model_id, gen, thread=False)``."""
        with self._lock:
            rec = self._records.get(model_id)
            if rec is None or rec.deleting or rec.state not in SERVING or rec.port is None:
                return None
            # Relayed on the event loop, it holds none of the threads _held counts.
            rec.in_flight += 1
            self.touch(rec, self.clock())
            return self.address_of(rec.node), rec.port, rec.gen

    @contextmanager
    def acquire(self, model_id: str, timeout: float | None = None) -> Iterator[Record]:
        """``begin_request`` ... ``release`` as a context manager."""
        rec = self.begin_request(model_id, timeout)
        try:
            yield rec
        finally:
            self.release(model_id, rec.gen)

    def release(self, model_id: str, gen: int, thread: bool = True) -> None:
        """The end of a request counted by ``begin_request`` for generation ``gen`` (or by
        ``try_begin_request``, with ``thread=False``).

        A request of an earlier load (the model was force-unloaded and loaded again meanwhile)
        is not counted against the new worker.
        """
        with self._lock:
            if thread:  # the thread is free whatever its generation
                self._held = max(0, self._held - 1)
            rec = self._records.get(model_id)
            if rec is not None and rec.gen == gen and rec.in_flight > 0:
                rec.in_flight -= 1
                self.touch(rec, self.clock())
        # No reaper wake-up: touch() only moved the deadline later, and the reaper checks
        # every second anyway (waking it per request kept it busy under load).

    def _ensure(
        self, model_id: str, timeout: float | None, *, manual: bool, wait: bool, hold: bool
    ) -> Record:
        limit = self.settings.load_timeout_seconds if timeout is None else timeout
        began = time.monotonic()
        give_up = began + limit
        waited = False
        started_gen: int | None = None
        waited_gen: int | None = None  # the load this caller saw in progress
        notify = False
        queued: Record | None = None  # the record this caller is counted as waiting on
        try:
            with self._lock:
                while True:
                    rec = self._get(model_id)
                    if rec.state in SERVING:
                        if hold:
                            if queued is None:
                                self._check_threads(rec)
                            self._held += 1
                            rec.in_flight += 1
                            self.touch(rec, self.clock())
                        if waited:
                            self.stats.waited(model_id, time.monotonic() - began)
                        return replace(rec)
                    waited = True
                    if rec.state is State.WARMING:
                        waited_gen = rec.gen
                    if rec.state is State.FAILED and rec.gen in (started_gen, waited_gen):
                        raise LoadFailed(
                            f"model {model_id!r} failed to load: {rec.last_error}",
                            retry_after=min(300.0, max(1.0, rec.retry_at - self.clock())),
                        )
                    if rec.state is State.WARMING and not wait:
                        return replace(rec)
                    idle = rec.state in (State.COLD, State.FAILED)
                    if idle and self.draining:
                        raise BackendDown("modelpool is shutting down", retry_after=30)
                    if idle and not self._any_node_up():
                        raise BackendDown(
                            "supervisord is not reachable"
                            if len(self._placeable()) == 1
                            else "no node is reachable (GET /nodes says why)",
                            retry_after=5,
                        )
                    if idle and not rec.busy and not rec.needs_cleanup:
                        started_gen = self._try_start(rec, manual)
                        notify = notify or started_gen is not None
                        if started_gen is not None:
                            continue
                    remaining = give_up - time.monotonic()
                    if remaining <= 0:
                        raise LoadTimeout(
                            f"model {model_id!r} was not ready within {limit:g} s "
                            f"(state {rec.state.value})"
                        )
                    if queued is not rec:
                        if queued is not None:
                            self._dequeue(queued)  # the model was deleted and registered again
                            queued = None
                        self._enqueue(rec)
                        queued = rec
                    self._changed.wait(min(remaining, 1.0))
        finally:
            if queued is not None:
                with self._lock:
                    self._dequeue(queued)
            if notify:
                self.on_change()

    def _enqueue(self, rec: Record) -> None:
        """Count a caller as waiting for ``rec`` (lock held), or refuse it at once.

        Every waiter holds one of the control plane's threads: the caps keep enough of them
        free that /health, /unload and the rest of the control API always answer.
        """
        cap = self.settings.max_queue_per_model
        if rec.waiters >= cap:
            self.stats.refused(rec.entry.model_id)
            raise NoCapacity(
                f"model {rec.entry.model_id!r} is loading and {rec.waiters} requests already "
                f"wait for it (max_queue_per_model {cap})",
                retry_after=5,
            )
        self._check_threads(rec)
        rec.waiters += 1
        self._waiting += 1

    def _check_threads(self, rec: Record) -> None:
        """Refuse a request (lock held) when waiters and relayed requests, which each hold one
        of the control plane's threads, already take ``max_waiting_total`` of them."""
        if self._waiting + self._held >= self.max_waiting_total:
            self.stats.refused(rec.entry.model_id)
            raise NoCapacity(
                f"the control plane is busy: {self._waiting} requests wait for a load and "
                f"{self._held} are being relayed (at most {self.max_waiting_total} in all)",
                retry_after=2,
            )

    def _dequeue(self, rec: Record) -> None:
        rec.waiters -= 1
        self._waiting -= 1

    def _try_start(self, rec: Record, manual: bool) -> int | None:
        """Start loading ``rec`` if capacity allows (lock held); None if it must wait first."""
        now = self.clock()
        if rec.state is State.FAILED and not manual and rec.retry_at == math.inf:
            raise LoadFailed(
                f"model {rec.entry.model_id!r} failed to load ({rec.last_error}); retrying will "
                "not help until its registry entry changes (a load call tries again)",
                retry_after=300,
            )
        if rec.state is State.FAILED and not manual and now < rec.retry_at:
            raise LoadFailed(
                f"model {rec.entry.model_id!r} failed {rec.failures} times in a row "
                f"({rec.last_error}); next try in {rec.retry_at - now:.0f} s",
                retry_after=rec.retry_at - now,
            )
        rec.estimate_mb = self._estimate(rec)
        where = self._place(rec, rec.estimate_mb)
        plan = where.plan
        if where.node is None or not (plan.ok or plan.evict or plan.wait):
            self.stats.refused(rec.entry.model_id)
            raise NoCapacity(where.reason or plan.reason, retry_after=5)
        if not plan.ok:
            for victim in plan.evict:
                self._begin_unload(self._records[victim], Event.UNLOAD_REQUESTED, "eviction")
            return None
        rec.node = where.node
        try:
            port = self._choose_port(rec)
        except PortUnavailableError as exc:
            rec.node = None
            self.stats.refused(rec.entry.model_id)
            raise NoCapacity(str(exc), retry_after=5) from None
        rec.port = port
        self._new_generation(rec)
        rec.last_error = None
        rec.restore_deadline = None
        self._apply(rec, Event.LOAD_REQUESTED, "manual" if manual else "request")
        self._start_load(rec, adopt=False)
        return rec.gen

    def _new_generation(self, rec: Record) -> None:
        """A new load (lock held): counts of the previous worker's requests no longer apply."""
        self._generations += 1
        rec.gen = self._generations
        rec.in_flight = 0

    def _start_load(self, rec: Record, adopt: bool) -> None:
        """Hand a WARMING model to the lifecycle (lock held); a failure to do so fails the load."""
        try:
            self.lifecycle.start_load(rec.entry.model_id, rec.gen, adopt=adopt)
        except Exception as exc:
            log.exception("could not start the load of %s", rec.entry.model_id)
            rec.last_error = f"could not start the load: {exc}"
            rec.needs_cleanup = True  # its program may exist: remove it before the port is reused
            rec.adopting = False
            self.stats.load_failed(rec.entry.model_id, "start_error")
            self._apply(rec, Event.LOAD_FAILED, "start_error")

    def _estimate(self, rec: Record) -> float:
        """What a load of ``rec`` will need: the estimate, or what it measured last if more
        (so a model that alone exceeds the limit is refused instead of loaded and evicted)."""
        e = rec.entry
        file_mb = self.file_mb(e.model_path) if e.backend in IN_PROCESS_BACKENDS else None
        estimate = policy.estimate_mb(e.memory_mb, file_mb, self.settings.default_memory_mb)
        return max(estimate, rec.last_measured_mb or 0.0)

    def enforce_memory_limit(self) -> list[str]:
        """Evict idle non-warmup models (LRU) while a node's measured total is over its limit."""
        with self._lock:
            victims: list[str] = []
            by_node = self._models_by_node()
            for slot in self._nodes.values():
                limit = self._node_limits(slot)[2]
                victims += policy.evict_over_limit(by_node.get(slot.name, []), limit)
            for model_id in victims:
                self._begin_unload(self._records[model_id], Event.UNLOAD_REQUESTED, "memory")
            return victims

    def reassign_port(self, model_id: str, gen: int, bad_port: int) -> int | None:
        """A new port for a load whose port turned out to be taken (the old one is avoided)."""
        with self._lock:
            rec = self._records.get(model_id)
            if rec is None or rec.gen != gen or rec.state is not State.WARMING:
                return None
            self._avoid[(rec.node or LOCAL, bad_port)] = self.clock() + AVOID_PORT_SECONDS
            try:
                rec.port = self._choose_port(rec)
            except PortUnavailableError:
                return None
            return rec.port

    def _choose_port(self, rec: Record) -> int:
        """A port on the record's node (pinned and warmup ports are kept for their models)."""
        node = rec.node or LOCAL
        slot = self._nodes[node]
        start, end, _memory, _models = self._node_limits(slot)
        in_use = {
            r.port
            for r in self._records.values()
            if r.port is not None and r is not rec and (r.node or LOCAL) == node
        }
        pinned = {r.entry.port for r in self._records.values() if r.entry.port is not None}
        order = self._warmups()
        req = PortRequest(rec.entry.model_id, rec.entry.port, order, pinned - {rec.entry.port})
        now = self.clock()
        avoid = {p for (n, p), until in self._avoid.items() if until > now and n == node}
        return choose_port(
            req,
            start,
            end,
            in_use | avoid,
            self.is_port_free if slot.local else lambda port: True,
            warmup_ports(order, pinned, start),
        )

    def adopt(
        self,
        model_id: str,
        port: int,
        pid: int,
        deadline: float | None,
        fingerprint: str,
        saved_leases: Any = None,
    ) -> bool:
        """Take over a worker that is already running (after a control-plane restart).

        ``fingerprint`` is its spec's: if the entry changed meanwhile, ``reload_changed``
        drains and reloads it once it is HOT.
        """
        with self._lock:
            rec = self._records.get(model_id)
            if rec is None or rec.state is not State.COLD:
                return False
            rec.node = LOCAL
            rec.port = port
            rec.pid = pid
            rec.fingerprint = fingerprint
            rec.estimate_mb = self._estimate(rec)
            self._new_generation(rec)
            rec.restore_deadline = deadline
            rec.leases = leases.restore(saved_leases, self.clock())
            rec.adopting = True
            self._apply(rec, Event.LOAD_REQUESTED, "adopt")
            self._start_load(rec, adopt=True)
            return True

    def started_with(self, model_id: str, gen: int, fingerprint: str) -> None:
        """The lifecycle wrote the spec of generation ``gen``'s worker; remember what it serves."""
        with self._lock:
            rec = self._records.get(model_id)
            if rec is not None and rec.gen == gen:
                rec.fingerprint = fingerprint

    def reload_changed(self) -> list[str]:
        """Drain and reload (reason ``config_changed``) every loaded model whose worker serves a
        spec that its entry and the settings no longer give; returns them."""
        changed = []
        with self._lock:
            for rec in self._records.values():
                if rec.state not in SERVING or rec.fingerprint is None or rec.deleting:
                    continue
                moved = rec.entry.port is not None and rec.port != rec.entry.port
                if moved or rec.fingerprint != self.fingerprint_for(rec):
                    rec.reload = True
                    self._begin_unload(rec, Event.UNLOAD_REQUESTED, "config_changed")
                    changed.append(rec.entry.model_id)
        return changed

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
            self._apply(rec, Event.BECAME_READY, "adopted" if rec.adopting else "ready")
            rec.adopting = False
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

        ``reason`` is one of ``stats.LOAD_FAILURE_REASONS``; "supervisord" (it was away) is not
        a failure of the model and does not grow its backoff. ``removed``: False keeps the port
        until a later cleanup succeeds.
        """
        count = reason != "supervisord"
        with self._lock:
            rec = self._records.get(model_id)
            if rec is None or rec.gen != gen or rec.state is not State.WARMING:
                return
            if count:
                rec.failures += 1
                rec.retry_at = policy.retry_not_before(rec.failures, self.clock())
            if permanent:
                rec.retry_at = math.inf  # until the entry changes, or a load call asks
            rec.last_error = error
            if removed:
                self._forget_process(rec)
            else:
                rec.needs_cleanup = True
            rec.adopting = False
            self.stats.load_failed(model_id, reason)
            self._apply(rec, Event.LOAD_FAILED, reason)

    # --- unloading ----------------------------------------------------------------------------

    def unload(
        self, model_id: str, *, force: bool = False, wait: bool = False, reason: str = "manual"
    ) -> Record:
        """Unload a loaded model (HOT/COOLING → UNLOADING → COLD).

        COLD and UNLOADING are answered as they are; WARMING and FAILED are a Conflict.
        """
        with self._lock:
            rec = self._get(model_id)
            if rec.leases and rec.state in SERVING and reason == "manual":
                if not force:
                    holders = ", ".join(sorted(x.holder or "?" for x in rec.leases.values()))
                    raise Conflict(
                        f"model {model_id!r} is held by {len(rec.leases)} lease(s) ({holders}); "
                        "force: true unloads it anyway and ends them"
                    )
                rec.leases = {}
            if rec.state in SERVING:
                self._begin_unload(rec, Event.UNLOAD_REQUESTED, reason, force=force)
            elif rec.state is State.WARMING:
                raise Conflict(f"model {model_id!r} is loading; unload it once it is HOT")
            elif rec.state is State.FAILED:
                raise Conflict(
                    f"model {model_id!r} is FAILED ({rec.last_error}); nothing to unload"
                )
            elif rec.state is State.UNLOADING and force:
                # Quick shutdown of a worker that is draining; its stop job is still running.
                self.lifecycle.hurry(model_id, rec.gen)
            if wait:
                limit = time.monotonic() + self.settings.graceful_shutdown_seconds + 30
                while rec.state is State.UNLOADING and time.monotonic() < limit:
                    self._changed.wait(1.0)
            return replace(rec)

    def _begin_unload(self, rec: Record, event: Event, reason: str, force: bool = False) -> None:
        rec.unload_reason = reason
        rec.grace_until = None
        self.stats.unloaded(rec.entry.model_id, reason)
        self._apply(rec, event, reason)
        self._start_stop(rec, force)

    def _start_stop(self, rec: Record, force: bool) -> None:
        """Start the stop job of an UNLOADING model (lock held).

        ``busy`` is set only once the job runs: if it could not be started, the model stays
        UNLOADING and not busy, and the reaper's next pass (``retry_stop``) starts it again.
        """
        try:
            self.lifecycle.start_stop(rec.entry.model_id, rec.gen, force=force)
        except Exception:
            log.exception("could not start the stop of %s; the reaper retries", rec.entry.model_id)
            rec.busy = False
            return
        rec.busy = True

    def drain(self, timeout: float) -> list[str]:
        """Shut down: refuse new loads, unload every loaded model (reason "shutdown") and wait.

        Returns the models still not COLD when ``timeout`` passed.
        """
        with self._lock:
            self.draining = True
            for rec in self._records.values():
                if rec.state in SERVING:
                    self._begin_unload(rec, Event.UNLOAD_REQUESTED, "shutdown")
        self.wait_for(
            lambda: all(r.state not in OCCUPYING for r in self._records.values()), timeout
        )
        with self._lock:
            return [m for m, r in self._records.items() if r.state in OCCUPYING]

    def retry_stop(self, model_id: str, gen: int) -> None:
        """Run the stop of an UNLOADING model again (its earlier attempt failed)."""
        with self._lock:
            rec = self._records.get(model_id)
            if rec is None or rec.gen != gen or rec.state is not State.UNLOADING or rec.busy:
                return
            self._start_stop(rec, force=True)

    def stopped(self, model_id: str, gen: int) -> None:
        """UNLOADING → COLD: the worker stopped and its program is gone; the port is free."""
        with self._lock:
            rec = self._records.get(model_id)
            if rec is None or rec.gen != gen or rec.state is not State.UNLOADING:
                return
            self._forget_process(rec)
            rec.busy = False
            rec.failures = 0
            rec.retry_at = 0.0
            self._apply(rec, Event.STOPPED, rec.unload_reason or "stopped")
            if rec.deleting:
                self._drop(rec)
            elif rec.reload:
                self._reload(rec)

    def _reload(self, rec: Record) -> None:
        """Load again a model whose outdated worker just stopped (lock held)."""
        rec.reload = False
        if self.draining or not self._any_node_up():
            return  # the next request or warmup pass loads it
        if not self._place(rec, self._estimate(rec)).plan.ok:
            return  # no eviction for a reload nobody asked for: the next request loads it
        try:
            self._try_start(rec, manual=True)
        except (NoCapacity, LoadFailed, BackendDown) as exc:
            log.warning("reload of %s after a config change waits: %s", rec.entry.model_id, exc)

    def _forget_process(self, rec: Record) -> None:
        rec.requests_base += rec.worker_requests
        rec.worker_requests = 0
        rec.worker_in_flight = 0
        rec.port = None
        rec.pid = None
        rec.node = None
        rec.fingerprint = None
        rec.deadline = None
        rec.grace_until = None
        rec.measured_mb = None

    def cleaned(self, model_id: str, gen: int, removed: bool = True) -> None:
        """The cleanup of a FAILED model's worker ended; if it was removed, the port is free."""
        with self._lock:
            rec = self._records.get(model_id)
            if rec is None or rec.gen != gen:
                return
            rec.busy = False
            rec.needs_cleanup = not removed
            if removed and rec.state is State.FAILED:
                self._forget_process(rec)
                if rec.deleting:
                    self._drop(rec)
            self._changed.notify_all()

    def retry_cleanups(self) -> None:
        """Start again the cleanups of FAILED workers that could not be removed before."""
        with self._lock:
            for rec in self._records.values():
                if rec.needs_cleanup and not rec.busy and rec.state is State.FAILED:
                    self._start_cleanup(rec)

    def _start_cleanup(self, rec: Record) -> None:
        """Start removing a FAILED model's worker (lock held); if it cannot start, retry later."""
        try:
            self.lifecycle.start_cleanup(rec.entry.model_id, rec.gen)
        except Exception:
            log.exception("could not start the cleanup of %s", rec.entry.model_id)
            rec.busy = False
            rec.needs_cleanup = True
            return
        rec.busy = True

    # --- TTL ----------------------------------------------------------------------------------

    def extend_ttl(self, model_id: str, minutes: float) -> tuple[Record, bool]:
        """Move the deadline to max(deadline, now) + minutes, capped at now + max TTL."""
        with self._lock:
            rec = self._get(model_id)
            if rec.state not in SERVING:
                raise Conflict(
                    f"model {model_id!r} is {rec.state.value}; only a loaded model has a TTL"
                )
            if self.ttl_minutes(rec) == 0:
                return replace(rec), False
            now = self.clock()
            ext = policy.extend(rec.deadline, now, minutes, self._bounds())
            rec.deadline = ext.deadline
            self._version += 1
            if rec.state is State.COOLING:
                rec.grace_until = None
                self._apply(rec, Event.REQUEST_ARRIVED, "extend_ttl")
            result = replace(rec), ext.clamped
        self.on_change()
        return result

    def touch(self, rec: Record, at: float) -> None:
        """Activity at ``at`` (lock held): reset the deadline; COOLING goes back to HOT."""
        rec.last_used = max(rec.last_used, at)
        ttl = self.ttl_minutes(rec)
        fresh = policy.deadline_after(at, ttl)
        if fresh is not None and (rec.deadline is None or fresh > rec.deadline):
            rec.deadline = fresh
            self._moved += 1
        if rec.state is State.COOLING:
            rec.grace_until = None
            self._apply(rec, Event.REQUEST_ARRIVED, "request")

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
            self.stats.unloaded(model_id, "crash")
            self._apply(rec, Event.PROCESS_EXITED, "crash")
            self._start_cleanup(rec)

    def expire(self, now: float) -> None:
        """Apply the TTL events due at ``now`` (only with auto_unload)."""
        with self._lock:
            self._lapse_leases(now)
        if not self.settings.auto_unload:
            return
        with self._lock:
            grace = self.settings.grace_period_minutes * policy.MINUTE
            for _ in range(2):  # a zero grace period cools and unloads in one pass
                for model_id, event in policy.due_events(self._views(), now):
                    rec = self._records[model_id]
                    if event is Event.TTL_EXPIRED:
                        rec.grace_until = (rec.deadline or now) + grace
                        self._apply(rec, event, "ttl")
                    else:
                        self._begin_unload(rec, event, "ttl")

    def next_wakeup(self) -> float | None:
        with self._lock:
            return policy.next_wakeup(self._views()) if self.settings.auto_unload else None

    def loaded(self) -> list[Loaded]:
        """Every model with a worker (loading, serving or stopping)."""
        with self._lock:
            return [
                Loaded(
                    r.entry.model_id,
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
        with self._lock:
            return {m for m, r in self._records.items() if r.state in SERVING}

    def unloading_idle(self) -> list[tuple[str, int, str]]:
        """UNLOADING models whose stop is not running (for the reaper to finish)."""
        with self._lock:
            return [
                (m, r.gen, r.program)
                for m, r in self._records.items()
                if r.state is State.UNLOADING and not r.busy
            ]

    def set_busy(self, model_id: str, gen: int, busy: bool) -> None:
        with self._lock:
            rec = self._records.get(model_id)
            if rec is not None and rec.gen == gen:
                rec.busy = busy
                self._changed.notify_all()

    # --- registry and settings ----------------------------------------------------------------

    def add_entry(self, entry: ModelEntry) -> None:
        with self._lock:
            if entry.model_id in self._records:
                raise Conflict(f"model {entry.model_id!r} is already registered")
            self._records[entry.model_id] = Record(
                entry=entry, program=program_name(entry.model_id)
            )
            self._order.append(entry.model_id)

    def replace_entry(self, entry: ModelEntry) -> None:
        """A registry entry changed: keep the model's state; ``reload_changed`` decides whether
        its worker must be replaced. A permanent load failure may be retried with the new one."""
        with self._lock:
            rec = self._get(entry.model_id)
            rec.entry = entry
            if rec.state is State.FAILED and rec.retry_at == math.inf:
                rec.retry_at = 0.0
            self._refit_deadlines()
            self._changed.notify_all()
        self.on_change()

    def mark_deleting(self, model_id: str) -> Record:
        """Hide a model from new requests; unload it if loaded. Conflict while WARMING."""
        with self._lock:
            rec = self._get(model_id)
            if rec.state is State.WARMING:
                raise Conflict(f"model {model_id!r} is loading; delete it once it is HOT")
            rec.deleting = True
            if rec.state in SERVING:
                self._begin_unload(rec, Event.UNLOAD_REQUESTED, "deleted")
            elif rec.state is not State.UNLOADING and not rec.busy:
                self._drop(rec)
            return replace(rec)

    def wait_dropped(self, model_id: str, timeout: float) -> bool:
        limit = time.monotonic() + timeout
        with self._lock:
            while model_id in self._records and time.monotonic() < limit:
                self._changed.wait(0.5)
            return model_id not in self._records

    def _drop(self, rec: Record) -> None:
        self._records.pop(rec.entry.model_id, None)
        self._order.remove(rec.entry.model_id)
        self._changed.notify_all()

    def set_settings(self, settings: Settings) -> None:
        """Apply new settings; deadlines follow a change of warmup set or TTL 0."""
        with self._lock:
            self.settings = settings
            self._refit_deadlines()
            self._changed.notify_all()
        self.on_change()

    # --- state file ---------------------------------------------------------------------------

    def persisted(self) -> tuple[tuple[int, int], dict[str, Any]]:
        """What survives a control-plane restart: deadlines and counters of loaded models.

        Returns the snapshot's version with it; the writer calls ``saved(version)`` once the
        file is written, so a failed write leaves the pool dirty and is tried again.
        """
        with self._lock:
            return (self._version, self._moved), {
                "version": 1,
                "models": {
                    m: {
                        "program": r.program,
                        "node": r.node or LOCAL,
                        "port": r.port,
                        "fingerprint": r.fingerprint,
                        "state": r.state.value,
                        "deadline": r.deadline or r.restore_deadline,
                        "loaded_at": r.loaded_at,
                        "requests": r.requests,
                        "leases": [lease.view() for lease in r.leases.values()],
                    }
                    for m, r in self._records.items()
                    if r.state in OCCUPYING
                },
            }

    def saved(self, version: tuple[int, int]) -> None:
        """The snapshot ``version`` from ``persisted`` is on disk."""
        with self._lock:
            self._saved, self._moved_saved = version

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
            nodes = self._placeable()
            limits = [self._node_limits(slot) for slot in nodes]
            free = sum(v.free_ports for v in self._node_views())
            return {
                "active_models": sum(1 for r in recs if r.state in SERVING),
                "loading_models": sum(1 for r in recs if r.state is State.WARMING),
                "total_models": len(recs),
                "total_memory_mb": round(sum(r.memory() for r in recs if r.state in OCCUPYING), 1),
                "memory_limit_mb": sum(x[2] for x in limits),
                "max_concurrent_models": sum(x[3] for x in limits),
                "available_ports": free,
                "failed_models": sum(1 for r in recs if r.state is State.FAILED),
                "nodes": len(nodes),
                "nodes_up": sum(1 for slot in nodes if slot.up),
            }
