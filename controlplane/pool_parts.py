"""What each part of ``ModelPool`` may use of the rest: one structural type for the mixins.

``ModelPool`` is one object (one lock, one writer) whose methods live in modules by concept:
``pool.py`` (the records, ``_apply`` and the workers' reports), ``pool_admission.py`` (loads and
requests), ``pool_unload.py`` (unloads, stops, cleanups), ``pool_ttl.py``, ``pool_registry.py``
(entries, settings, adoption, the state file), ``pool_nodes.py`` and ``pool_leases.py``. Each
mixin's methods take ``self: PoolParts``; ``ModelPool`` satisfies it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from controlplane.core import placement, policy
from controlplane.core.chores import ChoreEvent
from controlplane.core.states import Event, State
from controlplane.errors import NoCapacity
from controlplane.records import Lifecycle, Record
from controlplane.settings import Settings
from controlplane.stats import PoolStats

if TYPE_CHECKING:
    from controlplane.pool_nodes import NodeSlot


class Ticket:
    """A caller's place in the queue for room (FIFO), until a time (``time.monotonic``)."""

    __slots__ = ("until",)

    def __init__(self, until: float) -> None:
        self.until = until


class PoolParts(Protocol):
    settings: Settings
    clock: Callable[[], float]
    stats: PoolStats
    lifecycle: Lifecycle
    listeners: list[Callable[[Record, State, State], None]]
    on_change: Callable[[], None]
    is_port_free: Callable[[int], bool]
    file_mb: Callable[[str], float | None]
    fingerprint_for: Callable[[Record], str]
    draining: bool
    max_waiting_total: int
    _lock: threading.Lock
    _changed: threading.Condition
    _records: dict[str, Record]
    _order: list[str]
    _nodes: dict[str, NodeSlot]
    _avoid: dict[tuple[str, int], float]
    _scheduled: set[str]
    _version: int
    _saved: int
    _moved: int
    _moved_saved: int
    _waiting: int
    _held: int
    _generations: int
    _room_queue: list[Ticket]

    # pool.py
    def _get(self, model_id: str) -> Record: ...
    def _apply(self, rec: Record, event: Event, reason: str) -> State: ...
    def _chore(self, rec: Record, event: ChoreEvent) -> None: ...
    def _count(self, rec: Record, n: int = 1) -> None: ...
    def _views(self) -> list[policy.ModelView]: ...
    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool: ...

    # pool_ttl.py
    def _warmups(self) -> tuple[str, ...]: ...
    def _kept(self) -> set[str]: ...
    def _bounds(self) -> policy.TtlBounds: ...
    def _refit_deadlines(self) -> None: ...
    def ttl_minutes(self, rec: Record) -> float: ...
    def touch(self, rec: Record, at: float) -> None: ...

    # pool_admission.py
    def ensure_loaded(
        self,
        model_id: str,
        timeout: float | None = None,
        *,
        manual: bool = False,
        wait: bool = True,
        queue: bool = True,
    ) -> Record: ...
    def begin_request(self, model_id: str, timeout: float | None = None) -> Record: ...
    def release(self, model_id: str, gen: int, thread: bool = True) -> None: ...
    def _ensure(
        self,
        model_id: str,
        timeout: float | None,
        *,
        manual: bool,
        wait: bool,
        hold: bool,
        queue: bool = True,
    ) -> Record: ...
    def _enqueue(self, rec: Record) -> None: ...
    def _check_threads(self, rec: Record) -> None: ...
    def _dequeue(self, rec: Record) -> None: ...
    def _wait_for_room(
        self, ticket: Ticket | None, refusal: NoCapacity | None, wait: bool, began: float
    ) -> Ticket: ...
    def _leave_room_queue(self, ticket: Ticket) -> None: ...
    def _try_start(self, rec: Record, manual: bool) -> int | None: ...
    def _new_generation(self, rec: Record) -> None: ...
    def _start_load(self, rec: Record, adopt: bool) -> None: ...
    def _estimate(self, rec: Record) -> float: ...
    def _choose_port(self, rec: Record) -> int: ...

    # pool_unload.py
    def _begin_unload(
        self, rec: Record, event: Event, reason: str, force: bool = False
    ) -> None: ...
    def _start_stop(self, rec: Record, force: bool) -> None: ...
    def _start_cleanup(self, rec: Record) -> None: ...
    def _forget_process(self, rec: Record) -> None: ...
    def _reload(self, rec: Record) -> None: ...

    # pool_registry.py
    def _drop(self, rec: Record) -> None: ...

    # pool_nodes.py
    def _node_limits(self, slot: NodeSlot) -> tuple[int, int, float, int]: ...
    def _placeable(self) -> list[NodeSlot]: ...
    def _models_by_node(self) -> dict[str, list[policy.ModelView]]: ...
    def _node_views(self) -> list[placement.NodeView]: ...
    def _place(self, rec: Record, need_mb: float) -> placement.Placement: ...
    def _any_node_up(self) -> bool: ...
    def _node_answers(self, rec: Record) -> bool: ...
    def _lose(self, rec: Record, slot: NodeSlot, error: str) -> None: ...
    def address_of(self, node: str | None) -> str: ...

    # pool_leases.py
    def _lapse_leases(self, now: float) -> None: ...
