"""ModelPool with a fake lifecycle and a fake clock: decisions without processes or sleeps."""

from __future__ import annotations

import threading

import pytest

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
    base = {"min_ttl_minutes": 0.01, "default_ttl_minutes": 1, "grace_period_minutes": 0.5}
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
    pool.available = False
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
