"""Replicas, pure: which replica serves a request, and when a model gains or drains one."""

from __future__ import annotations

import pytest

from controlplane.core.replicas import (
    Decision,
    Direction,
    Limits,
    ReplicaView,
    busy_since,
    decide,
    load_per_replica,
    pick,
)
from controlplane.core.states import State

HOT, WARMING, COOLING, UNLOADING = State.HOT, State.WARMING, State.COOLING, State.UNLOADING


def r(rid: str, state: State = HOT, in_flight: int = 0, **kw: object) -> ReplicaView:
    return ReplicaView(rid, state, in_flight, **kw)  # type: ignore[arg-type]


# --- balancing ---------------------------------------------------------------------------------


def test_the_replica_with_fewest_in_flight_serves() -> None:
    chosen, _ = pick([r("a", in_flight=3), r("b", in_flight=1), r("c", in_flight=2)], 0)
    assert chosen is not None and chosen.replica_id == "b"


def test_busy_ties_go_round_robin() -> None:
    replicas = [r("b", in_flight=1), r("a", in_flight=1), r("c", in_flight=2)]
    turn, seen = 0, []
    for _ in range(4):
        chosen, turn = pick(replicas, turn)
        assert chosen is not None
        seen.append(chosen.replica_id)
    assert seen == ["a", "b", "a", "b"]  # c is busier; a and b take turns


def test_idle_ties_go_to_the_first_replica_so_spare_ones_go_idle() -> None:
    replicas = [r("m"), r("m#3"), r("m#2")]
    picks = [pick(replicas, turn)[0] for turn in range(3)]
    assert [p.replica_id for p in picks if p is not None] == ["m", "m", "m"]


@pytest.mark.parametrize(
    ("replica", "serves"),
    [
        (r("x"), True),
        (r("x", COOLING), True),  # cooling still serves (a request brings it back to HOT)
        (r("x", WARMING), False),
        (r("x", UNLOADING), False),
        (r("x", draining=True), False),  # draining: no new request
    ],
)
def test_only_serving_replicas_take_requests(replica: ReplicaView, serves: bool) -> None:
    chosen, turn = pick([replica], 7)
    assert (chosen is not None) is serves
    assert turn == 7  # no pick among busy equals: no turn taken


def test_a_retry_avoids_the_replica_that_died() -> None:
    replicas = [r("a"), r("b", in_flight=5)]
    chosen, _ = pick(replicas, 0, avoid=frozenset({"a"}))
    assert chosen is not None and chosen.replica_id == "b"
    assert pick([r("a")], 0, avoid=frozenset({"a"}))[0] is None  # nowhere else to go


def test_load_per_replica_counts_serving_replicas_only() -> None:
    assert load_per_replica([r("a", in_flight=6), r("b", in_flight=2), r("c", WARMING)]) == 4.0
    assert load_per_replica([r("c", WARMING)]) == 0.0


# --- scaling -----------------------------------------------------------------------------------

LIMITS = Limits(minimum=1, maximum=3, up_in_flight=4, up_seconds=5, down_idle_seconds=120)


@pytest.mark.parametrize(
    ("previous", "load", "expected"),
    [
        (None, 4.0, 100.0),  # busy begins now
        (90.0, 6.0, 90.0),  # still busy: since 90
        (90.0, 3.9, None),  # below the threshold: the stretch ends
        (None, 0.0, None),
    ],
)
def test_busy_since(previous: float | None, load: float, expected: float | None) -> None:
    assert busy_since(previous, load, LIMITS, 100.0) == expected


@pytest.mark.parametrize(
    ("replicas", "busy", "last_change", "expected"),
    [
        # Busy for 5 s at 4 per replica, room under max: one more.
        ([r("a", in_flight=4)], 95.0, None, Direction.UP),
        # Busy, but only for 4 s.
        ([r("a", in_flight=8)], 96.0, None, None),
        # Not busy.
        ([r("a", in_flight=3)], None, None, None),
        # Already at max.
        ([r("a", in_flight=9), r("b", in_flight=9), r("c", in_flight=9)], 0.0, None, None),
        # One is starting already: wait for it.
        ([r("a", in_flight=9), r("b", WARMING)], 0.0, None, None),
        # A change 3 s ago: no flapping.
        ([r("a", in_flight=9)], 0.0, 97.0, None),
        # Nothing serves (the model is loading): not this function's business.
        ([r("a", WARMING)], 0.0, None, None),
    ],
)
def test_scale_up(
    replicas: list[ReplicaView], busy: float | None, last_change: float | None, expected: object
) -> None:
    decision = decide(replicas, LIMITS, 100.0, busy, last_change)
    assert (decision.direction if decision else None) == expected


def test_a_model_below_min_gains_a_replica_once_it_serves() -> None:
    two = Limits(minimum=2, maximum=3)
    assert decide([r("a")], two, 100.0, None, None) == Decision(Direction.UP, why="below min 2")
    assert decide([r("a", WARMING)], two, 100.0, None, None) is None  # not serving yet
    assert decide([r("a"), r("b", WARMING)], two, 100.0, None, None) is None  # on its way


def test_scale_down_drains_the_replica_idle_longest_beyond_min() -> None:
    replicas = [r("a", in_flight=1), r("b", idle_since=-50.0), r("c", idle_since=-30.0)]
    assert decide(replicas, LIMITS, 100.0, None, None) == Decision(
        Direction.DOWN, "b", "idle for 150 s"
    )


@pytest.mark.parametrize(
    ("replicas", "limits"),
    [
        ([r("a", idle_since=-500.0)], LIMITS),  # the last replica: its TTL decides
        ([r("a", idle_since=-500.0), r("b", idle_since=-500.0)], Limits(minimum=2, maximum=3)),
        ([r("a", in_flight=1), r("b", idle_since=0.0)], LIMITS),  # idle 100 s of 120
        ([r("a", in_flight=1), r("b", draining=True, idle_since=-500.0)], LIMITS),  # going
        # The model's own worker (leases, load calls) stays; its TTL decides.
        ([r("a", idle_since=-500.0, anchor=True), r("b", in_flight=1)], LIMITS),
    ],
)
def test_no_scale_down(replicas: list[ReplicaView], limits: Limits) -> None:
    assert decide(replicas, limits, 100.0, None, None) is None


DRAIN_B = Decision(Direction.DOWN, "b", "pinned at 1")


@pytest.mark.parametrize(
    ("replicas", "pinned", "expected"),
    [
        ([r("a")], 3, Decision(Direction.UP, why="pinned at 3")),
        ([r("a"), r("b", WARMING)], 3, None),  # one step at a time
        # Down to 1: an idle one goes before a busy one.
        ([r("a", in_flight=2), r("b", idle_since=50.0)], 1, DRAIN_B),
        ([r("a"), r("b")], 2, None),
        # Not the model's own worker, however idle.
        ([r("a", idle_since=-99.0, anchor=True), r("b", in_flight=3)], 1,
         Decision(Direction.DOWN, "b", "pinned at 1")),
        # Unloaded (nothing serves): a pinned count loads nothing until a request does.
        ([r("a", UNLOADING)], 2, None),
        ([], 2, None),
    ],
)  # fmt: skip
def test_a_pinned_count_is_approached_one_step_at_a_time(
    replicas: list[ReplicaView], pinned: int, expected: Decision | None
) -> None:
    assert decide(replicas, LIMITS, 100.0, 0.0, None, pinned=pinned) == expected
