"""The second table (``core.chores``): what is being done about a worker program, tested like
the state table, and what the pool does with it when a job cannot start or its node is lost."""

from __future__ import annotations

import itertools

import pytest

from controlplane.core.chores import (
    CHORES,
    RUNNING,
    Chore,
    ChoreEvent,
    InvalidChoreError,
    next_chore,
)
from controlplane.core.states import State
from controlplane.pool import ModelPool
from controlplane.records import Lifecycle, Record
from controlplane.settings import ModelEntry, parse_settings

C, CE = Chore, ChoreEvent

# Written out independently of the implementation.
EXPECTED = {
    (C.NONE, CE.ADOPTION_STARTED): C.ADOPTING,
    (C.ADOPTING, CE.ADOPTION_ENDED): C.NONE,
    (C.NONE, CE.STOP_STARTED): C.STOPPING,
    (C.STOP_DUE, CE.STOP_STARTED): C.STOPPING,
    (C.NONE, CE.STOP_FAILED): C.STOP_DUE,
    (C.STOP_DUE, CE.STOP_FAILED): C.STOP_DUE,
    (C.STOPPING, CE.STOP_FAILED): C.STOP_DUE,
    (C.STOPPING, CE.STOPPED): C.NONE,
    (C.NONE, CE.CLEANUP_STARTED): C.CLEANING,
    (C.CLEANUP_DUE, CE.CLEANUP_STARTED): C.CLEANING,
    (C.ADOPTING, CE.CLEANUP_FAILED): C.CLEANUP_DUE,
    (C.NONE, CE.CLEANUP_FAILED): C.CLEANUP_DUE,
    (C.CLEANUP_DUE, CE.CLEANUP_FAILED): C.CLEANUP_DUE,
    (C.CLEANING, CE.CLEANUP_FAILED): C.CLEANUP_DUE,
    (C.CLEANING, CE.CLEANED): C.NONE,
    **{(c, CE.NODE_LOST): C.NONE for c in Chore},
}


def test_table_is_exactly_the_designed_one() -> None:
    assert dict(CHORES) == EXPECTED


INVALID = sorted(set(itertools.product(Chore, ChoreEvent)) - set(EXPECTED))


@pytest.mark.parametrize(("chore", "event"), INVALID, ids=lambda x: str(x))
def test_invalid_change(chore: Chore, event: ChoreEvent) -> None:
    with pytest.raises(InvalidChoreError) as info:
        next_chore(chore, event)
    assert info.value.chore is chore and info.value.event is event


def test_every_chore_is_reachable_and_ends_in_none() -> None:
    reachable, frontier = {C.NONE}, [C.NONE]
    while frontier:
        cur = frontier.pop()
        for (src, _), dst in CHORES.items():
            if src is cur and dst not in reachable:
                reachable.add(dst)
                frontier.append(dst)
    assert reachable == set(Chore)
    for start in Chore:  # nothing is stuck: a way back to NONE that is not a node loss
        seen, frontier = {start}, [start]
        while frontier:
            cur = frontier.pop()
            for (src, ev), dst in CHORES.items():
                if src is cur and ev is not CE.NODE_LOST and dst not in seen:
                    seen.add(dst)
                    frontier.append(dst)
        assert C.NONE in seen, start


def test_the_record_reads_its_chore() -> None:
    rec = Record(entry=ModelEntry("m"), program="p")
    assert not (rec.busy or rec.needs_cleanup or rec.adopting)
    for chore in Chore:
        rec.chore = chore
        assert rec.busy == (chore in RUNNING)
        assert rec.needs_cleanup == (chore is C.CLEANUP_DUE)
        assert rec.adopting == (chore is C.ADOPTING)


class FlakyLifecycle(Lifecycle):
    """Jobs that cannot start until ``ok`` (a thread limit, say); the rest record the call."""

    def __init__(self) -> None:
        self.ok = True
        self.calls: list[str] = []

    def _job(self, name: str) -> None:
        if not self.ok:
            raise RuntimeError("can't start new thread")
        self.calls.append(name)

    def start_load(self, model_id: str, gen: int, adopt: bool) -> None:
        self._job("load")

    def start_stop(self, model_id: str, gen: int, force: bool) -> None:
        self._job("stop")

    def start_cleanup(self, model_id: str, gen: int) -> None:
        self._job("cleanup")

    def hurry(self, model_id: str, gen: int) -> None:
        pass


def test_a_stop_that_cannot_start_is_due_and_a_late_report_changes_nothing() -> None:
    pool = ModelPool(parse_settings({}), (ModelEntry("a"),))
    life = FlakyLifecycle()
    pool.lifecycle = life
    rec = pool.ensure_loaded("a", wait=False)
    pool.became_ready("a", rec.gen, 100.0, 1)
    life.ok = False
    pool.unload("a")
    assert pool.record("a").chore is C.STOP_DUE and pool.unloading_idle()
    life.ok = True
    pool.retry_stop("a", rec.gen)
    assert pool.record("a").chore is C.STOPPING and life.calls[-1] == "stop"
    pool.stop_failed("a", rec.gen)  # supervisord away: due again
    assert pool.record("a").chore is C.STOP_DUE
    pool.retry_stop("a", rec.gen)
    pool.stopped("a", rec.gen)
    after = pool.record("a")
    assert after.state is State.COLD and after.chore is C.NONE
    pool.stop_failed("a", rec.gen)  # a late report of the old job: nothing changes
    pool.cleaned("a", rec.gen)
    assert pool.record("a").chore is C.NONE


def test_a_cleanup_that_fails_keeps_the_port_until_it_succeeds() -> None:
    pool = ModelPool(parse_settings({}), (ModelEntry("a"),))
    life = FlakyLifecycle()
    pool.lifecycle = life
    rec = pool.ensure_loaded("a", wait=False)
    pool.became_ready("a", rec.gen, 100.0, 1)
    pool.process_gone("a", rec.gen, operator_stop=False, detail="killed")
    assert pool.record("a").chore is C.CLEANING
    pool.cleaned("a", rec.gen, removed=False)
    failed = pool.record("a")
    assert failed.chore is C.CLEANUP_DUE and failed.port == rec.port
    pool.retry_cleanups()
    assert pool.record("a").chore is C.CLEANING
    pool.cleaned("a", rec.gen, removed=True)
    done = pool.record("a")
    assert done.chore is C.NONE and done.port is None and done.state is State.FAILED
