"""The pool's side of nodes, without processes: a node lost and back, adoption rules, and the
node client's credentials kept out of every message."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from controlplane.adapters.supervisord import SupervisorUnavailable, TwiddlerClient
from controlplane.core.states import State
from controlplane.errors import NoCapacity
from controlplane.nodeconfig import NodeConfig
from controlplane.pool import ModelPool
from controlplane.records import Lifecycle
from controlplane.settings import ModelEntry, parse_settings


class Jobs(Lifecycle):
    def __init__(self) -> None:
        self.loads: list[tuple[str, int, bool]] = []

    def start_load(self, model_id: str, gen: int, adopt: bool) -> None:
        self.loads.append((model_id, gen, adopt))

    def start_stop(self, model_id: str, gen: int, force: bool) -> None:
        pass

    def start_cleanup(self, model_id: str, gen: int) -> None:
        pass

    def hurry(self, model_id: str, gen: int) -> None:
        pass


def make(*models: str) -> tuple[ModelPool, Jobs]:
    nodes = [
        NodeConfig(n, f"http://10.0.0.{i}:9001", "/p", f"10.0.0.{i}")
        for i, n in ((2, "a"), (3, "b"))
    ]
    settings = parse_settings({"local_node": False, "node_timeout_seconds": 5, "nodes": nodes})
    now = [1000.0]
    pool = ModelPool(settings, tuple(ModelEntry(m) for m in models), clock=lambda: now[0])
    pool.configure_nodes(nodes)
    jobs = Jobs()
    pool.lifecycle = jobs
    pool.clock_now = now  # type: ignore[attr-defined]
    return pool, jobs


def up(pool: ModelPool, node: str, programs: dict[str, tuple[str, int]] | None = None) -> None:
    pool.node_reachable(node, programs or {})


def hot(pool: ModelPool, model: str) -> Any:
    rec = pool.ensure_loaded(model, wait=False)
    pool.became_ready(model, rec.gen, 100.0, 4242)
    return pool.record(model)


def lose(pool: ModelPool, node: str) -> None:
    pool.clock_now[0] += 6  # type: ignore[attr-defined]
    assert pool.node_unreachable(node, "timed out")


def test_a_lost_node_fails_its_models_and_the_next_load_goes_elsewhere() -> None:
    pool, _ = make("m")
    up(pool, "a")
    rec = hot(pool, "m")
    assert rec.node == "a"
    up(pool, "b")
    lose(pool, "a")
    lost = pool.record("m")
    assert lost.state is State.FAILED and lost.node is None and lost.port is None
    assert "node a lost: timed out" in (lost.last_error or "") and lost.retry_at == 0.0
    again = pool.ensure_loaded("m", wait=False)
    assert again.node == "b" and again.state is State.WARMING


def test_a_node_back_gives_back_a_worker_whose_model_waited() -> None:
    pool, jobs = make("m")
    up(pool, "a")
    rec = hot(pool, "m")
    lose(pool, "a")
    assert pool.node_reachable("a", {rec.program: ("RUNNING", 4242)})
    back = pool.record("m")
    assert back.state is State.WARMING and back.adopting and back.node == "a"
    assert back.port == rec.port and jobs.loads[-1] == ("m", back.gen, True)


def test_a_worker_of_a_model_loaded_again_meanwhile_is_not_taken_back() -> None:
    pool, _ = make("m")
    up(pool, "a")
    up(pool, "b")
    rec = hot(pool, "m")
    first = rec.node
    lose(pool, first)
    other = hot(pool, "m")
    assert other.node != first
    pool.unload("m")
    pool.stopped("m", other.gen)
    assert pool.record("m").state is State.COLD
    # The node returns with the old worker: the model was loaded (and unloaded) since.
    pool.node_reachable(first, {rec.program: ("RUNNING", 4242)})
    assert pool.record("m").state is State.COLD
    assert first not in {n["name"] for n in pool.nodes_view() if n["models"]}


def test_a_worker_that_was_being_unloaded_is_not_taken_back() -> None:
    pool, _ = make("m")
    up(pool, "a")
    rec = hot(pool, "m")
    pool.unload("m")
    lose(pool, "a")
    assert pool.record("m").state is State.COLD
    pool.node_reachable("a", {rec.program: ("RUNNING", 4242)})
    assert pool.record("m").state is State.COLD


def test_a_deleted_model_on_a_lost_node_is_dropped() -> None:
    pool, _ = make("m", "n")
    up(pool, "a")
    hot(pool, "m")
    pool.mark_deleting("m")  # UNLOADING; its stop job will never report
    lose(pool, "a")
    assert pool.ids() == ["n"]


def test_leases_kept_through_an_outage_are_not_replaced_by_the_returning_worker() -> None:
    pool, _ = make("m")
    up(pool, "a")
    rec = hot(pool, "m")
    pool.add_lease("m", 600, "agent-1")
    lose(pool, "a")
    ended = pool.record("m").leases
    assert len(ended) == 1
    pool.end_lease("m", next(iter(ended)))
    pool.node_reachable("a", {rec.program: ("RUNNING", 4242)})
    assert pool.record("m").leases == {}


# --- the node client -------------------------------------------------------------------------


@pytest.fixture
def bad_gateway() -> Iterator[tuple[str, list[str | None]]]:
    seen: list[str | None] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen.append(self.headers.get("Authorization"))
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(502)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def test_the_node_password_never_shows_in_an_error(
    bad_gateway: tuple[str, list[str | None]],
) -> None:
    url, seen = bad_gateway
    client = TwiddlerClient(url, "modelpool", "s3cret-node-pw", timeout=5)
    with pytest.raises(SupervisorUnavailable) as info:
        client.state()
    assert "502" in str(info.value) and "s3cret" not in str(info.value)
    assert seen == ["Basic bW9kZWxwb29sOnMzY3JldC1ub2RlLXB3"]  # modelpool:s3cret-node-pw
    with pytest.raises(SupervisorUnavailable) as info:
        client.add_program("model-x", {"environment": 'MODELPOOL_SPEC_DATA="api-key-inside"'})
    assert "api-key-inside" not in str(info.value) and "s3cret" not in str(info.value)


def test_ttls_run_on_the_nodes_that_answer_while_another_is_away() -> None:
    nodes = [NodeConfig("a", "http://10.0.0.2:9001", "/p", "10.0.0.2")]
    settings = parse_settings({"nodes": nodes, "default_ttl_minutes": 5, "grace_period_minutes": 0})
    entries = (ModelEntry("here", nodes=("local",)), ModelEntry("there", nodes=("a",)))
    now = [1000.0]
    pool = ModelPool(settings, entries, clock=lambda: now[0])
    pool.configure_nodes(nodes)
    pool.lifecycle = Jobs()
    up(pool, "a")
    hot(pool, "here")
    hot(pool, "there")
    assert pool.set_available(False)  # the stack's own supervisord stops answering
    now[0] += 3600
    pool.expire(now[0])
    assert pool.record("here").state is State.HOT  # waits for its supervisord
    assert pool.record("there").state is State.UNLOADING  # its node answers
    assert pool.any_node_up()
    assert pool.unloading_idle() == []  # the stop job runs (the fake lifecycle took it)


def test_a_failed_adoption_is_not_held_against_the_model() -> None:
    pool, _ = make("m")
    up(pool, "a")
    rec = hot(pool, "m")
    lose(pool, "a")
    pool.node_reachable("a", {rec.program: ("RUNNING", 4242)})
    taken = pool.record("m")
    assert taken.adopting
    # A stop still running from before the outage removed it meanwhile.
    pool.load_failed("m", taken.gen, "worker is no longer known to supervisord", "exited")
    failed = pool.record("m")
    assert failed.state is State.FAILED and failed.failures == 0 and failed.retry_at == 0.0
    assert pool.ensure_loaded("m", wait=False).state is State.WARMING  # at once, no backoff


def test_a_nodes_ollama_is_reached_at_the_nodes_address() -> None:
    from controlplane.nodes import reachable_ollama

    def node(url: str, address: str) -> NodeConfig:
        return NodeConfig("a", "http://h:9001", "/p", address, ollama_base_url=url)

    assert reachable_ollama(node("http://localhost:11434", "10.0.0.5")) == "http://10.0.0.5:11434"
    assert reachable_ollama(node("http://127.0.0.1:11434", "gpu-a.lan")) == "http://gpu-a.lan:11434"
    assert reachable_ollama(node("http://10.0.0.9:11434", "10.0.0.5")) == "http://10.0.0.9:11434"
    # Nodes on this machine's loopback addresses (the tests' own) keep theirs.
    assert reachable_ollama(node("http://127.0.0.2:9", "127.0.0.2")) == "http://127.0.0.2:9"


def test_the_queue_for_room_is_per_node() -> None:
    """A caller waiting for room on node a does not hold up a load that fits on node b; a load
    that needs node a queues behind it."""
    nodes = [
        NodeConfig(n, f"http://10.0.0.{i}:9001", "/p", f"10.0.0.{i}", max_concurrent_models=1)
        for i, n in ((2, "a"), (3, "b"))
    ]
    settings = parse_settings(
        {
            "local_node": False,
            "nodes": nodes,
            "min_resident_seconds": 0,
            "min_idle_seconds": 0,
            "capacity_wait_seconds": 10,
        }
    )
    entries = (
        ModelEntry("held", nodes=("a",)),
        ModelEntry("waits", nodes=("a",)),
        ModelEntry("also-a", nodes=("a",)),
        ModelEntry("anywhere"),
    )
    pool = ModelPool(settings, entries)
    pool.configure_nodes(nodes)
    jobs = Jobs()
    pool.lifecycle = jobs
    up(pool, "a")
    up(pool, "b")
    hot(pool, "held")
    held = pool.begin_request("held", timeout=5)  # node a is full and busy
    assert pool.record("held").node == "a"
    outcome: list[object] = []

    def wait_for_room() -> None:
        try:
            outcome.append(pool.ensure_loaded("waits", timeout=5).node)
        except Exception as exc:
            outcome.append(exc)

    waiter = threading.Thread(target=wait_for_room)
    waiter.start()
    assert pool.wait_for(lambda: len(pool._room_queue) == 1, 5)
    assert pool._room_queue[0].nodes == frozenset({"a"})
    # A model that fits on b is loaded there at once, not queued behind the wait on a.
    rec = pool.ensure_loaded("anywhere", wait=False)
    assert (rec.state, rec.node) == (State.WARMING, "b")
    # One that needs a queues behind the caller already waiting there.
    with pytest.raises(NoCapacity, match="others wait for room"):
        pool.ensure_loaded("also-a", wait=False)
    assert pool.record("also-a").state is State.COLD
    pool.release("held", held.gen)  # a's model is idle: the first in line evicts it
    assert pool.wait_for(lambda: pool._records["held"].state is State.UNLOADING, 5)
    pool.stopped("held", pool.record("held").gen)
    assert pool.wait_for(lambda: pool._records["waits"].state is State.WARMING, 5)
    pool.became_ready("waits", pool.record("waits").gen, 100.0, 1)
    waiter.join(5)
    assert outcome == ["a"]
