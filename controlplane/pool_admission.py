"""The pool's loads and requests: single-flight loads, callers waiting for them and the caps on
those, where a load goes (node and port), and requests counted in flight.

A part of ``ModelPool`` (one lock, one writer); where a model fits is decided by the pure
``controlplane.core.placement`` and ``core.policy``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

from controlplane.core import policy
from controlplane.core.chores import Chore, ChoreEvent
from controlplane.core.jobs import Job
from controlplane.core.ports import PortRequest, PortUnavailableError, choose_port, warmup_ports
from controlplane.core.states import SERVING, Event, State
from controlplane.errors import (
    BackendDown,
    LoadFailed,
    LoadTimeout,
    NoCapacity,
)
from controlplane.nodeconfig import LOCAL
from controlplane.pool_parts import PoolParts, Ticket
from controlplane.records import Record
from controlplane.settings import (
    IN_PROCESS_BACKENDS,
)

log = logging.getLogger("modelpool.pool")

#: How long a port that another process took at bind time is left alone.
AVOID_PORT_SECONDS = 60.0


class Admission:
    """The pool's loads and requests (a mixin of ``ModelPool``: ``self`` is the pool)."""

    def ensure_loaded(
        self: PoolParts,
        model_id: str,
        timeout: float | None = None,
        *,
        manual: bool = False,
        wait: bool = True,
        queue: bool = True,
        job: Job | None = None,
    ) -> Record:
        """Make ``model_id`` HOT (or start it, with ``wait=False``) and return its record:
        the model's own worker (its first replica), which leases hold and load calls load.

        Single-flight: concurrent callers for a COLD model cause one load and all wait for it.
        A model that is UNLOADING is waited for and loaded again. ``manual`` (a ``load`` call)
        skips the retry backoff of a FAILED model. ``job``: the queued load job this caller runs
        (``pool_jobs``). Raises UnknownModel, NoCapacity, LoadFailed, LoadTimeout, LoadCancelled.
        """
        return self._ensure(
            model_id, timeout, manual=manual, wait=wait, hold=False, queue=queue, job=job
        )

    def begin_request(
        self: PoolParts,
        model_id: str,
        timeout: float | None = None,
        avoid: frozenset[str] = frozenset(),
    ) -> Record:
        """Load if needed and count a request as in flight, in one hold of the lock.

        Between "the model is HOT" and "a request is in flight" nothing can unload it: the
        reaper never expires a model with a request in flight, so a request can never race an
        unload into a model that is going away. With several replicas, the request goes to
        the serving one with the fewest in flight; the record returned is that replica's
        (its ``key``). ``avoid``: replicas that just failed this request (a retry); with none
        other serving, BackendDown. Pair with ``release``.
        """
        return self._ensure(model_id, timeout, manual=False, wait=True, hold=True, avoid=avoid)

    def try_begin_request(
        self: PoolParts, model_id: str, avoid: frozenset[str] = frozenset()
    ) -> tuple[str, int, int, str] | None:
        """``begin_request`` for a model that is serving now, without waiting or raising:
        (worker address, port, generation, replica key), or None when the request needs more
        (a load, a wait, an error) or no replica but those in ``avoid`` serves. Pair with
        ``release(model_id, gen, thread=False)``."""
        with self._lock:
            rec = self._serving_replica(model_id, avoid)
            if rec is None or rec.port is None:
                return None
            # Relayed on the event loop, it holds none of the threads _held counts.
            rec.in_flight += 1
            self._count(rec)
            self.touch(rec, self.clock())
            return self.address_of(rec.node), rec.port, rec.gen, rec.key

    @contextmanager
    def acquire(self: PoolParts, model_id: str, timeout: float | None = None) -> Iterator[Record]:
        """``begin_request`` ... ``release`` as a context manager."""
        rec = self.begin_request(model_id, timeout)
        try:
            yield rec
        finally:
            self.release(model_id, rec.gen)

    def release(self: PoolParts, model_id: str, gen: int, thread: bool = True) -> None:
        """The end of a request counted by ``begin_request`` for generation ``gen`` (or by
        ``try_begin_request``, with ``thread=False``).

        A request of an earlier load (the model was force-unloaded and loaded again meanwhile)
        is not counted against the new worker.
        """
        with self._lock:
            if thread:  # the thread is free whatever its generation
                self._held = max(0, self._held - 1)
            for rec in self._group(model_id):  # generations are unique across the pool
                if rec.gen == gen:
                    if rec.in_flight > 0:
                        rec.in_flight -= 1
                        self.touch(rec, self.clock())
                    break

    def _ensure(
        self: PoolParts,
        model_id: str,
        timeout: float | None,
        *,
        manual: bool,
        wait: bool,
        hold: bool,
        queue: bool = True,
        job: Job | None = None,
        avoid: frozenset[str] = frozenset(),
    ) -> Record:
        limit = self.settings.load_timeout_seconds if timeout is None else timeout
        began = time.monotonic()
        give_up = began + limit
        waited = False
        started_gen: int | None = None
        waited_gen: int | None = None  # the load this caller saw in progress
        notify = False
        queued: Record | None = None  # the record this caller is counted as waiting on
        ticket: Ticket | None = None  # this caller's place in the queue for room
        room_at: float | None = None  # when a resident model may go (the pool's clock)
        try:
            with self._lock:
                while True:
                    rec = self._get(model_id)
                    if hold and (avoid or model_id in self._extras):
                        chosen = self._serving_replica(model_id, avoid)
                        if chosen is None and avoid:
                            raise self._no_other_replica(model_id)
                        rec = chosen or rec
                    if rec.state in SERVING:
                        if hold:
                            if queued is None:
                                self._check_threads(rec)
                            self._held += 1
                            rec.in_flight += 1
                            self._count(rec)
                            self.touch(rec, self.clock())
                        if waited:
                            self.stats.waited(model_id, time.monotonic() - began)
                        return replace(rec)
                    waited = True
                    if rec.state is State.WARMING:
                        waited_gen = rec.gen
                    self._check_cancelled(rec, job, (started_gen, waited_gen))
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
                    if ticket is not None and not idle:
                        self._leave_room_queue(ticket)  # its load started (for another caller)
                        ticket = None
                        give_up = time.monotonic() + limit
                    if ticket is not None and time.monotonic() >= ticket.until:
                        self._leave_room_queue(ticket)
                        ticket = None
                        raise NoCapacity(
                            f"model {model_id!r} found no room within capacity_wait_seconds "
                            f"({self.settings.capacity_wait_seconds:g} s)",
                            retry_after=5,
                        )
                    queues = wait and queue and self.settings.capacity_wait_seconds > 0
                    if idle and rec.chore is Chore.NONE:
                        try:
                            started_gen = self._try_start(rec, manual, self._nodes_ahead(ticket))
                        except NoCapacity as refusal:
                            ticket = self._wait_for_room(ticket, refusal, queues, began, rec)
                            room_at = refusal.room_at
                        else:
                            notify = notify or started_gen is not None
                            if started_gen is not None:
                                # The load timeout is the load's: time spent waiting for room
                                # before it does not count against it.
                                give_up = time.monotonic() + limit
                                if ticket is not None:
                                    self._leave_room_queue(ticket)
                                    ticket = None
                                continue
                            if ticket is None and queues:
                                # Room is being made for it (evictions): it keeps its place
                                # ahead of later callers until its load starts (its wait is
                                # bounded by the load timeout, not the room wait).
                                ticket = Ticket(math.inf, self._eligible_nodes(rec))
                                self._room_queue.append(ticket)
                    if timeout is None and rec.state is State.WARMING and rec.progressed_at:
                        # A load that keeps making progress (a long pull) is not timed out.
                        give_up = max(give_up, rec.progressed_at + limit)
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
                    nap = min(remaining, 1.0)
                    if room_at is not None:
                        # No event says a residency or idle guard ended: wake for it.
                        nap = min(nap, max(0.02, room_at - self.clock()))
                        room_at = None
                    self._changed.wait(nap)
        finally:
            if queued is not None or ticket is not None:
                with self._lock:
                    if queued is not None:
                        self._dequeue(queued)
                    if ticket is not None:
                        self._leave_room_queue(ticket)
            if notify:
                self.on_change()

    def _wait_for_room(
        self: PoolParts,
        ticket: Ticket | None,
        refusal: NoCapacity,
        wait: bool,
        began: float,
        rec: Record,
    ) -> Ticket:
        """A load that finds no room, or finds others waiting for room on the node it would
        take (``refusal``): take a place in the FIFO queue of the nodes ``rec`` may use (lock
        held), for up to ``capacity_wait_seconds`` from ``began``; past that, or if waiting
        cannot help, the refusal (503 + Retry-After)."""
        limit = self.settings.capacity_wait_seconds
        if not wait or not refusal.waitable or limit <= 0:
            raise refusal  # a load call that returns at once, a warmup load, a never-fits
        if ticket is None:
            ticket = Ticket(began + limit, self._eligible_nodes(rec))
            self._room_queue.append(ticket)
        if time.monotonic() >= ticket.until:
            self._leave_room_queue(ticket)
            raise NoCapacity(
                f"no room within capacity_wait_seconds ({limit:g} s): {refusal}",
                retry_after=refusal.retry_after,
            )
        return ticket

    def _nodes_ahead(self: PoolParts, ticket: Ticket | None) -> frozenset[str]:
        """The nodes that callers ahead of ``ticket`` (all of them, for a caller without one)
        wait for room on (lock held): a load there must queue behind them."""
        ahead: set[str] = set()
        for t in self._room_queue:
            if t is ticket:
                break
            ahead |= t.nodes
        return frozenset(ahead)

    def _leave_room_queue(self: PoolParts, ticket: Ticket) -> None:
        if ticket in self._room_queue:
            self._room_queue.remove(ticket)
            self._changed.notify_all()  # the next in line may try

    def _enqueue(self: PoolParts, rec: Record) -> None:
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

    def _check_threads(self: PoolParts, rec: Record) -> None:
        """Refuse a request (lock held) when waiters and relayed requests, which each hold one
        of the control plane's threads, already take ``max_waiting_total`` of them."""
        if self._waiting + self._held >= self.max_waiting_total:
            self.stats.refused(rec.entry.model_id)
            raise NoCapacity(
                f"the control plane is busy: {self._waiting} requests wait for a load and "
                f"{self._held} are being relayed (at most {self.max_waiting_total} in all)",
                retry_after=2,
            )

    def _dequeue(self: PoolParts, rec: Record) -> None:
        rec.waiters -= 1
        self._waiting -= 1

    def _try_start(
        self: PoolParts,
        rec: Record,
        manual: bool,
        ahead: frozenset[str] = frozenset(),
        reason: str = "",
    ) -> int | None:
        """Start loading ``rec`` if capacity allows (lock held); None if it must wait first.

        A load whose node is one that earlier callers wait for room on (``ahead``) is refused
        (waitable): it queues behind them. One that fits on another node goes ahead.
        """
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
        if where.node is None and ahead and where.waitable:
            where = replace(where, reason=f"{where.reason}; others wait for room before it")
        if where.node is not None and where.node in ahead:
            behind = NoCapacity(
                f"loads wait for room on node {where.node!r} before this one", retry_after=5
            )
            behind.waitable = True
            raise behind
        plan = where.plan
        if where.node is None or not (plan.ok or plan.evict or plan.wait):
            self.stats.refused(rec.entry.model_id)
            # Room at a known time (models still inside min_resident_seconds): say when.
            wait = 5.0 if where.room_at is None else max(1.0, where.room_at - self.clock())
            refusal = NoCapacity(where.reason or plan.reason, retry_after=wait)
            refusal.waitable = where.waitable
            refusal.room_at = where.room_at
            raise refusal
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
        self._apply(rec, Event.LOAD_REQUESTED, reason or ("manual" if manual else "request"))
        self._start_load(rec, adopt=False)
        return rec.gen

    def _new_generation(self: PoolParts, rec: Record) -> None:
        """A new load (lock held): counts of the previous worker's requests no longer apply."""
        self._generations += 1
        rec.gen = self._generations
        rec.in_flight = 0

    def _start_load(self: PoolParts, rec: Record, adopt: bool) -> None:
        """Hand a WARMING model to the lifecycle (lock held); a failure to do so fails the load."""
        try:
            self.lifecycle.start_load(rec.key, rec.gen, adopt=adopt)
        except Exception as exc:
            log.exception("could not start the load of %s", rec.key)
            rec.last_error = f"could not start the load: {exc}"
            # Its program may exist: remove it before the port is reused.
            self._chore(rec, ChoreEvent.CLEANUP_FAILED)
            self.stats.load_failed(rec.entry.model_id, "start_error")
            self._apply(rec, Event.LOAD_FAILED, "start_error")

    def _estimate(self: PoolParts, rec: Record) -> float:
        """What a load of ``rec`` will need: the estimate, or what it measured last if more
        (so a model that alone exceeds the limit is refused instead of loaded and evicted)."""
        e = rec.entry
        file_mb = self.file_mb(e.model_path) if e.backend in IN_PROCESS_BACKENDS else None
        estimate = policy.estimate_mb(e.memory_mb, file_mb, self.settings.default_memory_mb)
        return max(estimate, rec.last_measured_mb or 0.0)

    def reassign_port(self: PoolParts, model_id: str, gen: int, bad_port: int) -> int | None:
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

    def _choose_port(self: PoolParts, rec: Record) -> int:
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
        # A pinned port is its first replica's; the others take any free one.
        own = rec.entry.port if rec.replica == 1 else None
        req = PortRequest(rec.key, own, order, pinned - {own})
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
