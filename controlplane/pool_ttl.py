"""The pool's TTLs: effective TTLs, deadlines, warmup schedule windows and expiry.

A part of ``ModelPool`` (one lock, one writer), kept apart so each concept reads in one sitting;
the rules are pure, in ``controlplane.core.policy`` and ``core.schedule``.
"""

from __future__ import annotations

import logging
from dataclasses import replace

from controlplane.core import policy, schedule
from controlplane.core.states import SERVING, Event, State
from controlplane.errors import (
    Conflict,
)
from controlplane.pool_parts import PoolParts
from controlplane.records import Record
from controlplane.settings import (
    warmup_ids,
)

log = logging.getLogger("modelpool.pool")


class Ttl:
    """The pool's TTLs (a mixin of ``ModelPool``: ``self`` is the pool)."""

    def warmup_ids(self: PoolParts) -> tuple[str, ...]:
        with self._lock:
            return self._warmups()

    def _warmups(self: PoolParts) -> tuple[str, ...]:
        return warmup_ids(tuple(self._records[m].entry for m in self._order), self.settings)

    def _kept(self: PoolParts) -> set[str]:
        """Models kept loaded now: warmup models and those inside a schedule window."""
        return set(self._warmups()) | self._scheduled

    def scheduled_ids(self: PoolParts) -> set[str]:
        with self._lock:
            return set(self._scheduled)

    def refresh_schedules(self: PoolParts, weekday: int, minute: int) -> set[str]:
        """Recompute which models are inside a warmup window (local time); return them.

        A model whose window opens stops expiring; one whose window closes gets a deadline of
        now + its TTL, as if it had just been used.
        """
        with self._lock:
            now_in = {
                m
                for m in self._order
                if (r := self._records[m]).entry.schedule
                and schedule.active(r.windows, weekday, minute)
            }
            if now_in != self._scheduled:
                self._scheduled = now_in
                self._refit_deadlines()
            return set(now_in)

    def _refit_deadlines(self: PoolParts) -> None:
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

    def ttl_minutes(self: PoolParts, rec: Record) -> float:
        """The model's effective TTL (0: never expires)."""
        # A warmup model keeps its ``min`` replicas; the others expire as any model does.
        warm = rec.entry.model_id in self._kept() and rec.replica <= rec.entry.min_replicas
        return policy.effective_ttl_minutes(rec.entry.ttl_minutes, warm, self._bounds())

    def _bounds(self: PoolParts) -> policy.TtlBounds:
        s = self.settings
        return policy.TtlBounds(
            s.default_ttl_minutes, s.min_ttl_minutes, s.max_ttl_minutes, s.grace_period_minutes
        )

    def extend_ttl(self: PoolParts, model_id: str, minutes: float) -> tuple[Record, bool]:
        """Move the deadline to max(deadline, now) + minutes, capped at now + max TTL, of every
        serving replica of the model; returns its first serving replica's record."""
        with self._lock:
            first = self._get(model_id)
            group = [r for r in self._group(model_id) if r.state in SERVING]
            if not group:
                raise Conflict(
                    f"model {model_id!r} is {first.state.value}; only a loaded model has a TTL"
                )
            now = self.clock()
            clamped = False
            for rec in group:
                if self.ttl_minutes(rec) == 0:
                    continue
                ext = policy.extend(rec.deadline, now, minutes, self._bounds())
                rec.deadline = ext.deadline
                clamped = clamped or ext.clamped
                self._version += 1
                if rec.state is State.COOLING:
                    rec.grace_until = None
                    self._apply(rec, Event.REQUEST_ARRIVED, "extend_ttl")
            result = replace(group[0]), clamped
        self.on_change()
        return result

    def touch(self: PoolParts, rec: Record, at: float) -> None:
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

    def expire(self: PoolParts, now: float) -> None:
        """Apply the TTL events due at ``now`` (only with auto_unload), on nodes that answer."""
        with self._lock:
            self._lapse_leases(now)
        if not self.settings.auto_unload:
            return
        with self._lock:
            grace = self.settings.grace_period_minutes * policy.MINUTE
            for _ in range(2):  # a zero grace period cools and unloads in one pass
                for model_id, event in policy.due_events(self._views(), now):
                    rec = self._records[model_id]
                    if not self._node_answers(rec):
                        continue  # no unload on a node that does not answer: it waits for it
                    if event is Event.TTL_EXPIRED:
                        rec.grace_until = (rec.deadline or now) + grace
                        self._apply(rec, event, "ttl")
                    else:
                        self._begin_unload(rec, event, "ttl")

    def next_wakeup(self: PoolParts) -> float | None:
        with self._lock:
            return policy.next_wakeup(self._views()) if self.settings.auto_unload else None
