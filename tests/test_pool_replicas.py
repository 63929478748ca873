"""The pool's side of replicas, without processes: balancing, scaling up and down, pinning,
placement on other nodes, and what a crash, a delete or a lowered max do to them."""

from __future__ import annotations

from typing import Any

import pytest

from controlplane.core.states import State
from controlplane.errors import BackendDown, Conflict
from controlplane.nodeconfig import NodeConfig
from controlplane.pool import ModelPool
from controlplane.settings import ModelEntry, parse_settings
from tests.test_pool_nodes import Jobs

NODES = ("a", "b", "c")


def make(
    *entries: ModelEntry, nodes: tuple[str, ...] = NODES, slots: int = 5, **settings: Any
) -> tuple[ModelPool, Jobs, list[float]]:
    configs = [
        NodeConfig(n, f"http://127.0.0.{i}:9001", "/p", f"127.0.0.{i}", max_concurrent_models=slots)
        for i, n in enumerate(nodes, start=2)
    ]
    base = {
        "local_node": False,
        "nodes": configs,
        "scale_up_in_flight": 2,
        "scale_up_seconds": 5,
        "scale_down_idle_minutes": 1,
        "min_idle_seconds": 0,
        "min_resident_seconds": 0,
    }
    base.update(settings)
    now = [1000.0]
    pool = ModelPool(parse_settings(base), entries, clock=lambda: now[0])
    pool.configure_nodes(configs)
    for n in nodes:
        pool.node_reachable(n, {})
    jobs = Jobs()
    pool.lifecycle = jobs
    return pool, jobs, now


def entry(model: str = "m", low: int = 1, high: int = 3, **more: Any) -> ModelEntry:
    return ModelEntry(model, replicas=(low, high), **more)


def ready(pool: ModelPool, jobs: Jobs) -> str:
    """The worker of the last load became ready; returns its key."""
    key, gen, _ = jobs.loads[-1]
    pool.became_ready(key, gen, 100.0, 4242)
    return key


def serving(pool: ModelPool, model: str = "m") -> list[Any]:
    return [r for r in pool.replica_records(model) if r.state is State.HOT]


def busy(pool: ModelPool, now: list[float], n: int, model: str = "m") -> list[Any]:
    """``n`` requests in flight, then the load stays for ``scale_up_seconds``."""
    held = [pool.begin_request(model) for _ in range(n)]
    pool.scale_replicas()  # busy from now
    now[0] += 5
    return held


def two_serving(**more: Any) -> tuple[ModelPool, Jobs, list[float]]:
    """A pool whose model ``m`` serves from two replicas, nothing in flight."""
    pool, jobs, now = make(entry(**more))
    pool.ensure_loaded("m", wait=False)
    ready(pool, jobs)
    held = busy(pool, now, 4)
    assert pool.scale_replicas()
    ready(pool, jobs)
    for rec in held:
        pool.release("m", rec.gen)
    return pool, jobs, now


def test_a_busy_model_gets_a_replica_on_another_node_and_requests_spread() -> None:
    pool, jobs, now = make(entry())
    pool.ensure_loaded("m", wait=False)
    ready(pool, jobs)
    held = busy(pool, now, 4)
    assert pool.scale_replicas() == [("m", "up", "4.0 in flight per replica")]
    assert jobs.loads[-1][0] == "m#2"
    ready(pool, jobs)
    nodes = {r.node for r in serving(pool)}
    assert len(nodes) == 2, "a replica of an Ollama model goes to a node without one"
    # The next requests go to the new replica, which has none in flight, until it is even.
    more = [pool.begin_request("m") for _ in range(4)]
    assert [r.key for r in more] == ["m#2"] * 4
    assert {r.key: r.total_in_flight for r in pool.replica_records("m")} == {"m": 4, "m#2": 4}
    for rec in held + more:
        pool.release("m", rec.gen)
    assert all(r.total_in_flight == 0 for r in pool.replica_records("m"))
    assert pool.stats.snapshot().scale_events[("m", "up")] == 1


def test_no_flapping_and_no_more_than_max() -> None:
    pool, jobs, now = make(entry(high=2))
    pool.ensure_loaded("m", wait=False)
    ready(pool, jobs)
    busy(pool, now, 8)
    assert pool.scale_replicas()
    ready(pool, jobs)
    assert pool.scale_replicas() == [], "at most one change per scale_up_seconds"
    now[0] += 10
    assert pool.scale_replicas() == [], "max 2"
    assert len(serving(pool)) == 2


def test_an_idle_replica_beyond_min_is_drained_and_the_last_one_stays() -> None:
    pool, _jobs, now = two_serving()
    now[0] += 30
    assert pool.scale_replicas() == [], "idle for less than scale_down_idle_minutes"
    now[0] += 61
    (change,) = pool.scale_replicas()
    assert change[:2] == ("m", "down")
    states = sorted(r.state.value for r in pool.replica_records("m"))
    assert states == ["HOT", "UNLOADING"]
    now[0] += 600
    assert pool.scale_replicas() == [], "the last replica follows the TTL, not scaling"
    assert pool.stats.snapshot().scale_events[("m", "down")] == 1


def test_min_replicas_come_up_once_the_model_serves() -> None:
    pool, jobs, _ = make(entry(low=2))
    assert pool.scale_replicas() == [], "nothing loads a model nobody asked for"
    pool.ensure_loaded("m", wait=False)
    ready(pool, jobs)
    assert pool.scale_replicas()[0][1] == "up"
    assert jobs.loads[-1][0] == "m#2"


def test_a_replica_of_an_ollama_model_never_shares_a_node() -> None:
    pool, jobs, now = make(entry(), nodes=("a",))
    pool.ensure_loaded("m", wait=False)
    ready(pool, jobs)
    busy(pool, now, 8)
    assert pool.scale_replicas() == []
    assert "holds a replica of the model already" in pool.scaling_of("m").blocked
    assert pool.describe(pool.record("m"))["replica_counts"]["blocked"]


def test_a_llamacpp_model_may_run_two_replicas_on_one_node() -> None:
    e = entry(backend="llamacpp", model_path="/x.gguf")
    pool, jobs, now = make(e, nodes=("a",))
    pool.ensure_loaded("m", wait=False)
    ready(pool, jobs)
    busy(pool, now, 8)
    assert pool.scale_replicas()
    ready(pool, jobs)
    recs = serving(pool)
    assert len(recs) == 2 and recs[0].port != recs[1].port


def test_scaling_up_evicts_nothing() -> None:
    pool, jobs, now = make(entry(), ModelEntry("other"), nodes=("a", "b"), slots=1)
    pool.ensure_loaded("m", wait=False)
    ready(pool, jobs)
    pool.ensure_loaded("other", wait=False)
    ready(pool, jobs)
    busy(pool, now, 8)
    assert pool.scale_replicas() == []
    assert pool.record("other").state is State.HOT
    assert pool.scaling_of("m").blocked


def test_a_retry_avoids_the_replica_that_failed() -> None:
    pool, _jobs, _now = two_serving(high=2)
    key = (pool.try_begin_request("m") or ("", 0, 0, ""))[3]
    retry = pool.try_begin_request("m", frozenset({key}))
    assert retry is not None and retry[3] != key
    assert pool.begin_request("m", avoid=frozenset({key})).key == retry[3]
    assert pool.try_begin_request("m", frozenset({"m", "m#2"})) is None
    with pytest.raises(BackendDown):
        pool.begin_request("m", avoid=frozenset({"m", "m#2"}))


def test_a_crashed_replica_leaves_the_others_serving() -> None:
    pool, _jobs, _now = two_serving(high=2)
    first = pool.record("m")
    pool.process_gone("m", first.gen, operator_stop=False, detail="killed")
    assert pool.record("m").state is State.FAILED
    assert {pool.begin_request("m").key for _ in range(3)} == {"m#2"}
    view = pool.describe(pool.record("m"))
    assert view["state"] == "HOT", "the model shows its best replica's state"
    assert view["replica_counts"]["serving"] == 1


def test_a_pinned_count_steps_there_and_is_checked() -> None:
    pool, jobs, now = make(entry())
    pool.ensure_loaded("m", wait=False)
    ready(pool, jobs)
    with pytest.raises(Conflict, match=r"outside model 'm''s replicas min..max \(1..3\)"):
        pool.pin_replicas("m", 4)
    pool.pin_replicas("m", 3)
    assert pool.scale_replicas()[0][1:] == ("up", "pinned at 3")
    ready(pool, jobs)
    assert pool.scale_replicas() == [], "one step per scale_up_seconds"
    now[0] += 5
    assert pool.scale_replicas()[0][1] == "up"
    ready(pool, jobs)
    assert len(serving(pool)) == 3
    assert {r.node for r in serving(pool)} == set(NODES)
    pool.pin_replicas("m", 1)
    assert pool.scale_replicas()[0][1] == "down"


def test_a_lowered_max_drains_the_replicas_above_it() -> None:
    pool, _jobs, now = two_serving()
    pool.replace_entry(entry(high=1))
    assert pool.scale_replicas() == [], "one change per scale_up_seconds, this one too"
    now[0] += 5
    assert pool.scale_replicas() == [("m", "down", "above max")]
    assert pool.record("m").state is State.HOT


def test_deleting_a_model_unloads_and_drops_every_replica() -> None:
    pool, _jobs, _now = two_serving()
    for r in pool.replica_records("m"):
        pool.release("m", r.gen)
    pool.mark_deleting("m")
    for key, gen in [(r.key, r.gen) for r in pool._group("m")]:
        pool.stopped(key, gen)
    assert "m" not in pool.ids()
    assert not pool._extras and not [k for k in pool._records if k.startswith("m")]


def test_unload_unloads_every_replica() -> None:
    pool, _jobs, _now = two_serving()
    pool.unload("m")
    assert {r.state for r in pool.replica_records("m")} == {State.UNLOADING}


def test_replicas_entry_key_is_checked() -> None:
    from controlplane.settings import ConfigError, parse_entry

    assert parse_entry({"model_id": "x", "replicas": {"max": 3}}).replicas == (1, 3)
    assert parse_entry({"model_id": "x"}).to_dict() == {"model_id": "x", **_defaults()}
    assert parse_entry({"model_id": "x", "replicas": {"min": 2, "max": 2}}).to_dict()[
        "replicas"
    ] == {"min": 2, "max": 2}
    for bad, words in (
        ({"min": 3, "max": 2}, "replicas.min: 3 is above max 2"),
        ({"max": 0}, "replicas.max: 0 is below the minimum 1"),
        ({"max": 99}, "replicas.max: 99 is more than 32"),
        ({"most": 2}, "replicas.most: unknown key"),
        (3, "is not a mapping"),
        ({"max": 2.5}, "replicas.max: 2.5 is not an integer"),
    ):
        with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
            parse_entry({"model_id": "x", "replicas": bad})


def _defaults() -> dict[str, Any]:
    from controlplane.settings import ModelEntry as E

    data = E("x").to_dict()
    data.pop("model_id")
    return data


def test_requests_sent_straight_to_a_replicas_port_count_toward_its_load() -> None:
    pool, jobs, now = make(entry(high=2))
    pool.ensure_loaded("m", wait=False)
    ready(pool, jobs)
    # The first replica's /health says three requests came straight to its port.
    first = pool.record("m")
    pool.observe_worker("m", first.gen, requests=3, in_flight=3, last_at=now[0], memory_mb=None)
    held = pool.begin_request("m")
    pool.scale_replicas()  # busy: 4 in flight per replica, the 3 direct ones included
    now[0] += 5
    assert pool.scale_replicas()[0][1] == "up"
    ready(pool, jobs)
    assert [pool.begin_request("m").key for _ in range(4)] == ["m#2"] * 4
    pool.release("m", held.gen)


def test_a_replica_key_is_not_a_model() -> None:
    from controlplane.errors import UnknownModel

    pool, _, _ = two_serving()
    for call in (pool.begin_request, pool.ensure_loaded, pool.record, pool.unload):
        with pytest.raises(UnknownModel):
            call("m#2")
    assert pool.worker("m#2").replica == 2


def test_a_load_call_is_about_the_models_own_worker() -> None:
    pool, jobs, _ = two_serving()
    first = pool.record("m")
    pool.process_gone("m", first.gen, operator_stop=False, detail="killed")
    pool.cleaned("m", first.gen)
    assert pool.begin_request("m").key == "m#2", "requests go to the replica that serves"
    # A load call (a lease, a warmup pass) loads the model's own worker again.
    loaded = pool.ensure_loaded("m", wait=False, manual=True)
    assert loaded.key == "m" and jobs.loads[-1][0] == "m"


def test_an_unload_stops_every_replica_and_a_pinned_count_brings_none_back() -> None:
    pool, _, now = two_serving(high=3)
    pool.pin_replicas("m", 3)
    assert pool.scale_replicas()[0][1] == "up"  # replica 3 is loading
    pool.unload("m")
    states = {r.key: r.state for r in pool.replica_records("m")}
    assert states == {"m": State.UNLOADING, "m#2": State.UNLOADING, "m#3": State.UNLOADING}
    for r in pool.replica_records("m"):
        pool.stopped(r.key, r.gen)
    now[0] += 60
    assert pool.scale_replicas() == [], "nothing serves: the pinned count waits for a request"


def test_unloading_a_model_whose_own_worker_loads_changes_nothing() -> None:
    from controlplane.errors import Conflict as Busy

    pool, _, now = two_serving()
    first = pool.record("m")
    pool.process_gone("m", first.gen, operator_stop=False, detail="killed")
    pool.cleaned("m", first.gen)
    now[0] += 600
    pool.ensure_loaded("m", wait=False, manual=True)  # replica 1 loads again
    with pytest.raises(Busy):
        pool.unload("m")
    assert pool.worker("m#2").state is State.HOT


def test_a_pinned_port_is_the_first_replicas_and_changes_reload_one_replica_at_a_time() -> None:
    pool, _, _ = two_serving(port=8060)
    for key in ("m", "m#2"):
        rec = pool.worker(key)
        pool.started_with(key, rec.gen, pool.fingerprint_for(rec))
    assert pool.reload_changed() == [], "replica 2 is not 'moved' off a port it never had"
    pool.replace_entry(entry(port=8060, options={"num_ctx": 4096}))
    assert pool.reload_changed() == ["m"]
    assert pool.reload_changed() == [], "replica 2 serves until replica 1 is back"
    assert pool.worker("m#2").state is State.HOT


def test_extend_ttl_moves_every_serving_replicas_deadline_and_the_view_shows_the_model() -> None:
    pool, _, _ = two_serving()
    first = pool.record("m")
    pool.process_gone("m", first.gen, operator_stop=False, detail="killed")
    before = pool.worker("m#2").deadline
    assert before is not None
    rec, _ = pool.extend_ttl("m", 10)
    assert rec.key == "m#2" and (pool.worker("m#2").deadline or 0) > before
    view = pool.describe(rec)
    assert view["model_id"] == "m" and view["state"] == "HOT"
    assert [r["key"] for r in view["replicas"]] == ["m", "m#2"]
    assert view["replica_counts"]["serving"] == 1


def test_the_fast_path_keeps_nothing_for_unknown_models_or_replica_keys() -> None:
    pool, _, _ = two_serving()
    assert pool.try_begin_request("m#2") is None
    for i in range(100):
        assert pool.try_begin_request(f"nope-{i}") is None
    assert set(pool._scaling) <= {"m"}


def test_deleting_cancels_loading_replicas_and_frees_the_name_last() -> None:
    pool, _, _ = two_serving(high=3)
    pool.pin_replicas("m", 3)
    assert pool.scale_replicas()[0][1] == "up"  # replica 3 is loading
    pool.mark_deleting("m")
    states = {r.key: r.state for r in pool._group("m")}
    assert set(states.values()) == {State.UNLOADING}, states
    pool.stopped("m", pool._records["m"].gen)
    assert "m" in pool._records, "the name stays taken while its replicas stop"
    for key in ("m#2", "m#3"):
        pool.stopped(key, pool._records[key].gen)
    assert not [k for k in pool._records if k.startswith("m")] and "m" not in pool.ids()


def test_a_pinned_count_follows_new_bounds() -> None:
    pool, _, _ = two_serving(high=3)
    pool.pin_replicas("m", 3)
    pool.replace_entry(entry(high=2))
    assert pool.scaling_of("m").pinned == 2


def test_a_lowered_max_never_drains_the_last_serving_replica() -> None:
    pool, _, now = two_serving()
    first = pool.record("m")
    pool.process_gone("m", first.gen, operator_stop=False, detail="killed")
    pool.replace_entry(entry(high=1))
    now[0] += 10
    assert pool.scale_replicas() == []
    assert pool.worker("m#2").state is State.HOT


def test_leases_are_not_load() -> None:
    pool, jobs, now = make(entry())
    pool.ensure_loaded("m", wait=False)
    ready(pool, jobs)
    for holder in "abcd":
        pool.add_lease("m", 600, holder)
    pool.scale_replicas()
    now[0] += 10
    assert pool.scale_replicas() == []


def test_light_load_lets_the_spare_replica_go_idle_and_drain() -> None:
    pool, _, now = two_serving()
    for _ in range(5):  # one request every 30 s: never two at once
        now[0] += 30
        rec = pool.begin_request("m")
        assert rec.key == "m"
        pool.release("m", rec.gen)
        pool.scale_replicas()
    assert {r.key: r.state for r in pool.replica_records("m")}["m#2"] is State.UNLOADING


def test_a_model_shows_its_best_replica() -> None:
    pool, _, _ = two_serving()
    first = pool.record("m")
    pool.process_gone("m", first.gen, operator_stop=False, detail="killed")
    (shown,) = pool.shown()
    assert shown.key == "m#2" and shown.state is State.HOT
    assert [[r.key for r in g] for g in pool.groups()] == [["m", "m#2"]]
