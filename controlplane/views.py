"""The public JSON view of a model's record (``GET /models``), built from a snapshot."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from controlplane.core.states import OCCUPYING, SERVING, State
from controlplane.records import Record

if TYPE_CHECKING:
    from controlplane.pool_replicas import Scaling


def model_view(
    rec: Record, ttl: float, warm: bool, scheduled: bool, host: str, now: float
) -> dict[str, Any]:
    """Every field ``GET /models`` shows for one model (``ttl`` in minutes, 0 = never)."""
    loaded = rec.state in SERVING
    if not loaded:
        remaining = None
    elif rec.state is State.COOLING and rec.grace_until is not None:
        remaining = 0.0
    elif rec.deadline is None:
        remaining = 0.0  # never expires (the seed shows 0 for warmup models)
    else:
        remaining = max(0.0, (rec.deadline - now) / 60.0)
    return {
        "model_id": rec.entry.model_id,
        "display_name": rec.entry.display_name or rec.entry.model_id,
        "model_type": rec.entry.model_type,
        "backend": rec.entry.backend,
        "state": rec.state.value,
        "state_since": rec.since or None,
        "node": rec.node if rec.state in OCCUPYING else None,
        "port": rec.port,
        "endpoint": f"http://{host}:{rec.port}" if rec.port and loaded else None,
        "program": rec.program,
        "pid": rec.pid if rec.state in OCCUPYING else None,
        "ttl_minutes": ttl,
        "expires": ttl != 0,
        "ttl_remaining_minutes": None if remaining is None else round(remaining, 3),
        "deadline": rec.deadline if loaded else None,
        "grace_until": rec.grace_until if rec.state is State.COOLING else None,
        "warmup": warm,
        "schedule": [w.describe() for w in rec.windows],
        "scheduled_now": scheduled,
        "memory_mb": round(rec.memory(), 1) if rec.state in OCCUPYING else 0.0,
        "memory_source": "measured" if rec.measured_mb is not None else "estimate",
        "requests": rec.requests,
        "in_flight": rec.total_in_flight,
        "leases": leases_view(rec),
        "loaded_at": rec.loaded_at if loaded else None,
        "last_used": rec.last_used or None,
        "last_error": rec.last_error,
        "failures": rec.failures,
        "retry_after_seconds": round(rec.retry_at - now, 1)
        if rec.state is State.FAILED and now < rec.retry_at < math.inf
        else None,
        # False: the last failure was permanent (bad file, unknown model); only a load call
        # or a new registry entry tries again.
        "retryable": rec.retry_at != math.inf,
        "priority": rec.entry.priority,
        "tags": list(rec.entry.tags),
    }


def leases_view(rec: Record) -> list[dict[str, Any]]:
    return [lease.view() for lease in sorted(rec.leases.values(), key=lambda x: x.created_at)]


def replicas_view(
    group: list[Record],
    hosts: Mapping[str, str],
    bounds: tuple[int, int],
    scaling: Scaling | None,
) -> dict[str, Any]:
    """A model's replicas for ``GET /models``: each one, and the model's counts summed over
    them (``group``: its replicas, first one first)."""
    low, high = bounds
    loaded = [r for r in group if r.state in OCCUPYING]
    return {
        "requests": sum(r.requests for r in group),
        "in_flight": sum(r.total_in_flight for r in group),
        "memory_mb": round(sum(r.memory() for r in loaded), 1),
        "replicas": [
            {
                "replica": r.replica,
                "key": r.key,
                "state": r.state.value,
                "node": r.node if r.state in OCCUPYING else None,
                "port": r.port,
                "endpoint": f"http://{hosts[r.key]}:{r.port}"
                if r.port and r.state in SERVING
                else None,
                "pid": r.pid if r.state in OCCUPYING else None,
                "program": r.program,
                "in_flight": r.total_in_flight,
                "requests": r.requests,
                "memory_mb": round(r.memory(), 1) if r.state in OCCUPYING else 0.0,
                "last_used": r.last_used or None,
                "last_error": r.last_error,
            }
            for r in group
            if r.replica == 1 or r.state is not State.COLD
        ],
        "replica_counts": {
            "serving": sum(1 for r in group if r.state in SERVING),
            "loaded": len(loaded),
            "min": low,
            "max": high,
            "pinned": None if scaling is None else scaling.pinned,
            "blocked": None if scaling is None or not scaling.blocked else scaling.blocked,
        },
    }
