"""The pool's unloads: unload calls, evictions, the drain, and the stop and cleanup jobs with
what they report.

A part of ``ModelPool`` (one lock, one writer); the jobs run in ``controlplane.lifecycle``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from controlplane.core import policy
from controlplane.core.chores import Chore, ChoreEvent
from controlplane.core.states import OCCUPYING, SERVING, Event, State
from controlplane.errors import (
    BackendDown,
    Conflict,
    LoadFailed,
    NoCapacity,
)
from controlplane.pool_parts import PoolParts
from controlplane.records import Record

log = logging.getLogger("modelpool.pool")


class Unloading:
    """The pool's unloads (a mixin of ``ModelPool``: ``self`` is the pool)."""

    def unload(
        self: PoolParts,
        model_id: str,
        *,
        force: bool = False,
        wait: bool = False,
        reason: str = "manual",
    ) -> Record:
        """Unload a loaded model (HOT/COOLING → UNLOADING → COLD), every replica of it.

        COLD and UNLOADING are answered as they are; WARMING and FAILED are a Conflict (unless
        another replica of the model was unloaded). Returns the first replica's record, or the
        record of another one that was unloaded when the first was not loaded.
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
            if rec.state is State.WARMING:
                raise Conflict(f"model {model_id!r} is loading; unload it once it is HOT")
            others = [r for r in self._group(model_id)[1:] if r.state in OCCUPYING]
            for other in others:
                if other.state in SERVING:
                    self._begin_unload(other, Event.UNLOAD_REQUESTED, reason, force=force)
                elif other.state is State.WARMING and not other.adopting:
                    # A replica scaling was starting: it would serve again afterwards.
                    self._begin_unload(other, Event.LOAD_CANCELLED, reason, force=True)
                elif other.state is State.UNLOADING and force:
                    self.lifecycle.hurry(other.key, other.gen)
            if others and rec.state not in OCCUPYING:
                rec = others[0]  # the model's answer is a replica that was loaded
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
                self.lifecycle.hurry(rec.key, rec.gen)
            if wait:
                limit = time.monotonic() + self.settings.graceful_shutdown_seconds + 30
                while time.monotonic() < limit and any(
                    r.state is State.UNLOADING for r in (rec, *others)
                ):
                    self._changed.wait(1.0)
            return replace(rec)

    def _begin_unload(
        self: PoolParts, rec: Record, event: Event, reason: str, force: bool = False
    ) -> None:
        rec.unload_reason = reason
        rec.grace_until = None
        self.stats.unloaded(rec.entry.model_id, reason)
        self._apply(rec, event, reason)
        self._start_stop(rec, force)

    def _start_stop(self: PoolParts, rec: Record, force: bool) -> None:
        """Start the stop job of an UNLOADING model (lock held).

        The chore is STOPPING only once the job runs: if it could not be started, the stop is
        due and the reaper's next pass (``retry_stop``) starts it again.
        """
        try:
            self.lifecycle.start_stop(rec.key, rec.gen, force=force)
        except Exception:
            log.exception("could not start the stop of %s; the reaper retries", rec.key)
            self._chore(rec, ChoreEvent.STOP_FAILED)
            return
        self._chore(rec, ChoreEvent.STOP_STARTED)

    def drain(self: PoolParts, timeout: float) -> list[str]:
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

    def retry_stop(self: PoolParts, model_id: str, gen: int) -> None:
        """Run the stop of an UNLOADING model again (its earlier attempt failed)."""
        with self._lock:
            rec = self._records.get(model_id)
            if rec is None or rec.gen != gen or rec.state is not State.UNLOADING or rec.busy:
                return  # gone, loaded again, or its stop job is running
            self._start_stop(rec, force=True)

    def stopped(self: PoolParts, model_id: str, gen: int) -> None:
        """UNLOADING → COLD: the worker stopped and its program is gone; the port is free."""
        with self._lock:
            rec = self._records.get(model_id)
            if rec is None or rec.gen != gen or rec.state is not State.UNLOADING:
                return
            self._forget_process(rec)
            self._chore(rec, ChoreEvent.STOPPED)
            rec.failures = 0
            rec.retry_at = 0.0
            self._apply(rec, Event.STOPPED, rec.unload_reason or "stopped")
            if rec.deleting:
                self._drop(rec)
            elif rec.reload:
                self._reload(rec)

    def _reload(self: PoolParts, rec: Record) -> None:
        """Load again a model whose outdated worker just stopped (lock held)."""
        rec.reload = False
        if self.draining or not self._any_node_up() or self._room_queue:
            return  # the next request or warmup pass loads it (after those waiting for room)
        if not self._place(rec, self._estimate(rec)).plan.ok:
            return  # no eviction for a reload nobody asked for: the next request loads it
        try:
            self._try_start(rec, manual=True)
        except (NoCapacity, LoadFailed, BackendDown) as exc:
            log.warning("reload of %s after a config change waits: %s", rec.entry.model_id, exc)

    def _forget_process(self: PoolParts, rec: Record) -> None:
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

    def cleaned(self: PoolParts, model_id: str, gen: int, removed: bool = True) -> None:
        """The cleanup of a FAILED model's worker ended; if it was removed, the port is free."""
        with self._lock:
            rec = self._records.get(model_id)
            if rec is None or rec.gen != gen or rec.chore is not Chore.CLEANING:
                return  # gone, loaded again, or its node was lost meanwhile
            self._chore(rec, ChoreEvent.CLEANED if removed else ChoreEvent.CLEANUP_FAILED)
            if removed and rec.state is State.FAILED:
                self._forget_process(rec)
                if rec.deleting:
                    self._drop(rec)
            self._changed.notify_all()

    def retry_cleanups(self: PoolParts) -> None:
        """Start again the cleanups of FAILED workers that could not be removed before."""
        with self._lock:
            for rec in self._records.values():
                if rec.needs_cleanup and rec.state is State.FAILED and self._node_answers(rec):
                    self._start_cleanup(rec)

    def _start_cleanup(self: PoolParts, rec: Record) -> None:
        """Start removing a FAILED model's worker (lock held); if it cannot start, retry later."""
        try:
            self.lifecycle.start_cleanup(rec.key, rec.gen)
        except Exception:
            log.exception("could not start the cleanup of %s", rec.key)
            self._chore(rec, ChoreEvent.CLEANUP_FAILED)
            return
        self._chore(rec, ChoreEvent.CLEANUP_STARTED)

    def enforce_memory_limit(self: PoolParts) -> list[str]:
        """Evict idle non-warmup models (LRU) while a node's measured total is over its limit."""
        with self._lock:
            victims: list[str] = []
            by_node = self._models_by_node()
            for slot in self._nodes.values():
                if not slot.up:
                    continue
                limit = self._node_limits(slot)[2]
                victims += policy.evict_over_limit(
                    by_node.get(slot.name, []), limit, self.settings.eviction_order
                )
            for model_id in victims:
                self._begin_unload(self._records[model_id], Event.UNLOAD_REQUESTED, "memory")
            return victims

    def unloading_idle(self: PoolParts) -> list[tuple[str, int, str]]:
        """UNLOADING models whose stop is not running (for the reaper to finish)."""
        with self._lock:
            return [
                (m, r.gen, r.program)
                for m, r in self._records.items()
                if r.state is State.UNLOADING and not r.busy and self._node_answers(r)
            ]

    def stop_failed(self: PoolParts, model_id: str, gen: int) -> None:
        """The stop job could not remove the worker (supervisord away): the stop is due again."""
        with self._lock:
            rec = self._records.get(model_id)
            if (
                rec is not None
                and rec.gen == gen
                and rec.state is State.UNLOADING
                and rec.chore is Chore.STOPPING
            ):
                self._chore(rec, ChoreEvent.STOP_FAILED)
                self._changed.notify_all()
