"""The relays on the event loop (controlplane/asgi.py, model_service/worker_asgi.py) in a real
stack: what they count, how they end, and how gunicorn's asyncio worker is set up for them."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
import requests

from tests.ollama_standin import OllamaStandin
from tests.stack import Stack, wait_until

RELAY = "relay"


@pytest.fixture(scope="module")
def stack(make_stack: Any, standin: OllamaStandin) -> Stack:
    models = [
        {
            "model_id": RELAY,
            "backend": "openai",
            "upstream_url": standin.url,
            "upstream_model": "tiny:1b",
        },
        {"model_id": "tiny:1b"},
    ]
    return make_stack(models, {"default_ttl_minutes": 30})  # type: ignore[no-any-return]


@pytest.fixture
def slow_tokens(standin: OllamaStandin) -> Iterator[OllamaStandin]:
    reply = standin.reply
    standin.token_delay = 0.1
    standin.reply = " ".join(f"word{i}" for i in range(60))
    yield standin
    standin.token_delay = 0.0
    standin.reply = reply


def chat(stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {
        "model": RELAY,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": stream,
        **extra,
    }


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text page (0 if absent)."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', line[: line.rindex("}")]))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_relayed_requests_are_counted_like_flasks(stack: Stack) -> None:
    port = stack.load(RELAY)["port"]
    before = stack.get("/metrics").text
    worker_before = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    for _ in range(3):
        r = stack.post("/v1/chat/completions", chat())
        assert r.status_code == 200, r.text
        assert r.json()["model"] == RELAY  # renamed back by the worker
    after = stack.get("/metrics").text
    worker_after = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text

    def delta(name: str, text0: str, text1: str, **labels: str) -> float:
        return sample(text1, name, **labels) - sample(text0, name, **labels)

    assert delta("modelpool_http_request_total", before, after, method="POST", status="200") == 3
    count = "modelpool_http_request_duration_seconds_count"
    assert delta(count, before, after, url_rule="/v1/chat/completions", status="200") == 3
    assert (
        delta(
            "modelpool_worker_requests_total",
            worker_before,
            worker_after,
            model=RELAY,
            endpoint="chat",
            status="200",
        )
        == 3
    )
    tokens = delta("modelpool_worker_tokens_total", worker_before, worker_after, kind="completion")
    assert tokens > 0  # the upstream's usage, read from the relayed answer


def test_a_stream_straight_to_the_worker_is_counted_and_timed(stack: Stack) -> None:
    port = stack.load(RELAY)["port"]
    url = f"http://127.0.0.1:{port}"
    before = requests.get(url + "/metrics", timeout=5).text
    with requests.post(
        url + "/v1/chat/completions",
        json=chat(True, stream_options={"include_usage": True}),
        stream=True,
        timeout=10,
    ) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == b"data: [DONE]"
    usage = json.loads(events[-2][6:])["usage"]
    after = requests.get(url + "/metrics", timeout=5).text
    got = sample(after, "modelpool_worker_tokens_total", model=RELAY, kind="completion") - sample(
        before, "modelpool_worker_tokens_total", model=RELAY, kind="completion"
    )
    assert got == usage["completion_tokens"]
    ttft = "modelpool_worker_time_to_first_token_seconds_count"
    assert sample(after, ttft, endpoint="chat") == sample(before, ttft, endpoint="chat") + 1


def test_a_client_leaving_a_worker_stream_stops_the_upstream(
    stack: Stack, slow_tokens: OllamaStandin
) -> None:
    port = stack.load(RELAY)["port"]
    url = f"http://127.0.0.1:{port}"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/v1/chat/completions", json.dumps(chat(True)), {"Accept": "*/*"})
    resp = conn.getresponse()
    assert resp.readline().startswith(b"data: ")  # streaming; the client keeps the stream open
    health = requests.get(url + "/health", timeout=5).json()
    assert (health["in_flight"], health["in_flight_direct"]) == (1, 1)
    # A direct request: the pool sees it in the worker's /health, which it polls.
    wait_until(lambda: stack.model(RELAY)["in_flight"] == 1, timeout=10)
    assert slow_tokens.in_flight == 1
    conn.close()  # the client goes away mid-stream
    wait_until(lambda: requests.get(url + "/health", timeout=5).json()["in_flight"] == 0, 5)
    wait_until(lambda: slow_tokens.in_flight == 0, timeout=5)
    text = requests.get(url + "/metrics", timeout=5).text
    assert sample(text, "modelpool_worker_requests_total", status="cancelled") >= 1


def test_bad_requests_on_the_fast_paths_get_flasks_answers(stack: Stack) -> None:
    port = stack.load(RELAY)["port"]
    worker = f"http://127.0.0.1:{port}/v1/chat/completions"
    r = requests.post(worker, data=b"{not json", timeout=5)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = requests.post(worker, json={"model": RELAY, "messages": []}, timeout=5)
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = stack.post("/v1/chat/completions", {"model": "no-such-model", "messages": []})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_a_burst_of_connections_waits_in_the_accept_queue(stack: Stack) -> None:
    """gunicorn's asgi worker used to listen again with asyncio's backlog of 100: connections
    past it were dropped and retried by the kernel seconds later, or reset."""
    pid = int(stack.get("/health").json()["pid"])
    assert psutil.Process(pid).name().startswith(("python", "gunicorn"))
    burst = 400
    socks: list[socket.socket] = []
    os.kill(pid, signal.SIGSTOP)  # nothing accepts: every connection waits in the queue
    try:
        for _ in range(burst):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", stack.control_port))
            socks.append(s)
        deadline = time.monotonic() + 2.0
        pending = list(socks)
        while pending and time.monotonic() < deadline:
            time.sleep(0.05)
            pending = [s for s in pending if not _connected(s)]
        established = burst - len(pending)
    finally:
        os.kill(pid, signal.SIGCONT)
        for s in socks:
            s.close()
    assert established == burst
    assert stack.get("/health").status_code == 200


def _connected(s: socket.socket) -> bool:
    try:
        s.getpeername()
    except OSError:
        return False
    return True


def test_an_idle_kept_alive_connection_does_not_hold_up_a_stop(stack: Stack) -> None:
    rec = stack.load(RELAY)
    conn = http.client.HTTPConnection("127.0.0.1", rec["port"], timeout=10)
    conn.request("GET", "/health")
    assert conn.getresponse().read()  # the connection now idles, kept alive (5 s)
    began = time.monotonic()
    assert stack.post(f"/models/{RELAY}/unload").status_code == 202
    stack.wait_state(RELAY, "COLD", timeout=10)
    took = time.monotonic() - began
    conn.close()
    assert not psutil.pid_exists(rec["pid"]) or psutil.Process(rec["pid"]).status() == "zombie"
    assert took < 2.0, f"the stop waited {took:.1f} s for an idle connection"
