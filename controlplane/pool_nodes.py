"""The pool's nodes: a part of ``ModelPool`` (its lock, records and clock), kept apart so each
concept reads in one sitting. Which node a model goes to is decided by the pure
``controlplane.core.placement``; this module keeps each node's state (UP or DOWN, why, since
when) and applies what the node monitors report: a node unreachable for
``node_timeout_seconds`` is DOWN and its models FAILED (``node_lost``); a node back UP gets its
surviving workers adopted, unless their model was loaded elsewhere meanwhile.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from controlplane.core import leases, placement
from controlplane.core.chores import Chore, ChoreEvent
from controlplane.core.policy import ModelView
from controlplane.core.states import OCCUPYING, SERVING, Event, State
from controlplane.nodeconfig import LOCAL, NodeConfig
from controlplane.pool_parts import PoolParts
from controlplane.records import Record
from controlplane.settings import IN_PROCESS_BACKENDS

#: supervisord states of a worker that may be adopted.
ADOPTABLE = frozenset({"STARTING", "RUNNING"})


@dataclass(frozen=True)
class LostWorker:
    """A worker that ran on a node when the node was lost (or the control plane restarted)."""

    model_id: str
    port: int
    fingerprint: str | None
    #: The record's generation when the worker was lost (0: read from the state file at start):
    #: a record loaded again since then does not take the old worker back.
    gen: int = 0
    deadline: float | None = None
    #: Leases from the state file (a node lost at runtime leaves the record's own in place).
    leases: Any = None


@dataclass
class NodeSlot:
    """What the pool knows about one node (mutated only under the pool's lock)."""

    name: str
    config: NodeConfig | None  # None: the stack's own supervisord
    up: bool
    error: str = ""
    since: float = 0.0
    last_seen: float | None = None
    lost: dict[str, LostWorker] = field(default_factory=dict)

    @property
    def local(self) -> bool:
        return self.config is None


class Nodes:
    """Node methods of ``ModelPool`` (a mixin: ``self`` is the pool)."""

    def configure_nodes(self: PoolParts, configs: Iterable[NodeConfig]) -> None:
        """The remote nodes (the local one always exists); each is DOWN until first contact."""
        with self._lock:
            for c in configs:
                self._nodes[c.name] = NodeSlot(c.name, c, up=False, error="not contacted yet")

    def remote_nodes(self: PoolParts) -> list[str]:
        with self._lock:
            return [n for n, slot in self._nodes.items() if not slot.local]

    def _node_limits(self: PoolParts, slot: NodeSlot) -> tuple[int, int, float, int]:
        """(first port, last port, memory_limit_mb, max_concurrent_models) of a node."""
        if slot.config is None:
            s = self.settings
            return s.port_range.start, s.port_range.end, s.memory_limit_mb, s.max_concurrent_models
        c = slot.config
        return c.port_range.start, c.port_range.end, c.memory_limit_mb, c.max_concurrent_models

    def address_of(self: PoolParts, node: str | None) -> str:
        """Where a node's workers listen (the local node: ``bind_host``)."""
        slot = self._nodes.get(node or LOCAL)
        if slot is None or slot.config is None:
            return self.settings.bind_host
        return slot.config.address

    def _placeable(self: PoolParts) -> list[NodeSlot]:
        """The nodes models may be loaded on, in config order (the local node first)."""
        return [s for s in self._nodes.values() if not s.local or self.settings.local_node]

    def _models_by_node(self: PoolParts) -> dict[str, list[ModelView]]:
        node_of = {m: r.node for m, r in self._records.items()}
        grouped: dict[str, list[ModelView]] = {}
        for view in self._views():
            node = node_of.get(view.model_id)
            if node is not None and view.state in OCCUPYING:
                grouped.setdefault(node, []).append(view)
        return grouped

    def _node_views(self: PoolParts) -> list[placement.NodeView]:
        now = self.clock()
        views = []
        for slot in self._placeable():
            start, end, memory, max_models = self._node_limits(slot)
            taken = {r.port for r in self._records.values() if r.node == slot.name and r.port}
            taken |= {p for (n, p), until in self._avoid.items() if n == slot.name and until > now}
            free = sum(1 for p in range(start, end + 1) if p not in taken)
            labels = frozenset(slot.config.labels) if slot.config else frozenset()
            views.append(placement.NodeView(slot.name, slot.up, labels, memory, max_models, free))
        return views

    def _place(self: PoolParts, rec: Record, need_mb: float) -> placement.Placement:
        others = frozenset(
            r.node
            for r in self._group(rec.entry.model_id)
            if r is not rec and r.node is not None and r.state in OCCUPYING
        )
        want = placement.Want(
            rec.key,
            need_mb,
            rec.entry.nodes,
            rec.entry.labels,
            rec.entry.priority,
            self.clock(),
            self.settings.min_resident_seconds,
            self.settings.resident_load_multiple,
            self.settings.min_idle_seconds,
            self.settings.eviction_order,
            others,
            rec.entry.backend not in IN_PROCESS_BACKENDS,
        )
        return placement.place(
            self._node_views(), self._models_by_node(), want, self.settings.placement
        )

    def _eligible_nodes(self: PoolParts, rec: Record) -> frozenset[str]:
        """The nodes ``rec`` may be placed on, room aside (its pins and labels, up, a port)."""
        want = placement.Want(rec.entry.model_id, 0.0, rec.entry.nodes, rec.entry.labels)
        return frozenset(v.name for v in self._node_views() if placement.eligible(v, want) is None)

    def _any_node_up(self: PoolParts) -> bool:
        return any(s.up for s in self._placeable())

    def any_node_up(self: PoolParts) -> bool:
        """Whether a load could start now on some node."""
        with self._lock:
            return self._any_node_up()

    def _node_answers(self: PoolParts, rec: Record) -> bool:
        """Whether the node of ``rec``'s worker answers (a record without a worker: yes)."""
        slot = self._nodes.get(rec.node or LOCAL)
        return slot is None or slot.up

    # --- what the node monitors report --------------------------------------------------------

    def node_reachable(self: PoolParts, name: str, programs: dict[str, tuple[str, int]]) -> bool:
        """The node answered with ``programs`` (name -> (supervisord state, pid)).

        A node that was DOWN (or not contacted yet) is UP again: workers it lost that still run
        are adopted if their model was not loaded elsewhere meanwhile; the rest are left to the
        orphan sweep. Returns whether the node came back.
        """
        with self._lock:
            slot = self._nodes[name]
            now = self.clock()
            slot.last_seen = now
            if slot.up:
                slot.error = ""
                return False
            slot.up, slot.error, slot.since = True, "", now
            for program, lost in slot.lost.items():
                rec = self._record_for(lost.model_id)  # a replica's key too
                state, pid = programs.get(program, ("", 0))
                if (
                    rec is None
                    or rec.deleting
                    or rec.gen != lost.gen
                    or rec.program != program
                    or rec.state not in (State.COLD, State.FAILED)
                    or rec.chore is not Chore.NONE
                    or state not in ADOPTABLE
                ):
                    continue
                rec.node, rec.port, rec.pid = name, lost.port, pid or None
                rec.fingerprint = lost.fingerprint
                rec.estimate_mb = self._estimate(rec)
                self._new_generation(rec)
                rec.restore_deadline = lost.deadline
                if lost.leases is not None and not rec.leases:
                    rec.leases = leases.restore(lost.leases, now)
                self._chore(rec, ChoreEvent.ADOPTION_STARTED)
                self._apply(rec, Event.LOAD_REQUESTED, "adopt")
                self._start_load(rec, adopt=True)
            slot.lost.clear()
            self._changed.notify_all()
        self.on_change()
        return True

    def node_unreachable(self: PoolParts, name: str, error: str) -> bool:
        """The node did not answer; DOWN once unreachable for ``node_timeout_seconds`` (a node
        never reached is DOWN at once). Returns whether it went DOWN now."""
        with self._lock:
            slot = self._nodes[name]
            slot.error = error
            now = self.clock()
            if not slot.up:
                return False
            if (
                slot.last_seen is not None
                and now - slot.last_seen < self.settings.node_timeout_seconds
            ):
                return False
            slot.up, slot.since = False, now
            for rec in list(self._records.values()):  # _lose may drop a deleted record
                if rec.node == name:
                    self._lose(rec, slot, error)
            self._changed.notify_all()
        self.on_change()
        return True

    def _lose(self: PoolParts, rec: Record, slot: NodeSlot, error: str) -> None:
        """A model whose worker was on a lost node (lock held): FAILED (``node_lost``), with no
        backoff, so the next request loads it on another node; UNLOADING ends COLD."""
        if rec.port is not None and rec.state in (State.WARMING, *SERVING):
            # A worker that was serving (or loading) may be taken back if the node returns;
            # one that was being unloaded or cleaned up is left to the orphan sweep.
            slot.lost[rec.program] = LostWorker(
                rec.key, rec.port, rec.fingerprint, rec.gen, rec.deadline
            )
        rec.last_error = f"node {slot.name} lost: {error}"
        self._chore(rec, ChoreEvent.NODE_LOST)
        rec.retry_at = 0.0
        if rec.state in OCCUPYING:
            self.stats.unloaded(rec.entry.model_id, "node_lost")
            self._apply(rec, Event.NODE_LOST, "node_lost")
        self._forget_process(rec)
        rec.node = None
        rec.reload = False
        if rec.deleting:  # no stop or cleanup will report: it is gone with its node
            self._drop(rec)

    def expect_workers(self: PoolParts, name: str, saved: dict[str, LostWorker]) -> None:
        """Workers the state file says ran on node ``name``: adopted at first contact."""
        with self._lock:
            self._nodes[name].lost.update(saved)

    def nodes_view(self: PoolParts) -> list[dict[str, Any]]:
        """``GET /nodes``: every node with its state, limits, memory and models."""
        with self._lock:
            by_node = self._models_by_node()
            out = []
            for slot in self._nodes.values():
                start, end, memory, max_models = self._node_limits(slot)
                here = by_node.get(slot.name, [])
                used = sum(m.memory_mb for m in here)
                out.append(
                    {
                        "name": slot.name,
                        "state": "UP" if slot.up else "DOWN",
                        "local": slot.local,
                        "placeable": slot.local is False or self.settings.local_node,
                        "url": slot.config.url if slot.config else None,
                        "address": self.address_of(slot.name),
                        "labels": list(slot.config.labels) if slot.config else [],
                        "port_range": {"start": start, "end": end},
                        "memory_used_mb": round(used, 1),
                        "memory_limit_mb": memory,
                        "max_concurrent_models": max_models,
                        "models": sorted(m.model_id for m in here),
                        "since": slot.since or None,
                        "last_seen": slot.last_seen,
                        "last_error": slot.error or None,
                    }
                )
            return out
