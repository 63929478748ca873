"""Which loaded model makes room for another: priority first, then what an eviction costs.

Rules (pure; the pool applies the result):

- A model is never evicted to make room for a model of lower ``priority``; ``critical`` models
  are never evicted at all (they still expire by TTL unless warmup). Warmup models and models
  with a request in flight (or a lease) are never evicted either.
- A model is resident (not evicted for another load) for ``resident_load_multiple`` times its
  measured load time, at most ``min_resident_seconds``: two models taking turns over one slot
  cannot evict each other on every request, and waiting for room never costs more than a share
  of the reload it avoids (the ski-rental rule: keep paying rent while it adds up to less than
  the price of buying). ``resident_load_multiple`` 0 makes every model resident for
  ``min_resident_seconds``.
- Nor is a model evicted within ``min_idle_seconds`` of its last request's start or end: the
  next request of an agent's burst is on its way.
- A cheaper model held only by these guards is waited for rather than a dearer one evicted, if
  its guard ends sooner than the dearer one would take to load again (``policy.plan_capacity``;
  without this, the model an agent just loaded and used once stayed, guarded, while the most
  popular one, idle for a moment, went).
- Among the models that may go, the lowest priority goes first; among equals, the one whose
  eviction costs least. The cost is the reload time the pool expects to pay per second the
  model is away::

      cost = load_seconds * rate

  ``load_seconds`` is the model's measured load time (a moving average) and ``rate`` its recent
  visit rate (visits per second, decayed over ``RATE_TAU_SECONDS``). Requests count at most
  once per ``VISIT_GAP_SECONDS``: an agent's burst of requests would cost one reload, not one
  per request, so it counts once (counting requests made a model that one agent asked ten
  things in a row look busier than one that five agents come back to), while a model in
  constant use counts as visited every ``VISIT_GAP_SECONDS``, however long its requests take.
  A slow-to-load model in use keeps its place; a fast or idle one goes; of two that load equally
  fast, the one visited less often goes (GreedyDual-Size-Frequency with
  every model the same size: a slot is a slot). Ties: least recently used, then the model id.
"""

from __future__ import annotations

import math
from typing import Final, Protocol, TypeVar

PRIORITIES: Final = ("low", "normal", "medium", "high", "critical")
RANK: Final = {p: i for i, p in enumerate(PRIORITIES)}
#: Time constant of the request-rate average (seconds).
RATE_TAU_SECONDS: Final = 300.0
#: Requests within this many seconds of the last counted one are part of its visit.
VISIT_GAP_SECONDS: Final = 2.0
#: Weight of the newest load time in the moving average.
LOAD_ALPHA: Final = 0.5
#: The load time assumed for a model never loaded yet (seconds).
DEFAULT_LOAD_SECONDS: Final = 5.0


class Candidate(Protocol):
    """What the rules read of a loaded model (``policy.ModelView`` has it)."""

    @property
    def model_id(self) -> str: ...
    @property
    def priority(self) -> str: ...
    @property
    def loaded_at(self) -> float | None: ...
    @property
    def load_seconds(self) -> float | None: ...
    @property
    def rate(self) -> float: ...
    @property
    def last_used(self) -> float: ...


def rank(priority: str) -> int:
    return RANK.get(priority, RANK["normal"])


def load_of(m: Candidate) -> float:
    """``m``'s load time (seconds): measured, else the default."""
    return DEFAULT_LOAD_SECONDS if m.load_seconds is None else m.load_seconds


def cost(m: Candidate) -> float:
    """The reload time (seconds) expected to be paid per second ``m`` is away if evicted now.

    Not the chance of one more request within some horizon (``1 - exp(-rate * horizon)``, the
    first version): for any model used in the last minutes that is close to 1, so the cost was
    the load time alone and the most popular model went first if it loaded fastest.
    """
    return load_of(m) * max(0.0, m.rate)


def cheaper(a: Candidate, b: Candidate) -> bool:
    """Whether evicting ``a`` comes before evicting ``b`` (lower priority, else lower cost)."""
    return (rank(a.priority), cost(a)) < (rank(b.priority), cost(b))


def may_evict_for(m: Candidate, priority: str) -> bool:
    """Whether ``m`` may make room for a model of ``priority`` (priority rules only)."""
    return m.priority != "critical" and rank(m.priority) <= rank(priority)


def residency(m: Candidate, min_resident_seconds: float, load_multiple: float = 0.0) -> float:
    """How long (seconds) ``m`` stays resident after its load: ``load_multiple`` times its
    load time, at most ``min_resident_seconds`` (``load_multiple`` 0: that alone)."""
    if load_multiple <= 0:
        return min_resident_seconds
    return min(min_resident_seconds, load_multiple * load_of(m))


def resident_until(
    m: Candidate,
    min_resident_seconds: float,
    load_multiple: float = 0.0,
    min_idle_seconds: float = 0.0,
) -> float:
    """When ``m`` may first be evicted for another load: after its residency, and once it has
    been idle (no request begun or ended) for ``min_idle_seconds``."""
    loaded = (m.loaded_at or 0.0) + residency(m, min_resident_seconds, load_multiple)
    return max(loaded, m.last_used + min_idle_seconds) if min_idle_seconds > 0 else loaded


M = TypeVar("M", bound=Candidate)


ORDERS: Final = ("cost", "lru")


def order(models: list[M], how: str = "cost") -> list[M]:
    """Models in the order they should make room: lowest priority, cheapest, least recent
    (``cost``, the default); or least recently used alone (``lru``, plain LRU for comparison)."""
    if how == "lru":
        return sorted(models, key=lambda m: (m.last_used, m.model_id))
    return sorted(models, key=lambda m: (rank(m.priority), cost(m), m.last_used, m.model_id))


def decayed_rate(rate: float, since: float | None, now: float) -> float:
    """``rate`` as measured at ``since`` (None: never measured), decayed to ``now``."""
    if since is None:
        return rate
    return rate * math.exp(-max(0.0, now - since) / RATE_TAU_SECONDS)


def new_visit(counted_at: float | None, now: float) -> bool:
    """Whether a request at ``now`` counts as a new visit (the last counted one was at
    ``counted_at``; None: never)."""
    return counted_at is None or now - counted_at >= VISIT_GAP_SECONDS


def count_request(rate: float, since: float | None, now: float, n: int = 1) -> float:
    """The rate after ``n`` events at ``now`` (an exponentially decayed event rate)."""
    return decayed_rate(rate, since, now) + n / RATE_TAU_SECONDS


def average_load(previous: float | None, measured: float) -> float:
    """The moving average of a model's load time with a new measurement."""
    if previous is None:
        return measured
    return LOAD_ALPHA * measured + (1 - LOAD_ALPHA) * previous
