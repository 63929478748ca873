"""What a trace allows on paper: its loads under LRU and under the clairvoyant optimum.

Both replay the trace's visits one at a time (a visit: an agent's burst of requests to one
model) into ``capacity`` slots. The optimum (Belady's: evict the model asked for again latest)
knows the future, so no policy loads less on that sequence; the gap between the two is the
most any eviction order can save. A live replay differs (visits overlap, a model in use cannot
be evicted, a request may wait for room), so the figures are a yardstick, not a prediction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Request(Protocol):
    @property
    def at(self) -> float: ...
    @property
    def agent(self) -> int: ...
    @property
    def model(self) -> str: ...


def visits(trace: Sequence[Request], gap: float = 0.2) -> list[str]:
    """The models of the trace's visits in time order: an agent's request to the model of its
    previous one, ``gap`` seconds after it, continues that visit."""
    out: list[str] = []
    last: dict[int, Request] = {}
    for r in sorted(trace, key=lambda r: r.at):
        prev = last.get(r.agent)
        if prev is None or prev.model != r.model or abs(r.at - prev.at - gap) > 1e-6:
            out.append(r.model)
        last[r.agent] = r
    return out


def lru_loads(models: Sequence[str], capacity: int) -> int:
    loaded: list[str] = []  # least recently used first
    loads = 0
    for m in models:
        if m in loaded:
            loaded.remove(m)
        else:
            loads += 1
            if len(loaded) >= capacity:
                loaded.pop(0)
        loaded.append(m)
    return loads


def optimal_loads(models: Sequence[str], capacity: int) -> int:
    """Belady's optimum: on a miss with no room, evict the model whose next visit is latest."""
    loaded: set[str] = set()
    loads = 0
    for i, m in enumerate(models):
        if m in loaded:
            continue
        loads += 1
        if len(loaded) >= capacity:
            rest = models[i + 1 :]
            loaded.remove(max(loaded, key=lambda x: rest.index(x) if x in rest else len(rest)))
        loaded.add(m)
    return loads
