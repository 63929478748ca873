"""Model lifecycle states, the events that move them, and the one table of transitions."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Final


class State(StrEnum):
    """Where a model is in its lifecycle."""

    COLD = "COLD"
    WARMING = "WARMING"
    HOT = "HOT"
    COOLING = "COOLING"
    UNLOADING = "UNLOADING"
    FAILED = "FAILED"


class Event(StrEnum):
    """Facts, in the past tense, that may change a model's state."""

    #: A request, a ``load`` call or warmup asked for the model.
    LOAD_REQUESTED = "LOAD_REQUESTED"
    #: The worker's ``/health`` said ``ready``.
    BECAME_READY = "BECAME_READY"
    #: The worker reported an error or was not ready within the load timeout.
    LOAD_FAILED = "LOAD_FAILED"
    #: supervisord says the worker process is gone although nobody asked it to stop.
    PROCESS_EXITED = "PROCESS_EXITED"
    #: The TTL deadline passed with no request in flight.
    TTL_EXPIRED = "TTL_EXPIRED"
    #: A request (or a TTL extension) arrived during the grace period.
    REQUEST_ARRIVED = "REQUEST_ARRIVED"
    #: The grace period passed with no request.
    GRACE_EXPIRED = "GRACE_EXPIRED"
    #: An ``unload`` call, an eviction, a deletion or an operator's stop.
    UNLOAD_REQUESTED = "UNLOAD_REQUESTED"
    #: The worker process stopped after an unload; its port is free.
    STOPPED = "STOPPED"
    #: A load that had not finished was cancelled (``DELETE /jobs/{id}``): its worker stops.
    LOAD_CANCELLED = "LOAD_CANCELLED"
    #: The worker's node has been unreachable for ``node_timeout_seconds``.
    NODE_LOST = "NODE_LOST"


S, E = State, Event

#: Every valid transition. Anything not listed is an InvalidTransitionError.
TRANSITIONS: Final[Mapping[tuple[State, Event], State]] = {
    (S.COLD, E.LOAD_REQUESTED): S.WARMING,
    (S.WARMING, E.BECAME_READY): S.HOT,
    (S.WARMING, E.LOAD_FAILED): S.FAILED,
    (S.WARMING, E.PROCESS_EXITED): S.FAILED,
    (S.HOT, E.TTL_EXPIRED): S.COOLING,
    (S.COOLING, E.REQUEST_ARRIVED): S.HOT,
    (S.COOLING, E.GRACE_EXPIRED): S.UNLOADING,
    (S.HOT, E.UNLOAD_REQUESTED): S.UNLOADING,
    (S.COOLING, E.UNLOAD_REQUESTED): S.UNLOADING,
    # A loaded model whose worker dies is never left HOT without a process.
    (S.HOT, E.PROCESS_EXITED): S.FAILED,
    (S.COOLING, E.PROCESS_EXITED): S.FAILED,
    (S.UNLOADING, E.STOPPED): S.COLD,
    # A cancelled load stops its worker like an unload, and ends COLD.
    (S.WARMING, E.LOAD_CANCELLED): S.UNLOADING,
    (S.FAILED, E.LOAD_REQUESTED): S.WARMING,
    # A lost node takes its workers with it: the next request loads the model elsewhere; a
    # model that was being unloaded is as good as stopped.
    (S.WARMING, E.NODE_LOST): S.FAILED,
    (S.HOT, E.NODE_LOST): S.FAILED,
    (S.COOLING, E.NODE_LOST): S.FAILED,
    (S.UNLOADING, E.NODE_LOST): S.COLD,
}

#: States in which a model holds a port and (maybe) a process.
OCCUPYING: Final[frozenset[State]] = frozenset({S.WARMING, S.HOT, S.COOLING, S.UNLOADING})
#: States in which a model can serve a request right now.
SERVING: Final[frozenset[State]] = frozenset({S.HOT, S.COOLING})


class InvalidTransitionError(Exception):
    """An event that the table does not allow in the current state."""

    def __init__(self, state: State, event: Event) -> None:
        super().__init__(f"event {event} is not valid in state {state}")
        self.state = state
        self.event = event


def next_state(state: State, event: Event) -> State:
    """The state that ``event`` leads to from ``state``, or InvalidTransitionError."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise InvalidTransitionError(state, event) from None
