"""Replicas across three nodes: a storm of streaming requests brings up more replicas on other
nodes and spreads over them, a replica SIGKILLed mid-storm loses no request that had not begun
streaming, load gone scales back to ``min``, and a count pinned by hand holds.

Each node (``modelpool node up`` on 127.0.0.2-4) has an Ollama stand-in of its own that behaves
like one Ollama: it generates for at most two requests at once (``OLLAMA_NUM_PARALLEL``) at a
fixed delay per token and queues the rest, so one replica is really a bottleneck.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psutil
import pytest
import requests
from playwright.sync_api import Browser, expect

from tests.nodes import NODES, Nodes, running_nodes
from tests.ollama_standin import OllamaStandin
from tests.stack import Stack, wait_until

MIB = 1024 * 1024
MODEL = "m1:1b"
CLIENTS = 40
PARALLEL = 2


@pytest.fixture(scope="module")
def nodes() -> Iterator[Nodes]:
    standin = {"models": {MODEL: 1000 * MIB}, "load_delay": 0.1, "token_delay": 0.02}
    with running_nodes(NODES, num_parallel=PARALLEL, **standin) as ns:
        yield ns


@pytest.fixture(scope="module")
def stack(nodes: Nodes) -> Iterator[Stack]:
    settings = {
        "local_node": False,
        "node_timeout_seconds": 3,
        "nodes": [c for c in nodes.config() if c["name"] in NODES],
        "default_memory_mb": 1000,
        "scale_up_in_flight": 4,
        "scale_up_seconds": 1,
        "scale_down_idle_minutes": 0.05,  # 3 s
    }
    st = Stack([{"model_id": MODEL, "replicas": {"min": 1, "max": 3}}], settings)
    yield from st.running()


@dataclass
class Outcome:
    status: int | None
    #: Some of the answer's content arrived.
    started: bool
    #: The stream ended with ``data: [DONE]``.
    complete: bool
    error: str = ""


def stream_once(stack: Stack) -> Outcome:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    started = complete = False
    status = None
    try:
        with requests.post(
            f"{stack.url}/v1/chat/completions", json=body, stream=True, timeout=120
        ) as resp:
            status = resp.status_code
            for line in resp.iter_lines():
                if line == b"data: [DONE]":
                    complete = True
                elif line.startswith(b"data: "):
                    started = True
        return Outcome(status, started, complete)
    except requests.RequestException as exc:
        return Outcome(status, started, False, str(exc))


class Storm:
    """``CLIENTS`` threads, each sending one streaming request after the other until stopped."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.outcomes: list[Outcome] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client) for _ in range(CLIENTS)]

    def _client(self) -> None:
        while not self.stop.is_set():
            try:
                self.outcomes.append(stream_once(self.stack))
            except Exception as exc:  # a failure of the client is an outcome too
                self.outcomes.append(Outcome(None, False, False, repr(exc)))

    def __enter__(self) -> Storm:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)


def replicas(stack: Stack) -> list[dict[str, Any]]:
    reps: list[dict[str, Any]] = stack.model(MODEL)["replicas"]
    return reps


def serving(stack: Stack) -> list[dict[str, Any]]:
    return [r for r in replicas(stack) if r["state"] in ("HOT", "COOLING")]


def chats(standin: OllamaStandin) -> int:
    return sum(1 for c in standin.calls if c.method == "POST" and "chat" in c.path)


def kill_tree(pid: int) -> None:
    """SIGKILL a worker: its gunicorn master and every process under it."""
    proc = psutil.Process(pid)
    for p in [*proc.children(recursive=True), proc]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def scale_events(stack: Stack, direction: str) -> float:
    prefix = f'modelpool_scale_events_total{{direction="{direction}",model="{MODEL}"}}'
    for line in stack.get("/metrics").text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    raise AssertionError(f"{prefix} is not in /metrics")


def test_a_storm_spreads_over_replicas_on_every_node_and_a_killed_one_loses_nothing_unsent(
    nodes: Nodes, stack: Stack
) -> None:
    wait_until(lambda: all(n["state"] == "UP" for n in stack.get("/nodes").json()["nodes"]), 10)
    stack.load(MODEL)
    for standin in nodes.standins.values():
        standin.clear_calls()
    with Storm(stack) as storm:
        three = wait_until(lambda: len(serving(stack)) == 3 and serving(stack), 60, 0.2)
        assert len({r["node"] for r in three}) == 3, three
        # Every node's Ollama is working on this model before one replica goes.
        wait_until(lambda: all(chats(s) for s in nodes.standins.values()), 20, 0.2)
        victim = next(r for r in three if r["replica"] != 1)
        at_kill = {name: chats(s) for name, s in nodes.standins.items()}
        before = len(storm.outcomes)
        kill_tree(victim["pid"])
        wait_until(lambda: len(storm.outcomes) >= before + 3 * CLIENTS, 60, 0.2)
    outcomes = list(storm.outcomes)
    lost = [o for o in outcomes if not o.complete and not o.started]
    assert not lost, f"{len(lost)} requests lost before streaming: {lost[:3]}"
    truncated = [o for o in outcomes if not o.complete]
    assert len(truncated) <= CLIENTS, "only requests streaming from the killed one may break"
    assert all(o.status == 200 for o in outcomes if o.complete)
    # Each node's Ollama took a share (after the kill, the two left took it), none more
    # than two at once.
    shares = {name: chats(s) for name, s in nodes.standins.items()}
    assert sum(shares.values()) >= len(outcomes), (shares, len(outcomes))
    after = {n: shares[n] - at_kill[n] for n in NODES if n != victim["node"]}
    assert all(share >= sum(after.values()) * 0.25 for share in after.values()), (at_kill, shares)
    assert all(s.peak_running.get(MODEL, 0) <= PARALLEL for s in nodes.standins.values())
    assert scale_events(stack, "up") >= 2
    model = stack.model(MODEL)
    assert model["state"] == "HOT", "the model shows its best replica's state"
    killed = next(r for r in replicas(stack) if r["key"] == victim["key"])
    assert killed["state"] != "HOT" or killed["pid"] != victim["pid"]


def test_load_gone_scales_back_to_min(stack: Stack) -> None:
    stack.load(MODEL)
    downs = scale_events(stack, "down")
    left = wait_until(lambda: len(serving(stack)) == 1 and serving(stack), 40, 0.2)
    assert len(left) == 1
    assert scale_events(stack, "down") >= downs
    status = stack.cli("status", check=True).stdout
    row = next(line for line in status.splitlines() if line.startswith(MODEL))
    assert " 1/3 " in row, status
    # The last replica stays (its TTL applies to it), however long it is idle.
    time.sleep(4)
    assert len(serving(stack)) == 1


def test_a_count_pinned_by_hand_holds_while_idle(stack: Stack, browser: Browser) -> None:
    stack.load(MODEL)
    out = stack.cli("scale", MODEL, "2", check=True).stdout
    assert "pinned at 2" in out
    two = wait_until(lambda: len(serving(stack)) == 2 and serving(stack), 30, 0.2)
    assert len({r["node"] for r in two}) == 2
    time.sleep(4)  # idle beyond scale_down_idle_minutes: a pinned count stays
    assert len(serving(stack)) == 2
    assert "2/3 pinned 2" in stack.cli("status", check=True).stdout
    page = browser.new_page()
    try:  # the page shows it by the model's state, each replica in the title
        page.goto(stack.url + "/ui")
        cell = page.locator(f'tr[data-model="{MODEL}"] [data-field="replicas"]')
        expect(cell).to_have_text("2/3 · pinned 2")
        title = cell.get_attribute("title") or ""
        assert "#1 HOT on" in title and "#2 HOT on" in title, title
    finally:
        page.close()
    bad = stack.cli("scale", MODEL, "4")
    assert bad.returncode != 0 and "outside model 'm1:1b''s replicas min..max (1..3)" in (
        bad.stdout + bad.stderr
    )
    stack.cli("scale", MODEL, "auto", check=True)
    wait_until(lambda: len(serving(stack)) == 1, 30, 0.2)


def test_a_restarted_control_plane_adopts_every_replica_and_keeps_the_pinned_count(
    nodes: Nodes, stack: Stack
) -> None:
    stack.load(MODEL)
    stack.cli("scale", MODEL, "2", check=True)
    two = wait_until(lambda: len(serving(stack)) == 2 and serving(stack), 30, 0.2)
    before = {r["key"]: (r["node"], r["pid"]) for r in two}
    restart = stack.supervisorctl("restart", "controlplane")
    assert restart.returncode == 0, restart.stdout + restart.stderr
    wait_until(lambda: stack.get("/health").status_code == 200, 30)
    after = wait_until(lambda: len(serving(stack)) == 2 and serving(stack), 30, 0.2)
    # The same workers on the same nodes, taken over, not started again.
    assert {r["key"]: (r["node"], r["pid"]) for r in after} == before
    assert stack.model(MODEL)["replica_counts"]["pinned"] == 2
    stack.cli("scale", MODEL, "auto", check=True)
    wait_until(lambda: len(serving(stack)) == 1, 30, 0.2)
