"""Port allocation for model workers (pure; whether a port is taken is passed in)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PortRequest:
    """What the allocator needs to know about the registry."""

    model_id: str
    #: A port the registry entry pins, if any.
    pinned: int | None
    #: Warmup model ids in registry order (they own start, start+1, ... unless pinned).
    warmup_order: Sequence[str]
    #: Ports pinned by any registry entry (kept for their owners).
    pinned_by_others: Collection[int]


class PortUnavailableError(Exception):
    """No port can be given (range exhausted, or a pinned port is held by someone else)."""


def warmup_ports(
    warmup_order: Sequence[str], pinned: Collection[int], start: int
) -> dict[str, int]:
    """Reserved ports of warmup models: registry order from ``start``, skipping pinned ports."""
    reserved: dict[str, int] = {}
    port = start
    for model_id in warmup_order:
        while port in pinned:
            port += 1
        reserved[model_id] = port
        port += 1
    return reserved


def choose_port(
    req: PortRequest,
    start: int,
    end: int,
    in_use: Collection[int],
    is_free: Callable[[int], bool],
    warmup_pins: dict[str, int] | None = None,
) -> int:
    """The port for ``req.model_id``.

    Order: the entry's pinned port; else a warmup model's reserved port; else the lowest port
    that is neither used by a worker, pinned or reserved for another model, nor held by a
    foreign process (``is_free``). A reserved port held by a foreign process is skipped, never
    fought over; if every other port is taken, reserved ports of absent models are used last.
    """
    if req.pinned is not None:
        if req.pinned in in_use or not is_free(req.pinned):
            raise PortUnavailableError(
                f"port {req.pinned} pinned for {req.model_id} is held by another process"
            )
        return req.pinned
    reserved = (
        warmup_pins
        if warmup_pins is not None
        else warmup_ports(req.warmup_order, req.pinned_by_others, start)
    )
    own = reserved.get(req.model_id)
    if own is not None and start <= own <= end and own not in in_use and is_free(own):
        return own
    others_reserved = {p for m, p in reserved.items() if m != req.model_id}
    blocked = set(in_use) | set(req.pinned_by_others)
    for avoid in (others_reserved, set()):
        for port in range(start, end + 1):
            if port in blocked or port in avoid:
                continue
            if is_free(port):
                return port
    raise PortUnavailableError(f"no free port in {start}-{end}")
