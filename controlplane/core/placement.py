"""Which node a model is loaded on: a pure function of the nodes and the models on them.

Placement first filters the nodes that may take the model at all (UP, a free port, the entry's
``nodes`` pin and ``labels``), then asks ``policy.plan_capacity`` of each: a node where the model
fits now wins over one where it fits once idle models are evicted. Among equals the score
decides: a node that holds no replica of the model yet comes first (replicas of one model go
to different nodes, each with its own Ollama or GPU; with ``exclusive``, as for backends outside
the worker, such a node may not take it at all); then ``spread`` (the default) takes the
node with the most free memory, ``pack`` the one with the least that still fits, so that whole
nodes stay free; ties go to the fewest models, then to the node listed first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from controlplane.core.policy import CapacityPlan, ModelView, plan_capacity
from controlplane.core.states import OCCUPYING

STRATEGIES: Final = ("spread", "pack")


@dataclass(frozen=True)
class NodeView:
    """What placement needs to know about one node."""

    name: str
    up: bool
    labels: frozenset[str] = frozenset()
    memory_limit_mb: float = 0.0  # 0: no limit
    max_models: int = 5
    free_ports: int = 1


@dataclass(frozen=True)
class Want:
    """The model to place: its memory estimate and the entry's constraints."""

    model_id: str
    need_mb: float
    pinned: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    #: For eviction (``core.eviction``): the model's priority, the time, the residency.
    priority: str = "normal"
    now: float | None = None
    min_resident_seconds: float = 0.0
    resident_load_multiple: float = 0.0
    min_idle_seconds: float = 0.0
    order: str = "cost"
    #: Nodes that already hold a replica of the model (placed last).
    replica_nodes: frozenset[str] = frozenset()
    #: Replicas must not share a node (a backend outside the worker, e.g. Ollama, is one per
    #: node: a second worker would share it, and its unload would unload the other's model).
    exclusive: bool = False


@dataclass(frozen=True)
class Placement:
    """Where to load: ``node`` with ``plan`` (ok, or evictions to start and wait for).

    ``node`` is None when no node can take the model; ``reason`` says why, node by node.
    """

    node: str | None
    plan: CapacityPlan = field(default_factory=lambda: CapacityPlan(ok=False))
    reason: str = ""
    #: With no node: the earliest time one could make room (models inside their residency).
    room_at: float | None = None
    #: With no node: some node could take the model once room frees (worth waiting for).
    waitable: bool = False


def eligible(node: NodeView, want: Want) -> str | None:
    """Why ``node`` may not take ``want`` at all, or None if it may."""
    if want.pinned and node.name not in want.pinned:
        return "not in the entry's nodes"
    missing = sorted(set(want.labels) - node.labels)
    if missing:
        return f"lacks label(s) {', '.join(missing)}"
    if not node.up:
        return "DOWN"
    if want.exclusive and node.name in want.replica_nodes:
        return "holds a replica of the model already"
    if node.free_ports <= 0:
        return "no free port"
    return None


def _free_mb(node: NodeView, models: Sequence[ModelView]) -> float:
    if node.memory_limit_mb <= 0:
        return math.inf
    used = sum(m.memory_mb for m in models if m.state in OCCUPYING)
    return node.memory_limit_mb - used


def place(
    nodes: Sequence[NodeView],
    models: Mapping[str, Sequence[ModelView]],
    want: Want,
    strategy: str = "spread",
) -> Placement:
    """The best node for ``want``; ``models`` gives the models on each node by node name."""
    ready: list[tuple[NodeView, CapacityPlan]] = []
    evicting: list[tuple[NodeView, CapacityPlan]] = []
    why: list[str] = []
    room_at: list[float] = []
    waitable = False
    for node in nodes:
        reason = eligible(node, want)
        if reason is None:
            here = models.get(node.name, ())
            plan = plan_capacity(
                here,
                want.model_id,
                want.need_mb,
                node.max_models,
                node.memory_limit_mb,
                priority=want.priority,
                now=want.now,
                min_resident_seconds=want.min_resident_seconds,
                resident_load_multiple=want.resident_load_multiple,
                min_idle_seconds=want.min_idle_seconds,
                order=want.order,
            )
            if plan.ok:
                ready.append((node, plan))
                continue
            if plan.evict or plan.wait:
                evicting.append((node, plan))
                continue
            reason = plan.reason
            waitable = waitable or plan.waitable
            if plan.room_at is not None:
                room_at.append(plan.room_at)
        why.append(f"{node.name}: {reason}")
    order = {n.name: i for i, n in enumerate(nodes)}

    def score(item: tuple[NodeView, CapacityPlan]) -> tuple[bool, float, int, int]:
        node = item[0]
        here = models.get(node.name, ())
        free = _free_mb(node, here)
        count = sum(1 for m in here if m.state in OCCUPYING)
        # spread: most free memory first; pack: least free memory first (it still fits).
        key = -free if strategy == "spread" else free
        return (node.name in want.replica_nodes, key, count, order[node.name])

    for group in (ready, evicting):
        if group:
            node, plan = min(group, key=score)
            return Placement(node.name, plan)
    if not nodes:
        return Placement(None, reason="no node is configured")
    when = min(room_at, default=None)
    if len(nodes) == 1:  # one node: its own reason, as a single-node pool says it
        return Placement(None, reason=why[0].split(": ", 1)[1], room_at=when, waitable=waitable)
    reason = "no node can take the model (" + "; ".join(why) + ")"
    return Placement(None, reason=reason, room_at=when, waitable=waitable)
