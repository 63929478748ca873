"""The lifecycle table, exhaustively: every listed transition and every pair not listed."""

from __future__ import annotations

import itertools

import pytest

from controlplane.core.states import TRANSITIONS, Event, InvalidTransitionError, State, next_state

S, E = State, Event

# DESIGN.md's table, written out independently of the implementation.
EXPECTED = {
    (S.COLD, E.LOAD_REQUESTED): S.WARMING,
    (S.WARMING, E.BECAME_READY): S.HOT,
    (S.WARMING, E.LOAD_FAILED): S.FAILED,
    (S.WARMING, E.PROCESS_EXITED): S.FAILED,
    (S.HOT, E.TTL_EXPIRED): S.COOLING,
    (S.COOLING, E.REQUEST_ARRIVED): S.HOT,
    (S.COOLING, E.GRACE_EXPIRED): S.UNLOADING,
    (S.HOT, E.UNLOAD_REQUESTED): S.UNLOADING,
    (S.COOLING, E.UNLOAD_REQUESTED): S.UNLOADING,
    (S.HOT, E.PROCESS_EXITED): S.FAILED,
    (S.COOLING, E.PROCESS_EXITED): S.FAILED,
    (S.UNLOADING, E.STOPPED): S.COLD,
    (S.FAILED, E.LOAD_REQUESTED): S.WARMING,
    # DESIGN.md "Nodes": a node unreachable for node_timeout_seconds makes its models FAILED
    # (node_lost); one that was being unloaded is as good as stopped.
    (S.WARMING, E.NODE_LOST): S.FAILED,
    (S.HOT, E.NODE_LOST): S.FAILED,
    (S.COOLING, E.NODE_LOST): S.FAILED,
    (S.UNLOADING, E.NODE_LOST): S.COLD,
    # A load job cancelled before it finished (DELETE /jobs/{id}): its worker is stopped.
    (S.WARMING, E.LOAD_CANCELLED): S.UNLOADING,
}


def test_table_is_exactly_the_designed_one() -> None:
    assert dict(TRANSITIONS) == EXPECTED


@pytest.mark.parametrize(("state", "event"), sorted(EXPECTED), ids=lambda x: str(x))
def test_valid_transition(state: State, event: Event) -> None:
    assert next_state(state, event) is EXPECTED[(state, event)]


INVALID = sorted(set(itertools.product(State, Event)) - set(EXPECTED))


@pytest.mark.parametrize(("state", "event"), INVALID, ids=lambda x: str(x))
def test_invalid_transition(state: State, event: Event) -> None:
    with pytest.raises(InvalidTransitionError) as info:
        next_state(state, event)
    assert info.value.state is state and info.value.event is event
    assert state.value in str(info.value) and event.value in str(info.value)


def test_every_state_is_reachable_from_cold_and_returns_to_cold() -> None:
    reachable, frontier = {S.COLD}, [S.COLD]
    while frontier:
        cur = frontier.pop()
        for (src, _), dst in TRANSITIONS.items():
            if src is cur and dst not in reachable:
                reachable.add(dst)
                frontier.append(dst)
    assert reachable == set(State)
    # From every state there is a path back to COLD (nothing is stuck).
    for start in State:
        seen, frontier = {start}, [start]
        while frontier:
            cur = frontier.pop()
            for (src, _), dst in TRANSITIONS.items():
                if src is cur and dst not in seen:
                    seen.add(dst)
                    frontier.append(dst)
        assert S.COLD in seen or start is S.COLD, start
