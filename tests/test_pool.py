"""ModelPool with a fake lifecycle and a fake clock: decisions without processes or sleeps."""

from __future__ import annotations

import threading
import time

import pytest

from controlplane.core import policy
from controlplane.core.states import State
from controlplane.errors import (
    BackendDown,
    Conflict,
    LoadFailed,
    LoadTimeout,
    NoCapacity,
    UnknownModel,
)
from controlplane.pool import ModelPool
from controlplane.records import Lifecycle
from controlplane.settings import ModelEntry, Settings, parse_settings


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeLifecycle(Lifecycle):
    """Records what the pool asked for; the test plays the worker's part."""

    def __init__(self) -> None:
        self.loads: list[tuple[str, int, bool]] = []
        self.stops: list[tuple[str, int, bool]] = []
        self.cleanups: list[tuple[str, int]] = []
        self.hurried: list[tuple[str, int]] = []
        self.lock = threading.Lock()

    def start_load(self, model_id: str, gen: int, adopt: bool) -> None:
        with self.lock:
            self.loads.append((model_id, gen, adopt))

    def start_stop(self, model_id: str, gen: int, force: bool) -> None:
        self.stops.append((model_id, gen, force))

    def start_cleanup(self, model_id: str, gen: int) -> None:
        self.cleanups.append((model_id, gen))

    def hurry(self, model_id: str, gen: int) -> None:
        self.hurried.append((model_id, gen))


def make(
    entries: list[ModelEntry], **settings: object
) -> tuple[ModelPool, FakeLifecycle, FakeClock]:
    base: dict[str, object] = {
        "min_ttl_minutes": 0.01,
        "default_ttl_minutes": 1,
        "grace_period_minutes": 0.5,
        "min_resident_seconds": 0,  # eviction order is what these tests check
        "min_idle_seconds": 0,
        "capacity_wait_seconds": 0,  # and a refusal is at once
    }
    base.update(settings)
    clock = FakeClock()
    pool = ModelPool(parse_settings(base, Settings()), tuple(entries), clock)
    fake = FakeLifecycle()
    pool.lifecycle = fake
    return pool, fake, clock


def hot(pool: ModelPool, fake: FakeLifecycle, model_id: str) -> None:
    pool.ensure_loaded(model_id, wait=False)
    _, gen, _ = fake.loads[-1]
    pool.became_ready(model_id, gen, None, 4242)
    assert pool.record(model_id).state is State.HOT


def test_unknown_model() -> None:
    pool, _, _ = make([ModelEntry("a")])
    with pytest.raises(UnknownModel):
        pool.ensure_loaded("nope")


def test_concurrent_first_requests_cause_one_load() -> None:
    pool, fake, _ = make([ModelEntry("a")])
    results: list[State] = []
    errors: list[Exception] = []

    def request() -> None:
        try:
            results.append(pool.ensure_loaded("a", timeout=10).state)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=request) for _ in range(20)]
    for t in threads:
        t.start()
    assert pool.wait_for(lambda: len(fake.loads) == 1, 5)
    pool.became_ready("a", fake.loads[0][1], None, 1)
    for t in threads:
        t.join(10)
    assert not errors
    assert results == [State.HOT] * 20
    assert len(fake.loads) == 1


def test_waiters_see_the_failure_and_do_not_retry_it() -> None:
    pool, fake, _ = make([ModelEntry("a")])
    errors: list[Exception] = []

    def request() -> None:
        try:
            pool.ensure_loaded("a", timeout=10)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=request) for _ in range(5)]
    for t in threads:
        t.start()
    assert pool.wait_for(lambda: len(fake.loads) == 1, 5)
    # Let every caller reach its wait before the load fails.
    assert pool.wait_for(lambda: True, 0.2)
    threading.Event().wait(0.2)
    pool.load_failed("a", fake.loads[0][1], "model not found", "backend_error")
    for t in threads:
        t.join(10)
    assert len(errors) == 5 and all(isinstance(e, LoadFailed) for e in errors)
    assert "model not found" in str(errors[0])
    assert len(fake.loads) == 1
    rec = pool.record("a")
    assert rec.state is State.FAILED and rec.last_error == "model not found" and rec.port is None


def test_failed_model_backoff_applies_to_requests_not_to_load_calls() -> None:
    pool, fake, clock = make([ModelEntry("a")])
    for expected in (10, 20):
        pool.ensure_loaded("a", wait=False, manual=True)
        pool.load_failed("a", fake.loads[-1][1], "boom", "exited")
        with pytest.raises(LoadFailed) as info:
            pool.ensure_loaded("a", wait=False)
        assert info.value.retry_after == pytest.approx(expected)
    clock.now += 21
    assert pool.ensure_loaded("a", wait=False).state is State.WARMING


def test_a_permanent_failure_is_not_retried_until_a_load_call() -> None:
    pool, fake, clock = make([ModelEntry("a")])
    pool.ensure_loaded("a", wait=False)
    pool.load_failed(
        "a", fake.loads[-1][1], "model file not found: /x", "backend_error", permanent=True
    )
    clock.now += 10**6
    with pytest.raises(LoadFailed, match="registry entry changes"):
        pool.ensure_loaded("a", wait=False)
    assert pool.describe(pool.record("a"))["retryable"] is False
    assert pool.ensure_loaded("a", wait=False, manual=True).state is State.WARMING


def test_load_timeout() -> None:
    pool, _, _ = make([ModelEntry("a")])
    with pytest.raises(LoadTimeout, match="WARMING"):
        pool.ensure_loaded("a", timeout=0.2)


def test_ttl_cooling_grace_and_unload() -> None:
    pool, fake, clock = make([ModelEntry("a", ttl_minutes=1)])
    hot(pool, fake, "a")
    clock.now += 59
    pool.expire(clock.now)
    assert pool.record("a").state is State.HOT
    clock.now += 2
    pool.expire(clock.now)
    rec = pool.record("a")
    assert rec.state is State.COOLING
    assert rec.grace_until == pytest.approx(rec.deadline + 30)  # grace follows the deadline
    clock.now += 31
    pool.expire(clock.now)
    assert pool.record("a").state is State.UNLOADING
    assert fake.stops == [("a", 1, False)]
    pool.stopped("a", 1)
    rec = pool.record("a")
    assert rec.state is State.COLD and rec.port is None
    assert [t.reason for t in rec.history] == ["request", "ready", "ttl", "ttl", "ttl"]


def test_request_in_grace_period_returns_to_hot_with_a_fresh_ttl() -> None:
    pool, fake, clock = make([ModelEntry("a", ttl_minutes=1)])
    hot(pool, fake, "a")
    clock.now += 61
    pool.expire(clock.now)
    assert pool.record("a").state is State.COOLING
    with pool.acquire("a") as rec:
        assert rec.state is State.HOT
    rec = pool.record("a")
    assert rec.state is State.HOT and rec.deadline == pytest.approx(clock.now + 60)


def test_worker_activity_resets_ttl_and_in_flight_blocks_expiry() -> None:
    pool, fake, clock = make([ModelEntry("a", ttl_minutes=1)])
    hot(pool, fake, "a")
    gen = pool.record("a").gen
    clock.now += 50
    pool.observe_worker("a", gen, requests=1, in_flight=0, last_at=clock.now, memory_mb=900)
    rec = pool.record("a")
    assert rec.deadline == pytest.approx(clock.now + 60) and rec.memory() == 900
    clock.now += 100
    pool.observe_worker("a", gen, requests=1, in_flight=1, last_at=clock.now - 100, memory_mb=None)
    pool.expire(clock.now + 1000)
    assert pool.record("a").state is State.HOT  # a request is in flight: never expired


def test_warmup_never_expires() -> None:
    pool, fake, clock = make([ModelEntry("w", warmup=True, ttl_minutes=1)])
    hot(pool, fake, "w")
    assert pool.record("w").deadline is None
    clock.now += 10**6
    pool.expire(clock.now)
    assert pool.record("w").state is State.HOT


def test_auto_unload_off_keeps_models() -> None:
    pool, fake, clock = make([ModelEntry("a", ttl_minutes=1)], auto_unload=False)
    hot(pool, fake, "a")
    clock.now += 10**6
    pool.expire(clock.now)
    assert pool.record("a").state is State.HOT


def test_extend_ttl_clamps_and_wakes_cooling_models() -> None:
    pool, fake, clock = make([ModelEntry("a", ttl_minutes=10)], max_ttl_minutes=20)
    hot(pool, fake, "a")
    rec, clamped = pool.extend_ttl("a", 5)
    assert rec.deadline == pytest.approx(clock.now + 15 * 60) and not clamped
    rec, clamped = pool.extend_ttl("a", 30)
    assert rec.deadline == pytest.approx(clock.now + 20 * 60) and clamped
    clock.now += 20 * 60 + 10  # past the deadline, within the 30 s grace period
    pool.expire(clock.now)
    assert pool.record("a").state is State.COOLING
    rec, _ = pool.extend_ttl("a", 1)
    assert rec.state is State.HOT
    pool.unload("a")
    with pytest.raises(Conflict):
        pool.extend_ttl("a", 1)


def test_eviction_of_lru_at_the_model_limit() -> None:
    pool, fake, clock = make(
        [ModelEntry("a"), ModelEntry("b"), ModelEntry("c")], max_concurrent_models=2
    )
    hot(pool, fake, "a")
    clock.now += 1
    hot(pool, fake, "b")
    clock.now += 1
    with pool.acquire("a"):
        pass  # a is now the most recently used
    done = threading.Event()
    threading.Thread(target=lambda: (pool.ensure_loaded("c", wait=False), done.set())).start()
    assert pool.wait_for(lambda: len(fake.stops) == 1, 5)
    assert fake.stops[0][0] == "b"
    assert pool.record("b").state is State.UNLOADING
    assert not done.is_set()  # c waits until b has stopped
    pool.stopped("b", fake.stops[0][1])
    assert done.wait(5)
    assert pool.record("c").state is State.WARMING


def test_no_capacity_when_only_warmup_or_busy_models() -> None:
    pool, fake, _ = make(
        [ModelEntry("w", warmup=True), ModelEntry("b"), ModelEntry("c")], max_concurrent_models=2
    )
    hot(pool, fake, "w")
    hot(pool, fake, "b")
    with pool.acquire("b"), pytest.raises(NoCapacity) as info:
        pool.ensure_loaded("c", wait=False)
    assert info.value.retry_after is not None
    assert pool.record("c").state is State.COLD


def test_crash_of_a_hot_model_goes_failed_and_frees_the_port_after_cleanup() -> None:
    pool, fake, _ = make([ModelEntry("a")])
    hot(pool, fake, "a")
    rec = pool.record("a")
    pool.process_gone("a", rec.gen, operator_stop=False, detail="worker exited (EXITED, 9)")
    rec = pool.record("a")
    assert rec.state is State.FAILED and rec.port is not None and rec.busy
    assert fake.cleanups == [("a", rec.gen)]
    pool.cleaned("a", rec.gen)
    rec = pool.record("a")
    assert rec.port is None and not rec.busy and "EXITED" in (rec.last_error or "")


def test_operator_stop_is_an_unload() -> None:
    pool, fake, _ = make([ModelEntry("a")])
    hot(pool, fake, "a")
    pool.process_gone("a", pool.record("a").gen, operator_stop=True, detail="stopped")
    assert pool.record("a").state is State.UNLOADING


def test_stale_reports_from_an_old_generation_change_nothing() -> None:
    pool, fake, _ = make([ModelEntry("a")])
    hot(pool, fake, "a")
    old = pool.record("a").gen
    pool.unload("a")
    pool.stopped("a", old)
    pool.ensure_loaded("a", wait=False)
    pool.became_ready("a", old, None, 1)  # a late "ready" from the previous worker
    assert pool.record("a").state is State.WARMING


def test_unload_conflicts() -> None:
    pool, _fake, _ = make([ModelEntry("a")])
    assert pool.unload("a").state is State.COLD  # nothing to do
    pool.ensure_loaded("a", wait=False)
    with pytest.raises(Conflict, match="loading"):
        pool.unload("a")


def test_request_during_unloading_waits_and_reloads() -> None:
    pool, fake, _ = make([ModelEntry("a")])
    hot(pool, fake, "a")
    pool.unload("a")
    got: list[State] = []
    t = threading.Thread(target=lambda: got.append(pool.ensure_loaded("a", timeout=10).state))
    t.start()
    t.join(0.3)
    assert t.is_alive()  # waiting, not failing
    pool.stopped("a", fake.stops[0][1])
    assert pool.wait_for(lambda: len(fake.loads) == 2, 5)
    pool.became_ready("a", fake.loads[-1][1], None, 2)
    t.join(5)
    assert got == [State.HOT]


def test_ports_are_allocated_and_freed() -> None:
    pool, _fake, _ = make(
        [
            ModelEntry("w1", warmup=True),
            ModelEntry("w2", warmup=True),
            ModelEntry("x"),
            ModelEntry("p", port=8070),
        ]
    )
    for m in ("x", "w2", "p", "w1"):
        pool.ensure_loaded(m, wait=False)
    ports = {m: pool.record(m).port for m in ("w1", "w2", "x", "p")}
    assert ports == {"w1": 8051, "w2": 8052, "x": 8053, "p": 8070}
    summary = pool.summary()
    assert summary["available_ports"] == 49 - 4 and summary["total_models"] == 4


def test_acquire_loads_and_counts_in_one_step() -> None:
    pool, fake, _clock = make([ModelEntry("a", ttl_minutes=1)])
    got: list[int] = []

    def request() -> None:
        with pool.acquire("a", timeout=10) as rec:
            got.append(pool.record("a").in_flight)
            assert rec.state is State.HOT

    t = threading.Thread(target=request)
    t.start()
    assert pool.wait_for(lambda: len(fake.loads) == 1, 5)
    pool.became_ready("a", fake.loads[0][1], None, 1)
    t.join(5)
    assert got == [1] and pool.record("a").in_flight == 0


def test_a_model_in_flight_is_never_expired_even_past_its_deadline() -> None:
    pool, fake, clock = make([ModelEntry("a", ttl_minutes=1)])
    hot(pool, fake, "a")
    with pool.acquire("a"):
        clock.now += 3600
        pool.expire(clock.now)
        assert pool.record("a").state is State.HOT
        assert pool.next_wakeup() is None  # nothing due while busy: the reaper does not spin
    # The end of the request resets the TTL: not due right away either.
    pool.expire(clock.now + 1)
    assert pool.record("a").state is State.HOT


def test_supervisord_away_refuses_loads_without_changing_state() -> None:
    pool, fake, _ = make([ModelEntry("a")])
    pool.set_available(False)
    with pytest.raises(BackendDown):
        pool.ensure_loaded("a", wait=False)
    assert pool.record("a").state is State.COLD and not fake.loads


def test_supervisord_failure_is_not_counted_as_a_model_failure() -> None:
    pool, fake, _ = make([ModelEntry("a")])
    pool.ensure_loaded("a", wait=False)
    pool.load_failed("a", fake.loads[-1][1], "supervisord is not reachable", "supervisord")
    rec = pool.record("a")
    assert rec.state is State.FAILED and rec.failures == 0 and rec.retry_at == 0


def test_a_worker_that_could_not_be_removed_keeps_its_port_until_cleaned() -> None:
    pool, fake, _ = make([ModelEntry("a")])
    pool.ensure_loaded("a", wait=False)
    port = pool.record("a").port
    pool.load_failed("a", fake.loads[-1][1], "boom", "exited", removed=False)
    rec = pool.record("a")
    assert rec.port == port and rec.needs_cleanup
    with pytest.raises(LoadTimeout):  # no new load while the old worker may still run
        pool.ensure_loaded("a", timeout=0.2, manual=True)
    pool.retry_cleanups()
    assert fake.cleanups == [("a", rec.gen)]
    pool.cleaned("a", rec.gen, removed=True)
    rec = pool.record("a")
    assert rec.port is None and not rec.needs_cleanup
    assert pool.ensure_loaded("a", wait=False, manual=True).state is State.WARMING


def test_crash_loops_back_off() -> None:
    pool, fake, clock = make([ModelEntry("a")])
    for expected in (1, 2, 3):
        hot(pool, fake, "a")
        rec = pool.record("a")
        pool.process_gone("a", rec.gen, operator_stop=False, detail="killed")
        pool.cleaned("a", rec.gen)
        assert pool.record("a").failures == expected
        clock.now = pool.record("a").retry_at
    # One that ran stably before crashing starts counting again.
    hot(pool, fake, "a")
    clock.now += 120
    pool.process_gone("a", pool.record("a").gen, operator_stop=False, detail="killed")
    assert pool.record("a").failures == 1


def test_forced_unload_of_a_draining_model_only_hurries_it() -> None:
    pool, fake, _ = make([ModelEntry("a")])
    hot(pool, fake, "a")
    pool.unload("a")
    pool.unload("a", force=True)
    assert len(fake.stops) == 1 and fake.hurried == [("a", fake.stops[0][1])]


def test_changing_the_warmup_set_moves_deadlines() -> None:
    pool, fake, clock = make([ModelEntry("a", ttl_minutes=1)])
    hot(pool, fake, "a")
    assert pool.record("a").deadline is not None
    pool.set_settings(parse_settings({"warmup_models": ["a"]}, pool.settings))
    assert pool.record("a").deadline is None
    pool.set_settings(parse_settings({"warmup_models": []}, pool.settings))
    assert pool.record("a").deadline == pytest.approx(clock.now + 60)


def test_a_listener_that_raises_leaves_no_model_stuck_unloading() -> None:
    """Regression: a raising listener inside _begin_unload left busy set and no stop job.

    Deterministic: the listener raises on every transition; no thread or clock is involved.
    """
    pool, fake, _ = make([ModelEntry("a")])
    hot(pool, fake, "a")

    def broken(rec: object, old: State, new: State) -> None:
        raise RuntimeError("listener bug")

    pool.listeners.append(broken)
    pool.unload("a")
    assert pool.record("a").state is State.UNLOADING
    assert fake.stops, "the stop job was never started"
    _, gen, _ = fake.stops[-1]
    pool.stopped("a", gen)
    assert pool.record("a").state is State.COLD


class _RefusingLifecycle(FakeLifecycle):
    """A lifecycle whose jobs cannot start (e.g. no thread can be created) until allowed."""

    def __init__(self) -> None:
        super().__init__()
        self.refuse = True

    def start_stop(self, model_id: str, gen: int, force: bool) -> None:
        if self.refuse:
            raise RuntimeError("can't start new thread")
        super().start_stop(model_id, gen, force)

    def start_load(self, model_id: str, gen: int, adopt: bool) -> None:
        if self.refuse:
            raise RuntimeError("can't start new thread")
        super().start_load(model_id, gen, adopt)


def test_a_stop_job_that_cannot_start_is_retried_by_the_reaper() -> None:
    """Regression: busy was set before the job started, so retry_stop skipped the model."""
    pool, _, _ = make([ModelEntry("a")])
    fake = _RefusingLifecycle()
    pool.lifecycle = fake
    fake.refuse = False
    hot(pool, fake, "a")
    fake.refuse = True
    pool.unload("a")
    rec = pool.record("a")
    assert rec.state is State.UNLOADING and not rec.busy
    assert pool.unloading_idle() == [("a", rec.gen, rec.program)]
    fake.refuse = False
    pool.retry_stop("a", rec.gen)
    assert fake.stops and pool.record("a").busy


def test_a_load_job_that_cannot_start_fails_the_load() -> None:
    """Regression: a model whose load job never started stayed WARMING for good."""
    pool, _, _ = make([ModelEntry("a")])
    pool.lifecycle = _RefusingLifecycle()
    with pytest.raises(LoadFailed):
        pool.ensure_loaded("a", timeout=1)
    rec = pool.record("a")
    assert rec.state is State.FAILED and rec.needs_cleanup and not rec.busy


def test_release_of_an_old_generation_does_not_touch_the_new_one() -> None:
    """Regression: release() was keyed by model id, so in-flight counts of two loads mixed.

    Deterministic: generations are driven by hand through the fake lifecycle.
    """
    pool, fake, _ = make([ModelEntry("a")])
    hot(pool, fake, "a")
    old = pool.begin_request("a")
    pool.unload("a", force=True)
    _, gen, _ = fake.stops[-1]
    pool.stopped("a", gen)
    hot(pool, fake, "a")
    new = pool.begin_request("a")
    assert new.gen != old.gen
    pool.release("a", old.gen)  # the old worker's request ends late
    assert pool.record("a").in_flight == 1, "the new load's request is still in flight"
    pool.release("a", new.gen)
    assert pool.record("a").in_flight == 0


def test_state_stays_dirty_until_the_write_succeeded() -> None:
    """Regression: persisted() cleared the dirty flag before the file was written."""
    pool, fake, _ = make([ModelEntry("a")])
    hot(pool, fake, "a")
    assert pool.dirty
    version, data = pool.persisted()
    assert "a" in data["models"]
    assert pool.dirty, "nothing was written yet"
    pool.saved(version)
    assert not pool.dirty
    # A change between the snapshot and the write keeps the pool dirty.
    version, _ = pool.persisted()
    pool.unload("a")
    pool.saved(version)
    assert pool.dirty


def test_supervisord_availability_is_written_under_the_lock() -> None:
    """Regression: the reaper assigned pool.available from its own thread without the lock."""
    pool, _, _ = make([ModelEntry("a")])
    assert pool.set_available(False) is True
    assert pool.available is False
    with pytest.raises(AttributeError):
        pool.available = True  # type: ignore[misc]


def _wait_for(pred: object, timeout: float = 5.0) -> None:
    import time

    limit = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        assert time.monotonic() < limit, "condition not met"
        time.sleep(0.01)


def test_waiters_per_model_are_capped_and_the_rest_refused_at_once() -> None:
    """Regression: every caller waited for a slow load, and all threads could be taken.

    Deterministic: the load never finishes until the test says so; the waiters are counted
    before the refused caller comes.
    """
    pool, fake, _ = make([ModelEntry("a"), ModelEntry("b")], max_queue_per_model=2)
    pool.ensure_loaded("a", wait=False)
    results: list[object] = []

    def wait() -> None:
        try:
            results.append(pool.begin_request("a", timeout=10).state)
        except Exception as exc:
            results.append(exc)

    threads = [threading.Thread(target=wait) for _ in range(2)]
    for t in threads:
        t.start()
    _wait_for(lambda: pool.record("a").waiters == 2)
    with pytest.raises(NoCapacity) as info:
        pool.begin_request("a", timeout=10)
    assert "max_queue_per_model 2" in str(info.value) and info.value.retry_after
    _, gen, _ = fake.loads[-1]
    pool.became_ready("a", gen, None, 1)
    for t in threads:
        t.join(5)
    assert results == [State.HOT, State.HOT]
    assert pool.record("a").waiters == 0 and pool.record("a").in_flight == 2


def test_waiters_in_all_models_are_capped_below_the_thread_count() -> None:
    pool, fake, _ = make([ModelEntry("a"), ModelEntry("b")])
    pool.max_waiting_total = 1
    pool.ensure_loaded("a", wait=False)
    pool.ensure_loaded("b", wait=False)
    t = threading.Thread(target=lambda: pool.ensure_loaded("a", timeout=10))
    t.start()
    _wait_for(lambda: pool.record("a").waiters == 1)
    with pytest.raises(NoCapacity, match="at most 1 in all"):
        pool.ensure_loaded("b", timeout=10)
    pool.became_ready("a", fake.loads[0][1], None, 1)
    t.join(5)
    assert not t.is_alive()


def test_a_waiter_that_times_out_leaves_the_queue() -> None:
    pool, _, _ = make([ModelEntry("a")], max_queue_per_model=1)
    pool.ensure_loaded("a", wait=False)
    with pytest.raises(LoadTimeout):
        pool.ensure_loaded("a", timeout=0.05)
    assert pool.record("a").waiters == 0
    with pytest.raises(LoadTimeout):  # not NoCapacity: the queue has room again
        pool.ensure_loaded("a", timeout=0.05)


def test_an_unmeasured_model_counts_its_estimate_against_the_memory_limit() -> None:
    """Regression: a model without memory_mb counted as 0 MB until it was measured."""
    pool, fake, _ = make(
        [ModelEntry("a"), ModelEntry("b")], memory_limit_mb=1500, default_memory_mb=1000
    )
    hot(pool, fake, "a")
    assert pool.record("a").memory() == 1000
    with pool.acquire("a"), pytest.raises(NoCapacity):
        pool.ensure_loaded("b", wait=False)


def test_a_gguf_model_is_estimated_from_its_file_size() -> None:
    entry = ModelEntry("g", backend="llamacpp", model_path="/models/g.gguf")
    pool, fake, _ = make([entry], default_memory_mb=5)
    pool.file_mb = lambda path: 500.0 if path == "/models/g.gguf" else None
    hot(pool, fake, "g")
    assert pool.record("g").memory() == 500.0 + policy.WORKER_OVERHEAD_MB


def test_a_measurement_over_the_limit_evicts_idle_models_lru_first() -> None:
    """Regression: the memory limit was checked only when a load was admitted."""
    pool, fake, clock = make(
        [
            ModelEntry("a", memory_mb=100),
            ModelEntry("b", memory_mb=100),
            ModelEntry("w", memory_mb=100, warmup=True),
        ],
        memory_limit_mb=1000,
    )
    for m in ("w", "a", "b"):
        hot(pool, fake, m)
        clock.now += 1
    assert pool.enforce_memory_limit() == []
    # The workers grow past their estimates: 300 + 400 + 500 = 1200 > 1000.
    for m, mb in (("w", 300.0), ("a", 400.0), ("b", 500.0)):
        rec = pool.record(m)
        pool.observe_worker(m, rec.gen, 0, 0, None, mb)
    assert pool.enforce_memory_limit() == ["a"]  # the LRU one that is not warmup
    assert pool.record("a").state is State.UNLOADING
    assert pool.record("a").history[-1].reason == "memory"
    assert pool.enforce_memory_limit() == []  # 300 + 500 once a has stopped


def test_a_model_whose_entry_changed_is_drained_and_reloaded() -> None:
    """Regression: a worker kept serving the spec it was started with after an entry change."""
    from dataclasses import replace as dc_replace

    from controlplane.specs import wanted_fingerprint

    entry = ModelEntry("a", backend="ollama")
    pool, fake, _ = make([entry])
    hot(pool, fake, "a")
    gen = pool.record("a").gen
    pool.started_with("a", gen, wanted_fingerprint(entry, pool.settings))
    assert pool.reload_changed() == []
    pool.set_settings(dc_replace(pool.settings, ollama_base_url="http://127.0.0.1:1"))
    assert pool.reload_changed() == ["a"]
    rec = pool.record("a")
    assert rec.state is State.UNLOADING and rec.unload_reason == "config_changed"
    pool.stopped("a", gen)
    assert pool.record("a").state is State.WARMING, "loaded again at once"
    assert len(fake.loads) == 2


def test_a_new_pinned_port_moves_a_loaded_model() -> None:
    from controlplane.specs import wanted_fingerprint

    entry = ModelEntry("a")
    pool, fake, _ = make([entry])
    hot(pool, fake, "a")
    rec = pool.record("a")
    pool.started_with("a", rec.gen, wanted_fingerprint(entry, pool.settings))
    pool.replace_entry(ModelEntry("a", ttl_minutes=3))
    assert pool.reload_changed() == []
    pool.replace_entry(ModelEntry("a", port=(rec.port or 0) + 5))
    assert pool.reload_changed() == ["a"]


def test_a_model_that_alone_exceeds_the_limit_is_refused_once_measured() -> None:
    """Regression: admitted on its estimate, evicted on its measurement, admitted again on the
    estimate at the next request: a load per request."""
    pool, fake, _ = make([ModelEntry("big", memory_mb=500)], memory_limit_mb=1000)
    hot(pool, fake, "big")
    rec = pool.record("big")
    pool.observe_worker("big", rec.gen, 0, 0, None, 1500.0)
    assert pool.enforce_memory_limit() == ["big"]
    pool.stopped("big", rec.gen)
    with pytest.raises(NoCapacity, match="needs 1500 MB"):
        pool.ensure_loaded("big", wait=False)
    assert len(fake.loads) == 1


def test_a_model_with_waiters_is_not_evicted_before_they_are_counted() -> None:
    pool, _, _ = make([ModelEntry("a", memory_mb=100)], memory_limit_mb=150)
    pool.ensure_loaded("a", wait=False)
    t = threading.Thread(target=lambda: pool.release("a", pool.begin_request("a", 30).gen))
    with pool._lock:  # the waiter is counted but has not run since the model became HOT
        t.start()
        deadline = time.monotonic() + 5
        # Nothing notifies when a waiter queues: look again every 10 ms (the wait lets it in).
        while pool._records["a"].waiters != 1 and time.monotonic() < deadline:
            pool._changed.wait(0.01)
        assert pool._records["a"].waiters == 1
        rec = pool._records["a"]
        rec.state, rec.measured_mb = State.HOT, 200.0
        assert policy.evict_over_limit(pool._views(), 150) == ()
        pool._changed.notify_all()  # the waiter now finds its model HOT and is served
    t.join(5)
    assert not t.is_alive() and pool.record("a").in_flight == 0


def test_generations_are_not_reused_by_a_model_registered_again() -> None:
    """Regression: a new record started at generation 0 again, so a late release of the
    deleted model's request decremented the new model's count."""
    pool, fake, _ = make([ModelEntry("a")])
    hot(pool, fake, "a")
    old = pool.begin_request("a")
    pool.mark_deleting("a")
    pool.stopped("a", fake.stops[-1][1])
    pool.add_entry(ModelEntry("a"))
    hot(pool, fake, "a")
    new = pool.begin_request("a")
    assert new.gen != old.gen
    pool.release("a", old.gen)
    assert pool.record("a").in_flight == 1


def test_relayed_requests_and_waiters_share_one_thread_budget() -> None:
    """Streams hold a thread each too: with the budget taken, a request is refused at once
    rather than queued behind them (the control API keeps its reserved threads)."""
    pool, fake, _ = make([ModelEntry("a"), ModelEntry("b")])
    pool.max_waiting_total = 2
    hot(pool, fake, "a")
    first, second = pool.begin_request("a"), pool.begin_request("a")
    with pytest.raises(NoCapacity, match="2 are being relayed"):
        pool.begin_request("a")
    with pytest.raises(NoCapacity, match="busy"):
        pool.ensure_loaded("b", timeout=1)  # a waiter would need a thread too
    pool.release("a", first.gen)
    third = pool.begin_request("a")
    for r in (second, third):
        pool.release("a", r.gen)
    assert pool._held == 0 and pool.record("a").in_flight == 0


def test_a_load_that_finishes_during_a_drain_is_unloaded_too() -> None:
    """Regression: a model WARMING when the drain began became HOT and stayed loaded, so the
    drain (``modelpool down``) waited for it until its whole timeout."""
    pool, fake, _ = make([ModelEntry("a"), ModelEntry("b")])
    hot(pool, fake, "a")
    pool.ensure_loaded("b", wait=False)
    _, gen_b, _ = fake.loads[-1]
    result: list[list[str]] = []
    t = threading.Thread(target=lambda: result.append(pool.drain(10)))
    t.start()
    assert pool.wait_for(lambda: len(fake.stops) == 1, 5)  # a, at once
    pool.stopped("a", fake.stops[0][1])
    pool.became_ready("b", gen_b, None, 4243)
    assert pool.record("b").state is State.UNLOADING
    assert pool.wait_for(lambda: len(fake.stops) == 2, 5)
    pool.stopped("b", fake.stops[1][1])
    t.join(5)
    assert result == [[]]
