"""Eviction (pure, ``core.eviction`` and ``policy.plan_capacity``): priority, reload cost and
residency, as table tests; then the pool applying them with a fake clock."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from controlplane.core import eviction
from controlplane.core.policy import ModelView, evict_over_limit, plan_capacity
from controlplane.core.states import State
from controlplane.errors import LoadTimeout, NoCapacity
from controlplane.pool import ModelPool
from controlplane.records import Lifecycle
from controlplane.settings import ModelEntry, parse_settings


def view(mid: str, **kw: Any) -> ModelView:
    kw.setdefault("state", State.HOT)
    kw.setdefault("memory_mb", 1000.0)
    kw.setdefault("loaded_at", 0.0)
    return ModelView(model_id=mid, warmup=kw.pop("warmup", False), **kw)


@pytest.mark.parametrize(
    ("load_seconds", "rate", "expected"),
    [
        (10.0, 0.0, 0.0),  # never asked for: free to evict
        (10.0, 1.0, 10.0),  # asked for every second: 10 s of reload per second away
        (10.0, 0.1, 1.0),  # a tenth as often: a tenth of the cost
        (1.0, 2.0, 2.0),  # quick to load but asked for twice a second: kept over the 10 s one
        (None, 1.0, eviction.DEFAULT_LOAD_SECONDS),  # never measured: the default load time
    ],
)
def test_cost_is_the_expected_reload_time(
    load_seconds: float | None, rate: float, expected: float
) -> None:
    m = view("m", load_seconds=load_seconds, rate=rate)
    assert eviction.cost(m) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("victim", "for_priority", "allowed"),
    [
        ("low", "low", True),
        ("normal", "high", True),
        ("high", "high", True),
        ("high", "normal", False),  # never for a lower priority
        ("medium", "low", False),
        ("critical", "critical", False),  # critical never
    ],
)
def test_priority_rules(victim: str, for_priority: str, allowed: bool) -> None:
    assert eviction.may_evict_for(view("v", priority=victim), for_priority) is allowed


def test_order_is_priority_then_cost_then_least_recent() -> None:
    models = [
        view("busy-slow", load_seconds=60.0, rate=0.1, last_used=1.0),
        view("idle-slow", load_seconds=60.0, rate=0.0, last_used=9.0),
        view("busy-fast", load_seconds=1.0, rate=0.1, last_used=2.0),
        view("high-idle", priority="high", load_seconds=1.0, last_used=0.0),
        view("low-busy", priority="low", load_seconds=60.0, rate=1.0, last_used=9.0),
        view("idle-fast-older", load_seconds=1.0, rate=0.0, last_used=3.0),
    ]
    names = [m.model_id for m in eviction.order(models)]
    assert names == [
        "low-busy",  # the lowest priority goes first, whatever it costs
        "idle-fast-older",  # cost 0, least recently used of the two
        "idle-slow",  # cost 0
        "busy-fast",  # cost about 1
        "busy-slow",  # cost about 60
        "high-idle",
    ]


def test_the_cheapest_goes_not_the_least_recently_used() -> None:
    models = [
        view("old-but-busy", load_seconds=30.0, rate=0.05, last_used=1.0),
        view("recent-idle", load_seconds=30.0, rate=0.0, last_used=50.0),
    ]
    plan = plan_capacity(models, "x", 0, max_models=2, memory_limit_mb=0, now=100.0)
    assert plan.evict == ("recent-idle",)
    lru = plan_capacity(models, "x", 0, max_models=2, memory_limit_mb=0)  # equal costs: LRU
    assert lru.evict == ("recent-idle",)


@pytest.mark.parametrize(
    ("models", "priority", "evict", "reason"),
    [
        ([view("h", priority="high")], "normal", (), "busy, warmup or of higher priority"),
        ([view("h", priority="high")], "high", ("h",), ""),
        ([view("c", priority="critical")], "critical", (), "of higher priority"),
        ([view("l", priority="low"), view("n")], "normal", ("l",), ""),
    ],
)
def test_plan_never_evicts_for_a_lower_priority(
    models: list[ModelView], priority: str, evict: tuple[str, ...], reason: str
) -> None:
    max_models = len(models)
    plan = plan_capacity(models, "x", 0, max_models, 0, priority=priority, now=100.0)
    assert plan.evict == evict
    assert reason in plan.reason


def test_a_resident_model_is_not_evicted_and_the_plan_says_when_it_may_be() -> None:
    models = [view("young", loaded_at=90.0), view("younger", loaded_at=95.0)]
    plan = plan_capacity(models, "x", 0, 2, 0, now=100.0, min_resident_seconds=30)
    assert not plan.ok and plan.evict == () and not plan.wait
    assert plan.room_at == 120.0  # the first to pass its residency makes enough room
    assert "2 still resident (min_resident_seconds)" in plan.reason
    later = plan_capacity(models, "x", 0, 2, 0, now=121.0, min_resident_seconds=30)
    assert later.evict == ("young",)


@pytest.mark.parametrize(
    ("newcomer_idle_until", "popular_load", "expected_evict", "expected_room_at"),
    [
        # The newcomer (rarely used) may go in 0.8 s, sooner than the popular model would load
        # again (2 s): wait for it rather than evict the popular one.
        (100.8, 2.0, (), 100.8),
        # Its guard lasts longer than the popular model's reload: evict the popular one now.
        (103.0, 2.0, ("popular",), None),
        # A popular model quick to reload (0.5 s) is not worth 0.8 s of waiting.
        (100.8, 0.5, ("popular",), None),
    ],
)
def test_a_cheaper_model_about_to_be_free_is_waited_for(
    newcomer_idle_until: float,
    popular_load: float,
    expected_evict: tuple[str, ...],
    expected_room_at: float | None,
) -> None:
    models = [
        # Idle for 5 s, but asked for often.
        view("popular", last_used=95.0, rate=1.0, load_seconds=popular_load),
        # Just used by the agent that loaded it; asked for rarely.
        view("newcomer", last_used=newcomer_idle_until - 1.0, rate=0.05, load_seconds=1.0),
    ]
    plan = plan_capacity(
        models, "x", 0, 2, 0, now=100.0, min_resident_seconds=30.0,
        resident_load_multiple=0.5, min_idle_seconds=1.0,
    )  # fmt: skip
    assert plan.evict == expected_evict
    assert plan.room_at == expected_room_at
    if expected_room_at is not None:
        assert plan.waitable and not plan.ok and not plan.wait
        assert "'newcomer' may go in 0.8 s, cheaper to reload than 'popular'" in plan.reason
    lru = plan_capacity(models, "x", 0, 2, 0, now=100.0, min_idle_seconds=1.0, order="lru")
    assert lru.evict == ("popular",)  # plain LRU takes what is free now


@pytest.mark.parametrize(
    ("models", "need_mb", "waitable"),
    [
        # Busy, leased, resident or of higher priority: they go some day, so waiting may help.
        ([view("busy", in_flight=2), view("boss", priority="critical")], 1000.0, True),
        # Warmup models never go: with them alone the node is full, so waiting cannot help.
        ([view("w1", warmup=True), view("w2", warmup=True)], 1000.0, False),
        # Beside the warmup model there is memory enough once the busy one is gone.
        ([view("w1", warmup=True), view("busy", in_flight=1)], 1000.0, True),
        # Beside the warmup models it would never fit in memory.
        ([view("w1", warmup=True, memory_mb=3000.0), view("busy", in_flight=1)], 1500.0, False),
    ],
)
def test_a_plan_says_whether_waiting_can_ever_make_room(
    models: list[ModelView], need_mb: float, waitable: bool
) -> None:
    plan = plan_capacity(models, "x", need_mb, 2, 4000.0, now=100.0)
    assert not plan.ok and not plan.evict
    assert plan.waitable is waitable


def test_memory_enforcement_spares_critical_models() -> None:
    models = [
        view("crit", priority="critical", memory_mb=6000.0, last_used=0.0),
        view("norm", memory_mb=3000.0, last_used=5.0),
    ]
    assert evict_over_limit(models, 4000) == ("norm",)


# --- the pool applies them -------------------------------------------------------------------


class Jobs(Lifecycle):
    def __init__(self) -> None:
        self.loads: list[tuple[str, int]] = []
        self.stops: list[str] = []

    def start_load(self, model_id: str, gen: int, adopt: bool) -> None:
        self.loads.append((model_id, gen))

    def start_stop(self, model_id: str, gen: int, force: bool) -> None:
        self.stops.append(model_id)

    def start_cleanup(self, model_id: str, gen: int) -> None:
        pass

    def hurry(self, model_id: str, gen: int) -> None:
        pass


def pool_of(entries: list[ModelEntry], **settings: Any) -> tuple[ModelPool, Jobs, list[float]]:
    now = [1000.0]
    pool = ModelPool(parse_settings(settings), tuple(entries), clock=lambda: now[0])
    jobs = Jobs()
    pool.lifecycle = jobs
    return pool, jobs, now


def hot(pool: ModelPool, jobs: Jobs, model: str, now: list[float], load_for: float = 0) -> None:
    pool.ensure_loaded(model, wait=False)
    now[0] += load_for
    pool.became_ready(model, jobs.loads[-1][1], 100.0, 1)


def test_two_models_taking_turns_over_one_slot_wait_out_the_residency() -> None:
    pool, jobs, now = pool_of(
        [ModelEntry("a"), ModelEntry("b")],
        max_concurrent_models=1,
        min_resident_seconds=30,
        resident_load_multiple=0,  # every model resident for 30 s
    )
    hot(pool, jobs, "a", now)
    now[0] += 10
    with pytest.raises(NoCapacity) as info:
        pool.ensure_loaded("b", wait=False)
    assert info.value.retry_after == pytest.approx(20.0)
    assert jobs.stops == []  # a stays
    now[0] += 20  # a's residency is over: it makes room
    with pytest.raises(LoadTimeout):  # b waits for a to stop; here nobody reports the stop
        pool.ensure_loaded("b", timeout=0.1)
    assert jobs.stops == ["a"]


def test_residency_is_a_multiple_of_the_load_time_capped_by_min_resident_seconds() -> None:
    pool, jobs, now = pool_of(
        [ModelEntry("quick"), ModelEntry("b")],
        max_concurrent_models=1,
        min_resident_seconds=30,
        resident_load_multiple=2,
    )
    hot(pool, jobs, "quick", now, load_for=4)  # resident for 2 x 4 s
    now[0] += 5
    with pytest.raises(NoCapacity) as info:
        pool.ensure_loaded("b", wait=False)
    assert info.value.retry_after == pytest.approx(3.0)
    now[0] += 3
    with pytest.raises(LoadTimeout):  # its residency is over: it makes room
        pool.ensure_loaded("b", timeout=0.1)
    assert jobs.stops == ["quick"]
    # A model that takes 20 s to load is resident for min_resident_seconds (30), not 40.
    pool2, jobs2, now2 = pool_of(
        [ModelEntry("slow"), ModelEntry("b")],
        max_concurrent_models=1,
        min_resident_seconds=30,
        resident_load_multiple=2,
    )
    hot(pool2, jobs2, "slow", now2, load_for=20)
    now2[0] += 1
    with pytest.raises(NoCapacity) as info:
        pool2.ensure_loaded("b", wait=False)
    assert info.value.retry_after == pytest.approx(29.0)


@pytest.mark.parametrize(
    ("load_seconds", "multiple", "cap", "expected"),
    [
        (1.0, 2.0, 30.0, 2.0),
        (4.0, 2.0, 30.0, 8.0),
        (20.0, 2.0, 30.0, 30.0),  # capped
        (None, 2.0, 30.0, 10.0),  # never measured: the default load time
        (4.0, 0.0, 30.0, 30.0),  # multiple 0: min_resident_seconds for all
        (4.0, 2.0, 0.0, 0.0),  # min_resident_seconds 0: no residency at all
    ],
)
def test_residency_table(
    load_seconds: float | None, multiple: float, cap: float, expected: float
) -> None:
    m = view("m", loaded_at=100.0, load_seconds=load_seconds)
    assert eviction.residency(m, cap, multiple) == pytest.approx(expected)
    assert eviction.resident_until(m, cap, multiple) == pytest.approx(100.0 + expected)


@pytest.mark.parametrize(
    ("last_used", "min_idle", "expected"),
    [
        (100.5, 1.0, 102.0),  # resident until 102 (2 x 1 s load); idle long enough by then
        (101.8, 1.0, 102.8),  # used just before its residency ended: one more idle second
        (150.0, 1.0, 151.0),  # long past its residency, but mid-burst: not for another second
        (150.0, 0.0, 102.0),  # min_idle_seconds 0: residency alone
    ],
)
def test_a_model_used_a_moment_ago_is_not_evicted_mid_burst(
    last_used: float, min_idle: float, expected: float
) -> None:
    m = view("m", loaded_at=100.0, load_seconds=1.0, last_used=last_used)
    assert eviction.resident_until(m, 30.0, 2.0, min_idle) == pytest.approx(expected)
    models = [m]
    before = plan_capacity(
        models, "x", 0, 1, 0, now=expected - 0.01, min_resident_seconds=30.0,
        resident_load_multiple=2.0, min_idle_seconds=min_idle,
    )  # fmt: skip
    assert before.evict == () and before.room_at == pytest.approx(expected)
    after = plan_capacity(
        models, "x", 0, 1, 0, now=expected, min_resident_seconds=30.0,
        resident_load_multiple=2.0, min_idle_seconds=min_idle,
    )  # fmt: skip
    assert after.evict == ("m",)


def test_the_pool_evicts_the_model_that_is_cheapest_to_reload() -> None:
    pool, jobs, now = pool_of(
        [ModelEntry("slow"), ModelEntry("fast"), ModelEntry("new")],
        max_concurrent_models=2,
        min_resident_seconds=0,
    )
    hot(pool, jobs, "slow", now, load_for=40)
    hot(pool, jobs, "fast", now, load_for=1)
    for _ in range(5):  # both in use; "slow" was used least recently
        with pool.acquire("slow"):
            pass
        now[0] += 1
        with pool.acquire("fast"):
            pass
    now[0] += 1
    with pytest.raises(LoadTimeout):  # new waits for the evicted one to stop
        pool.ensure_loaded("new", timeout=0.1)
    assert jobs.stops == ["fast"]  # 1 s to load again, against 40 s


@pytest.mark.parametrize(
    ("since_last", "visit"),
    [
        (0.2, False),  # the next request of a burst
        (eviction.VISIT_GAP_SECONDS - 0.01, False),
        (eviction.VISIT_GAP_SECONDS, True),
        (60.0, True),  # an agent coming back
    ],
)
def test_a_visit_begins_after_a_gap(since_last: float, visit: bool) -> None:
    assert eviction.new_visit(100.0, 100.0 + since_last) is visit
    assert eviction.new_visit(None, 100.0)  # the first request of all


def test_a_model_in_constant_use_counts_a_visit_every_gap() -> None:
    """Requests back to back (each 1 s, the next sent as one ends) are never 2 s apart, yet
    the rate must not fade for a model that is never idle: a visit every 2 s."""
    pool, jobs, now = pool_of([ModelEntry("busy")], max_concurrent_models=1)
    hot(pool, jobs, "busy", now)
    for _ in range(60):
        with pool.acquire("busy"):
            now[0] += 1
    with pool._lock:
        (view,) = pool._views()
    # 30 visits in 60 s, decayed a little: about 30 / RATE_TAU_SECONDS.
    assert view.rate == pytest.approx(30 / eviction.RATE_TAU_SECONDS, rel=0.15)


def test_a_burst_counts_once_and_agents_coming_back_count_each_time() -> None:
    pool, jobs, now = pool_of(
        [ModelEntry("burst"), ModelEntry("returning"), ModelEntry("new")],
        max_concurrent_models=2,
        min_resident_seconds=0,
    )
    hot(pool, jobs, "burst", now, load_for=5)
    hot(pool, jobs, "returning", now, load_for=5)
    for _ in range(3):  # one agent comes back three times
        with pool.acquire("returning"):
            pass
        now[0] += 5
    for _ in range(10):  # another asks ten things in a row, later
        with pool.acquire("burst"):
            pass
        now[0] += 0.2
    now[0] += 5
    with pytest.raises(LoadTimeout):
        pool.ensure_loaded("new", timeout=0.1)
    # More requests, but one visit against three: the burst would cost one reload.
    assert jobs.stops == ["burst"]


def test_a_high_priority_model_is_not_evicted_for_a_low_one() -> None:
    pool, jobs, now = pool_of(
        [ModelEntry("boss", priority="high"), ModelEntry("intern", priority="low")],
        max_concurrent_models=1,
        min_resident_seconds=0,
    )
    hot(pool, jobs, "boss", now)
    now[0] += 3600
    with pytest.raises(NoCapacity) as info:
        pool.ensure_loaded("intern", wait=False)
    assert "of higher priority" in str(info.value)
    assert jobs.stops == [] and pool.record("boss").state is State.HOT


# --- waiting for room, in order ----------------------------------------------------------------


class AsyncJobs(Lifecycle):
    """Loads become ready and stops end a moment later, from threads of their own, as the real
    lifecycle reports them; the order in which loads started is recorded."""

    def __init__(self) -> None:
        self.pool: ModelPool | None = None
        self.started: list[str] = []

    def _later(self, fn: Any, *args: Any) -> None:
        threading.Timer(0.05, fn, args).start()

    def start_load(self, model_id: str, gen: int, adopt: bool) -> None:
        assert self.pool is not None
        self.started.append(model_id)
        self._later(self.pool.became_ready, model_id, gen, 100.0, 1)

    def start_stop(self, model_id: str, gen: int, force: bool) -> None:
        assert self.pool is not None
        self._later(self.pool.stopped, model_id, gen)

    def start_cleanup(self, model_id: str, gen: int) -> None:
        pass

    def hurry(self, model_id: str, gen: int) -> None:
        pass


def test_loads_that_find_no_room_wait_and_are_served_in_arrival_order() -> None:
    names = ["held", "b", "c", "d"]
    pool = ModelPool(
        parse_settings(
            {"max_concurrent_models": 1, "min_resident_seconds": 0, "capacity_wait_seconds": 10}
        ),
        tuple(ModelEntry(m) for m in names),
    )
    jobs = AsyncJobs()
    jobs.pool = pool
    pool.lifecycle = jobs
    held = pool.begin_request("held", timeout=5)  # a request in flight: nothing can be evicted
    served: list[str] = []
    errors: list[BaseException] = []

    def request(model: str) -> None:
        try:
            with pool.acquire(model, timeout=10):
                served.append(model)
        except BaseException as exc:  # reported below
            errors.append(exc)

    def queued(n: int) -> bool:
        return pool.wait_for(lambda: len(pool._room_queue) == n, 5)

    threads = []
    for model in ("b", "c", "d"):  # arrive in this order, all finding no room
        t = threading.Thread(target=request, args=(model,))
        t.start()
        threads.append(t)
        assert queued(len(threads))
    assert jobs.started == ["held"]  # nobody jumped in
    pool.release("held", held.gen)  # room frees: b first, then c, then d
    for t in threads:
        t.join(10)
    assert not errors, errors
    assert jobs.started == ["held", "b", "c", "d"] and served == ["b", "c", "d"]
    assert pool._room_queue == []


class SimulatedWaits(threading.Condition):
    """The pool's condition, with its waits taken on the fake clock: each wait advances the
    clock by its timeout at once and records it."""

    def __init__(self, lock: Any, now: list[float]) -> None:
        super().__init__(lock)
        self.now = now
        self.naps: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.naps.append(-1.0 if timeout is None else timeout)
        self.now[0] += timeout or 0.0
        return super().wait(0)


def test_a_caller_waiting_for_a_residency_wakes_when_it_ends() -> None:
    """Nothing happens when a residency ends: the waiter must wake at that time, not at its
    next one-second poll."""
    pool, jobs, now = pool_of(
        [ModelEntry("a"), ModelEntry("b")],
        max_concurrent_models=1,
        min_resident_seconds=5,
        resident_load_multiple=0,
        capacity_wait_seconds=30,
    )
    hot(pool, jobs, "a", now)
    pool._changed = waits = SimulatedWaits(pool._lock, now)
    now[0] += 4.6
    with pytest.raises(LoadTimeout):  # b waits for a to stop; here nobody reports the stop
        pool.ensure_loaded("b", timeout=0.6)
    assert waits.naps[0] == pytest.approx(0.4)  # a's residency ends 0.4 s later
    assert jobs.stops == ["a"]


def test_a_wait_for_room_ends_in_503_after_capacity_wait_seconds() -> None:
    pool = ModelPool(
        parse_settings(
            {"max_concurrent_models": 1, "min_resident_seconds": 0, "capacity_wait_seconds": 0.3}
        ),
        (ModelEntry("held"), ModelEntry("b")),
    )
    jobs = AsyncJobs()
    jobs.pool = pool
    pool.lifecycle = jobs
    held = pool.begin_request("held", timeout=5)
    began = time.monotonic()
    with pytest.raises(NoCapacity) as info:
        pool.ensure_loaded("b", timeout=10)
    assert 0.3 <= time.monotonic() - began < 3
    assert "capacity_wait_seconds" in str(info.value) and info.value.retry_after
    assert pool._room_queue == []
    # A load call that returns at once never queues.
    with pytest.raises(NoCapacity):
        pool.ensure_loaded("b", wait=False)
    assert time.monotonic() - began < 3
    pool.release("held", held.gen)


def test_the_caller_that_made_room_loads_before_a_later_one() -> None:
    pool = ModelPool(
        parse_settings(
            {"max_concurrent_models": 1, "min_resident_seconds": 0, "capacity_wait_seconds": 10}
        ),
        (ModelEntry("v"), ModelEntry("c"), ModelEntry("e")),
    )
    jobs = AsyncJobs()
    jobs.pool = pool
    pool.lifecycle = jobs
    with pool.acquire("v", timeout=5):
        pass
    got: list[str] = []

    def ask(model: str) -> None:
        pool.ensure_loaded(model, timeout=10)
        got.append(model)

    c = threading.Thread(target=ask, args=("c",))
    c.start()  # evicts v and waits for it to stop
    assert pool.wait_for(lambda: len(pool._room_queue) == 1, 5)
    e = threading.Thread(target=ask, args=("e",))
    e.start()  # arrives while room is being made for c: behind it
    c.join(10)
    e.join(10)
    assert jobs.started == ["v", "c", "e"] and got == ["c", "e"]


def test_while_others_wait_a_model_that_can_never_fit_and_a_warmup_are_refused_at_once() -> None:
    pool = ModelPool(
        parse_settings(
            {
                "max_concurrent_models": 1,
                "memory_limit_mb": 2000,
                "min_resident_seconds": 0,
                "capacity_wait_seconds": 10,
            }
        ),
        (
            ModelEntry("held", memory_mb=500),
            ModelEntry("b", memory_mb=500),
            ModelEntry("huge", memory_mb=5000),
        ),
    )
    jobs = AsyncJobs()
    jobs.pool = pool
    pool.lifecycle = jobs
    held = pool.begin_request("held", timeout=5)
    outcome: list[str] = []

    def wait_for_b() -> None:
        try:
            pool.ensure_loaded("b", timeout=2)
        except LoadTimeout:
            outcome.append("timeout")

    waiter = threading.Thread(target=wait_for_b)
    waiter.start()
    assert pool.wait_for(lambda: len(pool._room_queue) == 1, 5)
    began = time.monotonic()
    with pytest.raises(NoCapacity, match="more than memory_limit_mb"):
        pool.ensure_loaded("huge", timeout=10)
    with pytest.raises(NoCapacity, match="others wait for room"):
        pool.ensure_loaded("b", timeout=10, queue=False)  # a warmup load
    assert time.monotonic() - began < 1
    waiter.join(10)
    assert outcome == ["timeout"]  # it waited its whole load timeout; nobody else got in
    pool.release("held", held.gen)
