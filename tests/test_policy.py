from __future__ import annotations

import pytest

from controlplane.core import policy
from controlplane.core.policy import ModelView, TtlBounds, plan_capacity
from controlplane.core.states import Event, State

B = TtlBounds(default_minutes=15, min_minutes=5, max_minutes=60, grace_minutes=2)


@pytest.mark.parametrize(
    ("ttl", "warmup", "expected"),
    [
        (None, False, 15.0),  # default
        (1.0, False, 5.0),  # clamped up to min
        (120.0, False, 60.0),  # clamped down to max
        (30.0, False, 30.0),
        (0.0, False, 0.0),  # explicit 0: never
        (30.0, True, 0.0),  # warmup: never
    ],
)
def test_effective_ttl(ttl: float | None, warmup: bool, expected: float) -> None:
    assert policy.effective_ttl_minutes(ttl, warmup, B) == expected


def test_deadline_after() -> None:
    assert policy.deadline_after(1000.0, 0.05) == pytest.approx(1003.0)
    assert policy.deadline_after(1000.0, 0) is None


def test_extend_moves_from_the_later_of_deadline_and_now_and_caps() -> None:
    now = 10_000.0
    ext = policy.extend(now + 600, now, 10, B)
    assert ext.deadline == now + 1200 and not ext.clamped
    ext = policy.extend(now - 100, now, 10, B)  # a past deadline extends from now
    assert ext.deadline == now + 600
    ext = policy.extend(now + 3000, now, 30, B)  # would be 80 min: capped at 60
    assert ext.deadline == now + 3600 and ext.clamped


def view(mid: str, state: State = State.HOT, **kw: object) -> ModelView:
    return ModelView(model_id=mid, state=state, warmup=bool(kw.pop("warmup", False)), **kw)  # type: ignore[arg-type]


def test_due_events() -> None:
    now = 100.0
    models = [
        view("expired", deadline=99.0),
        view("fresh", deadline=101.0),
        view("busy", deadline=50.0, in_flight=1),
        view("never", deadline=None),
        view("cooling", State.COOLING, deadline=80.0, grace_until=99.0),
        view("grace", State.COOLING, deadline=80.0, grace_until=120.0),
        view("cold", State.COLD),
    ]
    assert policy.due_events(models, now) == [
        ("expired", Event.TTL_EXPIRED),
        ("cooling", Event.GRACE_EXPIRED),
    ]
    assert policy.next_wakeup(models) == 99.0  # the busy one is not due while it is busy


def test_capacity_fits() -> None:
    plan = plan_capacity([view("a")], "b", 0, max_models=2, memory_limit_mb=0)
    assert plan.ok and plan.evict == ()


def test_capacity_evicts_least_recently_used_idle_non_warmup() -> None:
    models = [
        view("warm", warmup=True, last_used=1.0),
        view("old", last_used=2.0),
        view("busy", last_used=0.5, in_flight=2),
        view("new", last_used=9.0),
    ]
    plan = plan_capacity(models, "x", 0, max_models=4, memory_limit_mb=0)
    assert not plan.ok and plan.evict == ("old",) and plan.wait


def test_capacity_waits_for_models_already_unloading() -> None:
    models = [view("a"), view("b", State.UNLOADING)]
    plan = plan_capacity(models, "x", 0, max_models=2, memory_limit_mb=0)
    assert not plan.ok and plan.evict == () and plan.wait


def test_capacity_refused_when_nothing_can_be_evicted() -> None:
    models = [view("w", warmup=True), view("busy", in_flight=1)]
    plan = plan_capacity(models, "x", 0, max_models=2, memory_limit_mb=0)
    assert not plan.ok and not plan.wait and not plan.evict
    assert "max_concurrent_models 2" in plan.reason


def test_capacity_memory_limit_evicts_enough() -> None:
    models = [
        view("a", memory_mb=4000, last_used=1),
        view("b", memory_mb=4000, last_used=2),
        view("c", memory_mb=4000, last_used=3),
    ]
    plan = plan_capacity(models, "x", 7000, max_models=10, memory_limit_mb=16000)
    assert plan.evict == ("a",)  # 8000 + 7000 fits
    plan = plan_capacity(models, "x", 9000, max_models=10, memory_limit_mb=16000)
    assert plan.evict == ("a", "b")
    plan = plan_capacity(models, "x", 20000, max_models=10, memory_limit_mb=16000)
    assert not plan.ok and not plan.wait and "memory_limit_mb" in plan.reason


def test_candidate_itself_and_cold_models_do_not_count() -> None:
    models = [view("x", State.FAILED), view("c", State.COLD), view("a")]
    assert plan_capacity(models, "x", 0, max_models=2, memory_limit_mb=0).ok


def test_backoff() -> None:
    assert policy.retry_not_before(0, 100.0) == 100.0
    assert policy.retry_not_before(1, 100.0) == 110.0
    assert policy.retry_not_before(2, 100.0) == 120.0
    assert policy.retry_not_before(3, 100.0) == 140.0
    assert policy.retry_not_before(50, 100.0) == 400.0
