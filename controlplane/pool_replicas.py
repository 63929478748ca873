"""The pool's replicas: a model served by several workers, which one takes a request, and
scaling their number with the load.

A model's first replica is its record under its own id (loaded on demand, as any model); its
replica ``k`` >= 2 is a record of its own under ``model#k`` with its own program, node, port,
pid and memory, created when scaling first needs it and kept (COLD) for the next time, so its
counts stay. Every replica is a worker like any other to the rest of the pool: it takes room,
it may be evicted, its TTL applies to it. The decisions are pure, in ``core.replicas``.

A part of ``ModelPool`` (one lock, one writer).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from controlplane.core import replicas
from controlplane.core.chores import Chore
from controlplane.core.replicas import Direction, ReplicaView
from controlplane.core.slug import program_name
from controlplane.core.states import OCCUPYING, SERVING, Event, State
from controlplane.errors import BackendDown, Conflict, LoadFailed, NoCapacity
from controlplane.pool_parts import PoolParts
from controlplane.records import Record, model_of, replica_key

log = logging.getLogger("modelpool.pool")

#: How a replica's state ranks when the model shows one state: its best replica's.
_RANK = {
    State.HOT: 6,
    State.COOLING: 5,
    State.WARMING: 4,
    State.UNLOADING: 3,
    State.FAILED: 2,
    State.COLD: 1,
}


@dataclass
class Scaling:
    """What scaling remembers of one model between passes."""

    #: When its requests in flight per replica reached ``scale_up_in_flight`` (None: below).
    busy: float | None = None
    #: When its replica count last changed by scaling (no flapping).
    last_change: float | None = None
    #: A count pinned by hand (``modelpool scale``), None: scaled by load.
    pinned: int | None = None
    #: Round robin among equally loaded replicas.
    turn: int = 0
    #: Why the last scale-up found no room ("" when it did).
    blocked: str = ""


def best(group: list[Record]) -> Record:
    """The replica whose state the model shows (serving first, then the first replica)."""
    return max(group, key=lambda r: (_RANK[r.state], -r.replica))


class Replicas:
    """The pool's replicas (a mixin of ``ModelPool``: ``self`` is the pool)."""

    # --- reading ------------------------------------------------------------------------------

    def _group(self: PoolParts, model_id: str) -> list[Record]:
        """The model's replicas (lock held): its first, then the others by number."""
        first = self._records.get(model_id)
        if first is None:
            return []
        return [first, *self._extras.get(model_id, ())]

    def replica_records(self: PoolParts, model_id: str) -> list[Record]:
        """Copies of the model's replicas, first one first."""
        with self._lock:
            self._get(model_id)
            return [replace(r) for r in self._group(model_id)]

    def groups(self: PoolParts) -> list[list[Record]]:
        """Copies of every model's replicas (its first one first), in registry order."""
        with self._lock:
            return [[replace(r) for r in self._group(m)] for m in self._order]

    def shown(self: PoolParts) -> list[Record]:
        """Per model, in registry order, a copy of the record whose state it shows: its best
        replica's (its own record when it has one worker)."""
        with self._lock:
            return [replace(best(self._group(m))) for m in self._order]

    def scaling_of(self: PoolParts, model_id: str) -> Scaling:
        with self._lock:
            return replace(self._scaling.get(model_id) or Scaling())

    # --- balancing ----------------------------------------------------------------------------

    def _serving_replica(
        self: PoolParts, model_id: str, avoid: frozenset[str] = frozenset()
    ) -> Record | None:
        """The replica for the next request (lock held): the serving one with the fewest in
        flight, round robin among equals (``core.replicas.pick``); None if none serves."""
        group = self._group(model_id)
        if not group or group[0].replica != 1 or group[0].deleting:
            return None  # no such model (a replica's key is no model)
        if len(group) == 1:  # one worker: no choice to make
            only = group[0]
            ok = only.state in SERVING and only.port is not None and only.key not in avoid
            return only if ok else None
        views = [
            ReplicaView(r.key, r.state, r.total_in_flight, idle_since=r.last_used)
            for r in group
            if not r.deleting and r.port is not None
        ]
        scaling = self._scaling.setdefault(model_id, Scaling())
        chosen, scaling.turn = replicas.pick(views, scaling.turn, avoid)
        return None if chosen is None else self._records[chosen.replica_id]

    def other_replica_serves(self: PoolParts, model_id: str, key: str) -> bool:
        """Whether a replica of the model other than ``key`` serves now."""
        with self._lock:
            return self._serving_replica(model_id, frozenset({key})) is not None

    def _no_other_replica(self: PoolParts, model_id: str) -> BackendDown:
        return BackendDown(
            f"model {model_id!r}: its worker did not answer and no other replica serves",
            retry_after=2,
        )

    # --- scaling ------------------------------------------------------------------------------

    def _limits(self: PoolParts, rec: Record) -> replicas.Limits:
        s = self.settings
        return replicas.Limits(
            rec.entry.min_replicas,
            rec.entry.max_replicas,
            s.scale_up_in_flight,
            s.scale_up_seconds,
            s.scale_down_idle_minutes * 60.0,
        )

    def scale_replicas(self: PoolParts) -> list[tuple[str, str, str]]:
        """One scaling pass over every model (the reaper's): (model, direction, why) of each
        change made. A new replica only takes free room: scaling evicts nothing for it."""
        changes: list[tuple[str, str, str]] = []
        with self._lock:
            if self.draining:
                return changes
            now = self.clock()
            for model_id in self._order:
                first = self._records[model_id]
                scaling = self._scaling.get(model_id)
                single = first.entry.max_replicas == 1 and model_id not in self._extras
                if first.deleting or single:
                    continue
                if scaling is None:
                    scaling = self._scaling[model_id] = Scaling()
                change = self._scale_one(model_id, scaling, now)
                if change is not None:
                    changes.append((model_id, *change))
        if changes:
            self.on_change()
        return changes

    def _scale_one(
        self: PoolParts, model_id: str, scaling: Scaling, now: float
    ) -> tuple[str, str] | None:
        group = self._group(model_id)
        limits = self._limits(group[0])
        # Replicas beyond a lowered max go first, whatever their load (one per up_seconds).
        calm = scaling.last_change is None or now - scaling.last_change >= limits.up_seconds
        for rec in group[limits.maximum :]:
            others = any(r is not rec and r.state in SERVING for r in group)
            if rec.state in SERVING and calm and others:  # the last one serving: its TTL
                self._begin_unload(rec, Event.UNLOAD_REQUESTED, "scale_down")
                return self._scaled(model_id, scaling, now, Direction.DOWN, "above max")
        views = [
            ReplicaView(
                r.key,
                r.state,
                r.total_in_flight + r.waiters,
                idle_since=r.last_used,
                anchor=r.replica == 1,
            )
            for r in group[: limits.maximum]
            if r.state in OCCUPYING
        ]
        load = replicas.load_per_replica(views)
        scaling.busy = replicas.busy_since(scaling.busy, load, limits, now)
        decision = replicas.decide(
            views, limits, now, scaling.busy, scaling.last_change, scaling.pinned
        )
        if decision is None:
            return None
        if decision.direction is Direction.DOWN:
            assert decision.replica_id is not None
            self._begin_unload(
                self._records[decision.replica_id], Event.UNLOAD_REQUESTED, "scale_down"
            )
            return self._scaled(model_id, scaling, now, Direction.DOWN, decision.why)
        why = self._scale_up(model_id, group, limits.maximum)
        if why:
            if why != scaling.blocked:
                log.info("scale up model=%s waits: %s", model_id, why)
            scaling.blocked = why
            return None
        scaling.blocked = ""
        return self._scaled(model_id, scaling, now, Direction.UP, decision.why)

    def _scaled(
        self: PoolParts, model_id: str, scaling: Scaling, now: float, way: Direction, why: str
    ) -> tuple[str, str]:
        scaling.last_change = now
        scaling.busy = None
        self.stats.scaled(model_id, way.value)
        log.info("scale model=%s direction=%s why=%s", model_id, way.value, why)
        return way.value, why

    def _scale_up(self: PoolParts, model_id: str, group: list[Record], maximum: int) -> str:
        """Start one more replica (lock held); "" if it started, else why not."""
        rec = self._free_slot(model_id, group, maximum)
        if rec is None:
            return "every replica slot is in use or backing off after a failure"
        if not self._any_node_up():
            return "no node is up"
        if self._room_queue:
            return "loads wait for room: they go first"
        where = self._place(rec, self._estimate(rec))
        if where.node is None or not where.plan.ok:
            return where.reason or where.plan.reason or "no room without evicting"
        try:
            started = self._try_start(rec, manual=False, reason="scale_up")
        except (NoCapacity, LoadFailed, BackendDown) as exc:
            return str(exc)
        return "" if started is not None else "no room without evicting"

    def _free_slot(
        self: PoolParts, model_id: str, group: list[Record], maximum: int
    ) -> Record | None:
        """The lowest-numbered replica that is not running and may load now (created when it
        never existed), or None."""
        now = self.clock()
        taken = {r.replica: r for r in group}
        for k in range(1, maximum + 1):
            rec = taken.get(k)
            if rec is None:
                return self._new_replica(model_id, k)
            if (
                rec.state in (State.COLD, State.FAILED)
                and rec.chore is Chore.NONE
                and not rec.deleting
                and (rec.state is State.COLD or now >= rec.retry_at)
            ):
                return rec
        return None

    def _new_replica(self: PoolParts, model_id: str, k: int) -> Record:
        entry = self._records[model_id].entry
        key = replica_key(model_id, k)
        rec = Record(entry=entry, program=program_name(key), key=key, replica=k)
        self._records[key] = rec
        extras = self._extras.setdefault(model_id, [])
        extras.append(rec)
        extras.sort(key=lambda r: r.replica)
        return rec

    def _record_for(self: PoolParts, key: str) -> Record | None:
        """The record of worker ``key`` (lock held); a replica's is created if its model still
        allows that many, so that its worker is adopted after a restart like any other."""
        rec = self._records.get(key)
        model_id = model_of(key)
        if rec is not None or model_id == key:
            return rec
        k = key.removeprefix(model_id + "#")
        first = self._records.get(model_id)
        if first is None or first.deleting or not k.isdigit():
            return None
        if not 2 <= int(k) <= first.entry.max_replicas:
            return None
        return self._new_replica(model_id, int(k))

    def worker_programs(self: PoolParts) -> dict[str, str]:
        """Every worker program the registry allows (each model's replicas 1..max): its key."""
        with self._lock:
            return {
                program_name(replica_key(m, k)): replica_key(m, k)
                for m in self._order
                for k in range(1, self._records[m].entry.max_replicas + 1)
            }

    def pinned_counts(self: PoolParts) -> dict[str, int]:
        """Replica counts pinned by hand, by model (the state file keeps them)."""
        return {m: s.pinned for m, s in self._scaling.items() if s.pinned is not None}

    def _drop_replica(self: PoolParts, rec: Record) -> None:
        """Forget a replica >= 2 (lock held): its model was deleted."""
        extras = self._extras.get(rec.entry.model_id, [])
        if rec in extras:
            extras.remove(rec)
        if not extras:
            self._extras.pop(rec.entry.model_id, None)

    def pin_replicas(self: PoolParts, model_id: str, count: int | None) -> Scaling:
        """Pin the model's replica count (``modelpool scale``), or None to scale by load again.
        The count must lie within the entry's ``replicas`` min..max."""
        with self._lock:
            rec = self._get(model_id)
            low, high = rec.entry.replicas
            if count is not None and not low <= count <= high:
                # A well-formed count this entry does not allow (a PUT may widen its bounds).
                raise Conflict(
                    f"replicas: {count} is outside model {model_id!r}'s replicas "
                    f"min..max ({low}..{high})"
                )
            if count is not None and self.draining:
                raise Conflict("modelpool is shutting down")
            scaling = self._scaling.setdefault(model_id, Scaling())
            scaling.pinned = count
            scaling.last_change = None  # a change by hand takes effect at once
            self._version += 1  # kept in the state file
            return replace(scaling)
