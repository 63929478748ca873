"""Lifecycle statistics kept by the pool as plain data, exported by the metrics collector.

No Prometheus objects here: the pool only counts, and ``api/metrics.py`` turns these numbers
into metric families when Prometheus scrapes.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Final

#: Seconds: a worker boots in a fraction of a second; a large model can take minutes.
LOAD_BUCKETS: Final = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

#: The closed lists of reasons (labels never come from unbounded input).
LOAD_FAILURE_REASONS: Final = ("timeout", "backend_error", "exited", "start_error", "supervisord")
UNLOAD_REASONS: Final = (
    "ttl",
    "manual",
    "eviction",
    "crash",
    "shutdown",
    "deleted",
    "node_lost",
    "operator",
    "config_changed",
    "memory",
    "cancelled",
    "scale_down",
)
#: Directions of a change in a model's replica count.
SCALE_DIRECTIONS: Final = ("up", "down")


@dataclass
class Histogram:
    """Cumulative-bucket histogram data (as Prometheus exposes it)."""

    buckets: tuple[float, ...] = LOAD_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        for j in range(i, len(self.counts)):
            self.counts[j] += 1
        self.total += value
        self.n += 1

    def cumulative(self) -> list[tuple[str, float]]:
        """(le, count) pairs including +Inf."""
        pairs = [(repr(float(b)), float(c)) for b, c in zip(self.buckets, self.counts, strict=True)]
        return [*pairs, ("+Inf", float(self.n))]


class PoolStats:
    """Counters and histograms per model (thread safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.loads: dict[str, int] = defaultdict(int)
        self.load_failures: dict[tuple[str, str], int] = defaultdict(int)
        self.unloads: dict[tuple[str, str], int] = defaultdict(int)
        self.capacity_refusals: dict[str, int] = defaultdict(int)
        #: Times Ollama was found without a model the pool has HOT (and it was pinned again).
        self.drift: dict[str, int] = defaultdict(int)
        self.load_duration: dict[str, Histogram] = defaultdict(Histogram)
        self.load_wait: dict[str, Histogram] = defaultdict(Histogram)
        #: Replicas added or drained by scaling, by (model, direction).
        self.scale_events: dict[tuple[str, str], int] = defaultdict(int)

    def loaded(self, model: str, seconds: float) -> None:
        with self._lock:
            self.loads[model] += 1
            self.load_duration[model].observe(seconds)

    def load_failed(self, model: str, reason: str) -> None:
        reason = reason if reason in LOAD_FAILURE_REASONS else "start_error"
        with self._lock:
            self.load_failures[(model, reason)] += 1

    def unloaded(self, model: str, reason: str) -> None:
        reason = reason if reason in UNLOAD_REASONS else "manual"
        with self._lock:
            self.unloads[(model, reason)] += 1

    def scaled(self, model: str, direction: str) -> None:
        with self._lock:
            self.scale_events[(model, direction)] += 1

    def refused(self, model: str) -> None:
        with self._lock:
            self.capacity_refusals[model] += 1

    def drifted(self, model: str) -> None:
        with self._lock:
            self.drift[model] += 1

    def waited(self, model: str, seconds: float) -> None:
        with self._lock:
            self.load_wait[model].observe(seconds)

    def snapshot(self) -> PoolStats:
        """A consistent copy for one scrape."""
        copy = PoolStats()
        with self._lock:
            copy.loads.update(self.loads)
            copy.load_failures.update(self.load_failures)
            copy.unloads.update(self.unloads)
            copy.capacity_refusals.update(self.capacity_refusals)
            copy.drift.update(self.drift)
            copy.scale_events.update(self.scale_events)
            for src, dst in (
                (self.load_duration, copy.load_duration),
                (self.load_wait, copy.load_wait),
            ):
                for k, h in src.items():
                    dst[k] = Histogram(h.buckets, list(h.counts), h.total, h.n)
        return copy
