"""Replicas of one model: which one serves the next request, and when to add or drain one.

Pure: the pool gives views of a model's replicas and the time, and applies what comes back.

Balancing (``pick``): a request goes to the serving replica (HOT or COOLING, not draining) with
the fewest requests in flight, counting those sent straight to its port; among equals that are
busy, the next in turn (round robin over the replicas' ids); among equals with nothing in
flight, the first in the model's order, so that under light load the spare replicas go idle
and scaling can drain them (round robin would keep every one of them just used).
A request retried after its replica died before answering names that replica in ``avoid``.

Scaling (``decide``), for a model with ``replicas: {min, max}``:

- **Up to ``min``** as soon as the model serves (its first replica loads on demand, as today).
- **Up** when the requests in flight per serving replica have stayed at or above
  ``up_in_flight`` for ``up_seconds`` (``busy_since`` follows that, see ``busy_since``), no
  replica is starting already, and there are fewer than ``max``. Whether there is room for it
  is placement's question, not this one.
- **Down** when there are more than ``min`` and a serving replica has been idle (nothing in
  flight) for ``down_idle_seconds``: the one idle longest is drained. The last replica is never
  drained here (its TTL applies to it), nor the model's own worker (``anchor``), nor one of the
  ``min`` a warmup model keeps.
- **A pinned count** (``modelpool scale MODEL N``) replaces both: one step at a time towards it
  while the model serves, draining an idle replica first, else the one with the fewest in
  flight (never the anchor).
- **No flapping**: at most one change per model per ``up_seconds`` (``last_change``).

Where a new replica goes is placement's (``core.placement``, ``Want.replica_nodes``): a node
without one first. Two Ollama-backed replicas must never share a node, since they would share
its Ollama (one replica's unload would unload the other's model); only in-process backends may
run a second replica on a node.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Final

from controlplane.core.states import State

#: Replica states that take requests.
SERVING: Final = frozenset({State.HOT, State.COOLING})


@dataclass(frozen=True)
class ReplicaView:
    """What the decisions read of one replica."""

    replica_id: str
    state: State
    #: Requests in flight: the front door's and those sent straight to its port.
    in_flight: int = 0
    #: Being drained: no new request, unloaded once its requests end.
    draining: bool = False
    #: When its last request ended (or it became HOT), for the idle time.
    idle_since: float = 0.0
    #: The model's own worker (its first replica: leases, load calls and the service registry
    #: name it): scaling never drains it, its TTL applies to it.
    anchor: bool = False

    @property
    def serving(self) -> bool:
        return self.state in SERVING and not self.draining


def pick(
    replicas: Sequence[ReplicaView], turn: int, avoid: frozenset[str] = frozenset()
) -> tuple[ReplicaView | None, int]:
    """The replica for the next request and the next ``turn`` (None: none serves now).
    ``replicas`` in the model's order (its first replica first)."""
    ready = [r for r in replicas if r.serving and r.replica_id not in avoid]
    if not ready:
        return None, turn
    least = min(r.in_flight for r in ready)
    if least == 0:
        return next(r for r in ready if r.in_flight == 0), turn
    tied = sorted((r for r in ready if r.in_flight == least), key=lambda r: r.replica_id)
    return tied[turn % len(tied)], turn + 1


class Direction(Enum):
    UP = "up"
    DOWN = "down"


@dataclass(frozen=True)
class Limits:
    """A model's replica bounds and the pool's scaling settings."""

    minimum: int = 1
    maximum: int = 1
    #: Requests in flight per serving replica that count as busy (``scale_up_in_flight``).
    up_in_flight: float = 4.0
    #: How long busy lasts before a replica is added; also the least time between two changes.
    up_seconds: float = 5.0
    #: Idle time after which a replica beyond ``minimum`` is drained (seconds).
    down_idle_seconds: float = 120.0


@dataclass(frozen=True)
class Decision:
    direction: Direction
    #: The replica to drain (DOWN), None for UP.
    replica_id: str | None = None
    why: str = ""


def load_per_replica(replicas: Sequence[ReplicaView]) -> float:
    """Requests in flight per serving replica (0 with none serving)."""
    serving = [r for r in replicas if r.serving]
    return sum(r.in_flight for r in serving) / len(serving) if serving else 0.0


def busy_since(previous: float | None, load: float, limits: Limits, now: float) -> float | None:
    """When the model's current busy stretch began: ``now`` as it begins, unchanged while it
    lasts, None as soon as the load per replica drops below ``up_in_flight``."""
    if load < limits.up_in_flight:
        return None
    return now if previous is None else previous


def decide(
    replicas: Sequence[ReplicaView],
    limits: Limits,
    now: float,
    busy: float | None,
    last_change: float | None,
    pinned: int | None = None,
) -> Decision | None:
    """One scaling step for a model, or None. ``replicas``: all its replicas but COLD ones."""
    if last_change is not None and now - last_change < limits.up_seconds:
        return None
    live = [r for r in replicas if not r.draining and r.state is not State.UNLOADING]
    starting = any(r.state is State.WARMING for r in live)
    serving = [r for r in live if r.serving]
    drainable = [r for r in serving if not r.anchor]
    if pinned is not None:
        if serving and len(live) < pinned and not starting:
            return Decision(Direction.UP, why=f"pinned at {pinned}")
        if len(serving) > 1 and len(live) > pinned and drainable:
            victim = min(drainable, key=lambda r: (r.in_flight, r.idle_since, r.replica_id))
            return Decision(Direction.DOWN, victim.replica_id, f"pinned at {pinned}")
        return None
    if serving and not starting and len(live) < max(1, limits.minimum):
        return Decision(Direction.UP, why=f"below min {limits.minimum}")
    if (
        serving
        and not starting
        and len(live) < limits.maximum
        and busy is not None
        and now - busy >= limits.up_seconds
    ):
        load = load_per_replica(serving)
        return Decision(Direction.UP, why=f"{load:.1f} in flight per replica")
    floor = max(1, limits.minimum)
    idle = [
        r for r in drainable if r.in_flight == 0 and now - r.idle_since >= limits.down_idle_seconds
    ]
    if idle and len(live) > floor and len(serving) > 1:
        victim = min(idle, key=lambda r: (r.idle_since, r.replica_id))
        idle_for = now - victim.idle_since
        return Decision(Direction.DOWN, victim.replica_id, f"idle for {idle_for:.0f} s")
    return None
