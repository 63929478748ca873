"""The second small table: what is being done about a model's worker program, beside its state.

A model's state (``core.states``) says where it is in its lifecycle; its *chore* says which
background job works on its worker program right now, or is due again. A stop that could not
start, or failed (supervisord away), is due: the reaper starts it again. A FAILED model whose
worker could not be removed keeps its port until a cleanup succeeds. Nothing else may start on
the program while a chore runs: a model whose chore is not NONE is not loaded again.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Final


class Chore(StrEnum):
    NONE = "none"
    #: A load takes over a worker that was already running (a control plane restarted, a node
    #: that came back).
    ADOPTING = "adopting"
    #: A stop job drains, stops and removes the worker (the model is UNLOADING).
    STOPPING = "stopping"
    #: The stop could not start or did not finish: the reaper starts it again.
    STOP_DUE = "stop_due"
    #: A cleanup job removes a FAILED model's worker.
    CLEANING = "cleaning"
    #: The FAILED model's worker is not removed yet (it keeps its port): cleaned up again.
    CLEANUP_DUE = "cleanup_due"


class ChoreEvent(StrEnum):
    ADOPTION_STARTED = "ADOPTION_STARTED"
    ADOPTION_ENDED = "ADOPTION_ENDED"
    STOP_STARTED = "STOP_STARTED"
    STOP_FAILED = "STOP_FAILED"
    STOPPED = "STOPPED"
    CLEANUP_STARTED = "CLEANUP_STARTED"
    CLEANUP_FAILED = "CLEANUP_FAILED"
    CLEANED = "CLEANED"
    #: The worker's node is gone, and with it whatever was being done there.
    NODE_LOST = "NODE_LOST"


C, CE = Chore, ChoreEvent

#: Every valid change. Anything not listed is an InvalidChoreError.
CHORES: Final[Mapping[tuple[Chore, ChoreEvent], Chore]] = {
    (C.NONE, CE.ADOPTION_STARTED): C.ADOPTING,
    (C.ADOPTING, CE.ADOPTION_ENDED): C.NONE,
    (C.NONE, CE.STOP_STARTED): C.STOPPING,
    (C.STOP_DUE, CE.STOP_STARTED): C.STOPPING,
    (C.NONE, CE.STOP_FAILED): C.STOP_DUE,  # the job could not even start
    (C.STOP_DUE, CE.STOP_FAILED): C.STOP_DUE,
    (C.STOPPING, CE.STOP_FAILED): C.STOP_DUE,
    (C.STOPPING, CE.STOPPED): C.NONE,
    (C.NONE, CE.CLEANUP_STARTED): C.CLEANING,
    (C.CLEANUP_DUE, CE.CLEANUP_STARTED): C.CLEANING,
    (C.ADOPTING, CE.CLEANUP_FAILED): C.CLEANUP_DUE,  # an adoption failed, its worker stays
    (C.NONE, CE.CLEANUP_FAILED): C.CLEANUP_DUE,
    (C.CLEANUP_DUE, CE.CLEANUP_FAILED): C.CLEANUP_DUE,
    (C.CLEANING, CE.CLEANUP_FAILED): C.CLEANUP_DUE,
    (C.CLEANING, CE.CLEANED): C.NONE,
    **{(chore, CE.NODE_LOST): C.NONE for chore in Chore},
}

#: A job runs on the program: nothing else may start on it.
RUNNING: Final = frozenset({C.STOPPING, C.CLEANING})


class InvalidChoreError(Exception):
    def __init__(self, chore: Chore, event: ChoreEvent) -> None:
        super().__init__(f"chore event {event} is not valid while {chore}")
        self.chore = chore
        self.event = event


def next_chore(chore: Chore, event: ChoreEvent) -> Chore:
    try:
        return CHORES[(chore, event)]
    except KeyError:
        raise InvalidChoreError(chore, event) from None
