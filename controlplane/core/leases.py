"""Leases: an agent holds a model for the length of a task (pure; the pool keeps them).

While a model has a live lease it neither expires nor is evicted; a lease that is not renewed
lapses at its ``expires_at``, so a crashed agent cannot pin a model for ever. When the last
lease of a model ends or lapses, the model's TTL runs from that moment.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Final

#: The longest a lease may run before it must be renewed.
MAX_SECONDS: Final = 24 * 3600.0
#: A shorter lease would lapse before its holder could renew it.
MIN_SECONDS: Final = 5.0
MAX_HOLDER: Final = 200


@dataclass(frozen=True)
class Lease:
    lease_id: str
    holder: str
    created_at: float
    expires_at: float

    def view(self) -> dict[str, Any]:
        return asdict(self)


def check_seconds(value: Any) -> float:
    """A lease length from a request; ValueError says what is wrong."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"seconds: {value!r} is not a number")
    if not MIN_SECONDS <= value <= MAX_SECONDS:
        raise ValueError(
            f"seconds: {value!r} is out of range (expected {MIN_SECONDS:g} <= seconds <= "
            f"{MAX_SECONDS:g})"
        )
    return float(value)


def check_holder(value: Any) -> str:
    """Who holds the lease (free text for people reading /models); ValueError if not text."""
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > MAX_HOLDER:
        raise ValueError(f"holder: {value!r} is not a string of at most {MAX_HOLDER} characters")
    return value


def lapse(leases: Mapping[str, Lease], now: float) -> tuple[dict[str, Lease], float | None]:
    """(the leases still live at ``now``, when the last lapsed one expired or None)."""
    live = {k: v for k, v in leases.items() if v.expires_at > now}
    gone = [v.expires_at for k, v in leases.items() if k not in live]
    return live, (max(gone) if gone else None)


def restore(raw: Any, now: float) -> dict[str, Lease]:
    """Leases saved in the state file, those still live at ``now`` (bad entries are dropped)."""
    out: dict[str, Lease] = {}
    if not isinstance(raw, list):
        return out
    for item in raw:
        try:
            lease = Lease(
                str(item["lease_id"]),
                str(item.get("holder", "")),
                float(item["created_at"]),
                float(item["expires_at"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            continue
        if lease.expires_at > now:
            out[lease.lease_id] = lease
    return out
