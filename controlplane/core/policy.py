"""Pure decisions about time and capacity: TTLs, expiry, eviction, retry backoff.

Every function takes snapshots and a time and returns data; the pool applies the result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from controlplane.core import eviction
from controlplane.core.states import OCCUPYING, Event, State

MINUTE: Final = 60.0
BACKOFF_BASE_SECONDS: Final = 10.0
BACKOFF_MAX_SECONDS: Final = 300.0


@dataclass(frozen=True)
class TtlBounds:
    """The TTL settings that every TTL computation needs."""

    default_minutes: float
    min_minutes: float
    max_minutes: float
    grace_minutes: float


def effective_ttl_minutes(ttl_minutes: float | None, warmup: bool, bounds: TtlBounds) -> float:
    """A model's TTL in minutes: 0 means it never expires.

    Warmup models never expire. An explicit 0 means "never"; any other value (or the default
    when the entry has none) is clamped to ``min..max``.
    """
    if warmup:
        return 0.0
    ttl = bounds.default_minutes if ttl_minutes is None else ttl_minutes
    if ttl == 0:
        return 0.0
    return min(max(ttl, bounds.min_minutes), bounds.max_minutes)


def deadline_after(now: float, ttl_minutes: float) -> float | None:
    """The deadline that a request at ``now`` sets; None for a model that never expires."""
    return None if ttl_minutes == 0 else now + ttl_minutes * MINUTE


@dataclass(frozen=True)
class Extension:
    """The outcome of an ``extend-ttl`` call."""

    deadline: float
    clamped: bool


def extend(deadline: float | None, now: float, minutes: float, bounds: TtlBounds) -> Extension:
    """``max(deadline, now) + minutes``, capped at ``now + max TTL``."""
    wanted = max(deadline if deadline is not None else now, now) + minutes * MINUTE
    cap = now + bounds.max_minutes * MINUTE
    return Extension(deadline=min(wanted, cap), clamped=wanted > cap)


@dataclass(frozen=True)
class ModelView:
    """What policy needs to know about one model, copied out of the pool under its lock."""

    model_id: str
    state: State
    warmup: bool
    in_flight: int = 0
    deadline: float | None = None
    grace_until: float | None = None
    last_used: float = 0.0
    memory_mb: float = 0.0
    priority: str = "normal"
    #: When it became HOT (None: not loaded).
    loaded_at: float | None = None
    #: Its measured load time, a moving average (None: never measured).
    load_seconds: float | None = None
    #: Its recent request rate, requests per second (``core.eviction``).
    rate: float = 0.0


def due_events(models: Iterable[ModelView], now: float) -> list[tuple[str, Event]]:
    """The TTL events that are due at ``now``: HOT past its deadline, COOLING past its grace.

    A model with a request in flight is never expired.
    """
    due: list[tuple[str, Event]] = []
    for m in models:
        if m.in_flight > 0:
            continue
        if m.state is State.HOT and m.deadline is not None and now >= m.deadline:
            due.append((m.model_id, Event.TTL_EXPIRED))
        elif m.state is State.COOLING and m.grace_until is not None and now >= m.grace_until:
            due.append((m.model_id, Event.GRACE_EXPIRED))
    return due


def next_wakeup(models: Iterable[ModelView]) -> float | None:
    """The earliest time at which ``due_events`` could return something new.

    Models with a request in flight are left out: they are not due until it ends, and the end
    of a request wakes the reaper anyway.
    """
    times = [
        t
        for m in models
        if m.in_flight == 0
        for t in (
            m.deadline if m.state is State.HOT else None,
            m.grace_until if m.state is State.COOLING else None,
        )
        if t is not None
    ]
    return min(times, default=None)


@dataclass(frozen=True)
class CapacityPlan:
    """What must happen before a model can load.

    ``ok``: it may start now. Otherwise, if ``evict`` or ``wait`` is set, the caller evicts those
    models and/or waits for models already UNLOADING, then plans again. If neither is set, there
    is no way to make room (HTTP 503).
    """

    ok: bool
    evict: tuple[str, ...] = ()
    wait: bool = False
    reason: str = ""
    #: When room could be made, if only models still inside their ``min_resident_seconds``
    #: stand in the way (the time to tell a client in Retry-After).
    room_at: float | None = None
    #: Room may free up by waiting: the model would fit beside the warmup models alone (every
    #: other model expires, is unloaded or lets go of its lease in time). False: it never fits.
    waitable: bool = False


def plan_capacity(
    models: Sequence[ModelView],
    candidate: str,
    need_mb: float,
    max_models: int,
    memory_limit_mb: float,
    *,
    priority: str = "normal",
    now: float | None = None,
    min_resident_seconds: float = 0.0,
    resident_load_multiple: float = 0.0,
    min_idle_seconds: float = 0.0,
    order: str = "cost",
) -> CapacityPlan:
    """Decide whether ``candidate`` (of ``priority``) fits, and which idle models to evict if
    not, in ``core.eviction``'s order.

    Models in UNLOADING still hold their memory and port until they stop, so they count
    against the limits; the caller waits for them rather than overshooting.
    Evictable: HOT or COOLING, not warmup, nothing in flight, not of a higher priority (nor
    critical), and (with ``now``) past its residency (``eviction.residency``).
    """

    def resident_until(m: ModelView) -> float:
        return eviction.resident_until(
            m, min_resident_seconds, resident_load_multiple, min_idle_seconds
        )

    occupying = [m for m in models if m.state in OCCUPYING and m.model_id != candidate]
    unloading = [m for m in occupying if m.state is State.UNLOADING]
    settled = [m for m in occupying if m.state is not State.UNLOADING]
    idle = [
        m
        for m in settled
        if m.state in (State.HOT, State.COOLING)
        and not m.warmup
        and m.in_flight == 0
        and eviction.may_evict_for(m, priority)
    ]
    evictable = [m for m in eviction.order(idle, order) if now is None or now >= resident_until(m)]
    limit_mem = memory_limit_mb > 0

    def fits(kept: Sequence[ModelView], pending: Sequence[ModelView]) -> bool:
        count = len(kept) + len(pending) + 1
        mem = sum(m.memory_mb for m in kept) + sum(m.memory_mb for m in pending) + need_mb
        return count <= max_models and (not limit_mem or mem <= memory_limit_mb)

    if limit_mem and need_mb > memory_limit_mb:
        return CapacityPlan(
            ok=False,
            reason=f"model needs {need_mb:.0f} MB, more than memory_limit_mb {memory_limit_mb:.0f}",
        )
    if fits(settled, unloading):
        return CapacityPlan(ok=True)
    # Would the room exist once the models already unloading have stopped?
    kept = list(settled)
    evict: list[str] = []
    for victim in evictable:
        if fits(kept, ()):
            break
        kept.remove(victim)
        evict.append(victim.model_id)
    if fits(kept, ()):
        if order == "cost" and now is not None:
            victims = [m for m in settled if m.model_id in evict]
            guarded = [m for m in idle if m not in evictable]
            later = _cheaper_soon(victims, guarded, resident_until, now, limit_mem)
            if later is not None:
                return later
        return CapacityPlan(ok=False, evict=tuple(evict), wait=True)
    # Would it fit once the models still resident may go?
    room_at = None
    if now is not None and len(idle) > len(evictable):
        kept = list(settled)
        for victim in sorted(idle, key=resident_until):
            kept.remove(victim)
            if fits(kept, ()):
                room_at = resident_until(victim)
                break
    busy = len(settled) - len(idle)
    resident = len(idle) - len(evictable)
    return CapacityPlan(
        ok=False,
        waitable=fits([m for m in settled if m.warmup], ()),
        reason=(
            f"no capacity: {len(occupying)} of max_concurrent_models {max_models} loaded, "
            f"{busy} busy, warmup or of higher priority"
            + (f", {resident} still resident (min_resident_seconds)" if resident else "")
            + f", memory {sum(m.memory_mb for m in occupying):.0f}"
            f" of memory_limit_mb {memory_limit_mb:.0f}"
        ),
        room_at=room_at,
    )


def _cheaper_soon(
    victims: Sequence[ModelView],
    guarded: Sequence[ModelView],
    resident_until: Callable[[ModelView], float],
    now: float,
    limit_mem: bool,
) -> CapacityPlan | None:
    """A plan to wait for a cheaper model held only by its residency or idle guard, if that
    guard ends sooner than a chosen victim would take to load again (ski rental: wait while it
    costs less than buying); None: evict the victims now."""
    for victim in victims:
        for m in sorted(guarded, key=resident_until):
            soon = resident_until(m) - now <= eviction.load_of(victim)
            frees = not limit_mem or m.memory_mb >= victim.memory_mb
            if soon and frees and eviction.cheaper(m, victim):
                return CapacityPlan(
                    ok=False,
                    waitable=True,
                    room_at=resident_until(m),
                    reason=f"no capacity yet: {m.model_id!r} may go in "
                    f"{resident_until(m) - now:.1f} s, cheaper to reload than {victim.model_id!r}",
                )
    return None


#: What a llama.cpp worker costs beyond its GGUF file (Python, gunicorn, Flask, llama.cpp's
#: context and buffers): about 80 MiB measured for a small model (docs/BENCHMARKS.md).
WORKER_OVERHEAD_MB: Final = 100.0


def estimate_mb(memory_mb: float | None, file_mb: float | None, default_mb: float) -> float:
    """A model's memory before it is measured: the entry's ``memory_mb``, else its model file
    plus a worker's overhead (in-process backends), else the configured default."""
    if memory_mb is not None:
        return memory_mb
    if file_mb is not None:
        return file_mb + WORKER_OVERHEAD_MB
    return default_mb


def evict_over_limit(
    models: Sequence[ModelView], memory_limit_mb: float, order: str = "cost"
) -> tuple[str, ...]:
    """Idle models to unload (``core.eviction``'s order) while the memory in use is over the
    limit.

    Models already UNLOADING are on their way out and do not count; warmup and critical models
    and models with a request in flight are never chosen. Returns () when within the limit (or
    none).
    """
    if memory_limit_mb <= 0:
        return ()
    settled = [m for m in models if m.state in OCCUPYING and m.state is not State.UNLOADING]
    total = sum(m.memory_mb for m in settled)
    victims: list[str] = []
    for m in eviction.order(settled, order):
        if total <= memory_limit_mb:
            break
        if (
            m.state in (State.HOT, State.COOLING)
            and not m.warmup
            and m.in_flight == 0
            and m.priority != "critical"
        ):
            victims.append(m.model_id)
            total -= m.memory_mb
    return tuple(victims)


def retry_not_before(failures: int, failed_at: float) -> float:
    """When a model that failed ``failures`` times in a row may be loaded again automatically.

    The cooldown doubles from BACKOFF_BASE_SECONDS after the first failure up to
    BACKOFF_MAX_SECONDS (a ``load`` call does not wait for it).
    """
    if failures <= 0:
        return failed_at
    delay = BACKOFF_BASE_SECONDS * 2.0 ** (failures - 1)
    return failed_at + min(delay, BACKOFF_MAX_SECONDS)
