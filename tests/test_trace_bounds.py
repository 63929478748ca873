"""The trace benchmark's yardstick: visits, LRU and the clairvoyant optimum on paper."""

from __future__ import annotations

from bench.trace_bounds import lru_loads, optimal_loads, visits
from bench.trace_replay import Event


def test_a_burst_is_one_visit_and_a_return_is_another() -> None:
    trace = [
        Event(0.0, 1, "a"),
        Event(0.2, 1, "a"),  # the same burst
        Event(0.3, 2, "b"),
        Event(0.4, 1, "b"),  # agent 1 moves on
        Event(5.0, 1, "b"),  # and comes back after thinking: a new visit
    ]
    assert visits(trace) == ["a", "b", "b", "b"]


def test_lru_evicts_the_least_recent_and_the_optimum_the_one_needed_latest() -> None:
    seq = ["a", "b", "c", "a", "b", "a", "b"]
    # Two slots. LRU: c drops a, a drops b, b drops c: loads a b c a b.
    assert lru_loads(seq, 2) == 5
    # The optimum: c drops b (needed after a), b then drops c (never needed again): a b c b.
    assert optimal_loads(seq, 2) == 4


def test_the_optimum_never_loads_more_than_lru() -> None:
    seq = list("abcabdabeabfacgab")
    for capacity in (1, 2, 3, 4):
        assert optimal_loads(seq, capacity) <= lru_loads(seq, capacity)
    assert optimal_loads(seq, 7) == lru_loads(seq, 7) == len(set(seq))
