"""Load jobs: the phases (pure), and the pool's jobs with a fake lifecycle (no processes)."""

from __future__ import annotations

import threading

import pytest

from controlplane.core import jobs
from controlplane.core.jobs import Job, Phase
from controlplane.core.states import State
from controlplane.errors import Conflict, LoadCancelled, NoCapacity, UnknownJob
from controlplane.settings import ModelEntry
from tests.test_pool import hot, make


def job(phase: Phase = Phase.QUEUED) -> Job:
    return Job("job-1", "a", 100.0, "load", phase=phase)


# --- core.jobs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "to", "moved", "end"),
    [
        (Phase.QUEUED, Phase.SPAWNING, True, Phase.SPAWNING),
        (Phase.QUEUED, Phase.LOADING_WEIGHTS, True, Phase.LOADING_WEIGHTS),
        (Phase.SPAWNING, Phase.LOADING_WEIGHTS, True, Phase.LOADING_WEIGHTS),
        (Phase.LOADING_WEIGHTS, Phase.LOADING_WEIGHTS, True, Phase.LOADING_WEIGHTS),
        # A late report of an earlier phase does not move a job back.
        (Phase.LOADING_WEIGHTS, Phase.SPAWNING, False, Phase.LOADING_WEIGHTS),
        (Phase.SPAWNING, Phase.QUEUED, False, Phase.SPAWNING),
        # Any live phase may end, in any way.
        (Phase.QUEUED, Phase.CANCELLED, True, Phase.CANCELLED),
        (Phase.SPAWNING, Phase.FAILED, True, Phase.FAILED),
        (Phase.LOADING_WEIGHTS, Phase.READY, True, Phase.READY),
        # A finished job stays as it ended.
        (Phase.READY, Phase.CANCELLED, False, Phase.READY),
        (Phase.CANCELLED, Phase.READY, False, Phase.CANCELLED),
        (Phase.FAILED, Phase.LOADING_WEIGHTS, False, Phase.FAILED),
    ],
)
def test_advance(start: Phase, to: Phase, moved: bool, end: Phase) -> None:
    j = job(start)
    assert jobs.advance(j, to) is moved
    assert j.phase is end


def test_progress_is_clamped_kept_and_one_when_ready() -> None:
    j = job(Phase.SPAWNING)
    jobs.advance(j, Phase.LOADING_WEIGHTS, 0.25)
    assert j.progress == 0.25
    jobs.advance(j, Phase.LOADING_WEIGHTS, None)  # no report: the last one stays
    assert j.progress == 0.25
    jobs.advance(j, Phase.LOADING_WEIGHTS, 1.7)
    assert j.progress == 1.0
    j2 = job(Phase.SPAWNING)
    assert jobs.finish(j2, Phase.READY, 200.0)
    assert (j2.progress, j2.finished_at, j2.error) == (1.0, 200.0, None)


def test_finish_only_once_and_only_to_an_end() -> None:
    j = job(Phase.SPAWNING)
    assert not jobs.finish(j, Phase.LOADING_WEIGHTS, 1.0)
    assert jobs.finish(j, Phase.FAILED, 5.0, "boom")
    assert not jobs.finish(j, Phase.CANCELLED, 6.0, "late")
    assert (j.phase, j.finished_at, j.error) == (Phase.FAILED, 5.0, "boom")


def test_retained_keeps_live_jobs_and_the_last_finished() -> None:
    js = [Job(f"j{i}", "a", float(i), "load") for i in range(6)]
    for j in js[:4]:
        jobs.finish(j, Phase.READY, 1.0)
    kept = jobs.retained(js, 2)
    assert [j.job_id for j in kept] == ["j2", "j3", "j4", "j5"]
    assert jobs.retained(js, 0) == js[4:]


# --- the pool's jobs ----------------------------------------------------------------------------


def test_a_load_call_with_room_starts_a_job_that_follows_the_load() -> None:
    pool, fake, clock = make([ModelEntry("a")])
    j = pool.load_job("a")
    assert j is not None and j.phase is Phase.SPAWNING and j.origin == "load"
    assert pool.record("a").state is State.WARMING
    _, gen, _ = fake.loads[-1]
    assert j.gen == gen
    assert pool.load_job("a") is j  # single flight: the same job
    pool.load_progress("a", gen, 0.4)
    assert pool.job(j.job_id)["phase"] == "loading_weights"
    assert pool.job(j.job_id)["progress"] == 0.4
    pool.load_progress("a", gen + 99, 0.9)  # another load's report changes nothing
    assert pool.job(j.job_id)["progress"] == 0.4
    clock.now += 3
    pool.became_ready("a", gen, None, 1)
    view = pool.job(j.job_id)
    assert (view["phase"], view["progress"], view["finished_at"]) == ("ready", 1.0, clock.now)
    assert pool.load_job("a") is None  # loaded: nothing to do
    assert pool.describe(pool.record("a"))["job"]["job_id"] == j.job_id


def test_a_load_started_by_a_request_is_a_job_too_and_a_failure_ends_it() -> None:
    pool, fake, _ = make([ModelEntry("a")])
    pool.ensure_loaded("a", wait=False)
    [listed] = pool.jobs()
    assert (listed["origin"], listed["phase"]) == ("request", "spawning")
    _, gen, _ = fake.loads[-1]
    pool.load_failed("a", gen, "worker reported: no such file", "backend_error")
    assert pool.job(listed["job_id"])["phase"] == "failed"
    assert "no such file" in pool.job(listed["job_id"])["error"]


def test_cancelling_a_load_under_way_stops_its_worker_and_fails_its_waiters() -> None:
    pool, fake, _ = make([ModelEntry("a")])
    j = pool.load_job("a")
    assert j is not None
    _, gen, _ = fake.loads[-1]
    errors: list[Exception] = []

    def request() -> None:
        try:
            pool.ensure_loaded("a", timeout=10)
        except Exception as exc:
            errors.append(exc)

    waiter = threading.Thread(target=request)
    waiter.start()
    assert pool.wait_for(lambda: pool._records["a"].waiters == 1, 5)
    view = pool.cancel_job(j.job_id)
    assert view["phase"] == "cancelled"
    rec = pool.record("a")
    assert rec.state is State.UNLOADING and rec.unload_reason == "cancelled"
    assert fake.stops[-1] == ("a", gen, True)  # stopped at once, no drain
    waiter.join(5)
    assert len(errors) == 1 and isinstance(errors[0], LoadCancelled)
    assert "cancelled" in errors[0].message
    pool.stopped("a", gen)
    assert pool.record("a").state is State.COLD
    assert pool.record("a").history[-1].reason == "cancelled"
    # The worker's late report changes nothing; a new request loads the model again.
    pool.became_ready("a", gen, None, 1)
    assert pool.record("a").state is State.COLD
    assert pool.job(j.job_id)["phase"] == "cancelled"
    pool.ensure_loaded("a", wait=False)
    assert pool.record("a").state is State.WARMING
    with pytest.raises(Conflict, match="has ended"):
        pool.cancel_job(j.job_id)
    with pytest.raises(UnknownJob):
        pool.cancel_job("job-nope")


def test_a_load_call_without_room_queues_a_job_that_can_be_cancelled() -> None:
    pool, fake, _ = make(
        [ModelEntry("a"), ModelEntry("b")],
        max_concurrent_models=1,
        min_resident_seconds=60,
        resident_load_multiple=0,
        capacity_wait_seconds=30,
    )
    hot(pool, fake, "a")  # resident for 60 s: b must wait for room
    j = pool.load_job("b")
    assert j is not None and j.phase is Phase.QUEUED and j.gen is None
    assert pool.wait_for(lambda: len(pool._room_queue) == 1, 5)
    assert pool.load_job("b") is j
    pool.cancel_job(j.job_id)
    assert pool.wait_for(lambda: not pool._room_queue and pool._waiting == 0, 5)
    assert pool.record("b").state is State.COLD
    assert pool.record("a").state is State.HOT  # nothing was evicted for it
    assert len(fake.loads) == 1


def test_a_queued_job_starts_its_load_when_room_frees() -> None:
    pool, fake, clock = make(
        [ModelEntry("a"), ModelEntry("b")],
        max_concurrent_models=1,
        min_resident_seconds=60,
        resident_load_multiple=0,
        capacity_wait_seconds=30,
    )
    hot(pool, fake, "a")
    j = pool.load_job("b")
    assert j is not None and j.phase is Phase.QUEUED
    clock.now += 61  # a's residency is over: b's job evicts it
    assert pool.wait_for(lambda: pool._records["a"].state is State.UNLOADING, 5)
    pool.stopped("a", pool.record("a").gen)
    assert pool.wait_for(lambda: pool._records["b"].state is State.WARMING, 5)
    assert j.phase is Phase.SPAWNING and j.gen == pool.record("b").gen
    pool.became_ready("b", j.gen, None, 1)
    assert pool.wait_for(lambda: pool._waiting == 0, 5)  # its thread is done
    assert j.phase is Phase.READY


def test_a_load_that_can_never_fit_is_refused_not_queued() -> None:
    pool, _, _ = make(
        [ModelEntry("big", memory_mb=5000)], memory_limit_mb=1000, capacity_wait_seconds=30
    )
    with pytest.raises(NoCapacity):
        pool.load_job("big")
    assert pool.jobs() == []
