"""Leases: the pure rules (core/leases.py) and the pool's bookkeeping, with a fake clock."""

from __future__ import annotations

import threading

import pytest

from controlplane.core import leases
from controlplane.core.leases import Lease
from controlplane.core.states import State
from controlplane.errors import Conflict, InvalidInput, NoCapacity, UnknownLease
from controlplane.settings import ModelEntry
from tests.test_pool import hot, make


@pytest.mark.parametrize(
    ("value", "ok"),
    [(5, True), (7.5, True), (86400, True), (4.9, False), (0, False), (-1, False), (86401, False),
     (True, False), ("10", False), (float("nan"), False), (float("inf"), False), (None, False)],
)  # fmt: skip
def test_seconds(value: object, ok: bool) -> None:
    if ok:
        assert leases.check_seconds(value) == float(value)  # type: ignore[arg-type]
    else:
        with pytest.raises(ValueError, match=r"^seconds: "):
            leases.check_seconds(value)


def test_holder() -> None:
    assert leases.check_holder(None) == ""
    assert leases.check_holder("architect-1") == "architect-1"
    for bad in (5, "x" * 201, ["a"]):
        with pytest.raises(ValueError, match=r"^holder: "):
            leases.check_holder(bad)


def test_lapse_keeps_the_live_and_says_when_the_last_lapsed() -> None:
    a, b, c = Lease("a", "", 0, 10), Lease("b", "", 0, 20), Lease("c", "", 0, 30)
    assert leases.lapse({"a": a, "b": b, "c": c}, 5) == ({"a": a, "b": b, "c": c}, None)
    assert leases.lapse({"a": a, "b": b, "c": c}, 25) == ({"c": c}, 20)
    assert leases.lapse({"a": a}, 10) == ({}, 10)  # ends at expires_at


def test_restore_drops_the_lapsed_and_the_malformed() -> None:
    saved = [
        {"lease_id": "a", "holder": "x", "created_at": 1, "expires_at": 100},
        {"lease_id": "b", "holder": "y", "created_at": 1, "expires_at": 5},
        {"lease_id": "c"},
        "junk",
    ]
    assert leases.restore(saved, 50) == {"a": Lease("a", "x", 1.0, 100.0)}
    assert leases.restore({"not": "a list"}, 0) == {}


def test_a_leased_model_neither_expires_nor_is_evicted() -> None:
    pool, fake, clock = make([ModelEntry("a"), ModelEntry("b")], max_concurrent_models=1)
    hot(pool, fake, "a")
    lease = pool.add_lease("a", 600, "agent")
    clock.now += 5 * 60  # far past the TTL (1 min) and grace, within the lease
    pool.expire(clock())
    assert pool.record("a").state is State.HOT
    with pytest.raises(NoCapacity):
        pool.ensure_loaded("b", wait=False)  # the one slot is held
    pool.end_lease("a", lease.lease_id)
    assert pool.record("a").deadline == pytest.approx(clock() + 60)  # the TTL runs from now
    done = threading.Event()
    threading.Thread(target=lambda: (pool.ensure_loaded("b", wait=False), done.set())).start()
    assert pool.wait_for(lambda: len(fake.stops) == 1, 5)  # now a is evicted for b
    assert fake.stops[0][0] == "a" and pool.record("a").state is State.UNLOADING
    pool.stopped("a", fake.stops[0][1])
    assert done.wait(5)


def test_the_ttl_runs_from_the_lapse() -> None:
    pool, fake, clock = make([ModelEntry("a")])
    hot(pool, fake, "a")
    started = clock()
    pool.add_lease("a", 120, None)
    clock.now += 300
    pool.expire(clock())
    rec = pool.record("a")
    assert rec.leases == {}
    assert rec.deadline == pytest.approx(started + 120 + 60)  # lapsed at +120, TTL 1 min
    assert rec.state is State.UNLOADING  # past that deadline and its grace too: expired


def test_a_cold_model_starts_loading_for_a_lease() -> None:
    pool, fake, _ = make([ModelEntry("a")])
    lease = pool.add_lease("a", 60, "x")
    assert pool.record("a").state is State.WARMING and fake.loads
    assert pool.persisted()[1]["models"]["a"]["leases"][0]["lease_id"] == lease.lease_id


def test_renew_end_and_errors() -> None:
    pool, fake, clock = make([ModelEntry("a")])
    hot(pool, fake, "a")
    lease = pool.add_lease("a", 60, "x")
    clock.now += 30
    renewed = pool.renew_lease("a", lease.lease_id, 600)
    assert renewed.expires_at == clock() + 600 and renewed.created_at == lease.created_at
    with pytest.raises(InvalidInput, match="seconds"):
        pool.renew_lease("a", lease.lease_id, -5)
    with pytest.raises(UnknownLease):
        pool.renew_lease("a", "nope", 60)
    with pytest.raises(Conflict, match="x"):
        pool.unload("a")
    pool.unload("a", force=True)  # force ends the leases
    assert pool.record("a").leases == {}
    with pytest.raises(UnknownLease):
        pool.end_lease("a", lease.lease_id)


def test_a_lapsed_lease_cannot_be_renewed() -> None:
    pool, fake, clock = make([ModelEntry("a")])
    hot(pool, fake, "a")
    lease = pool.add_lease("a", 10, None)
    clock.now += 11
    with pytest.raises(UnknownLease):
        pool.renew_lease("a", lease.lease_id, 60)


def test_leases_are_restored_at_adoption() -> None:
    pool, _, clock = make([ModelEntry("a")])
    saved = [
        {"lease_id": "keep", "holder": "h", "created_at": clock() - 5, "expires_at": clock() + 50},
        {"lease_id": "gone", "holder": "h", "created_at": clock() - 5, "expires_at": clock() - 1},
    ]
    assert pool.adopt("a", 8051, 1234, None, "fp", saved)
    assert set(pool.record("a").leases) == {"keep"}
