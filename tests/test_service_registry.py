"""The service registry: announce on HOT, heartbeat, withdraw before draining, survive outages."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from controlplane.adapters.registry import RegistryAnnouncer
from tests.stack import Stack, free_port_block, wait_until

PATHS = {"register": "/register", "heartbeat": "/heartbeat", "deregister": "/deregister"}


class Recorder:
    """A small registry that records every call; it can be started on a port chosen earlier."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.times: list[float] = []
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> Recorder:
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with recorder.lock:
                    recorder.calls.append((self.path, body))
                    recorder.times.append(time.time())
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def paths_for(self, model: str) -> list[str]:
        with self.lock:
            return [p for p, b in self.calls if b.get("model_id") == model]


# --- unit: the announcer's decisions with a fake transport and clock ---------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_announcer_registers_heartbeats_and_withdraws() -> None:
    sent: list[tuple[str, dict[str, Any]]] = []
    status = {"code": 200}
    clock = FakeClock()
    a = RegistryAnnouncer(lambda p, b: (sent.append((p, b)), status["code"])[1], PATHS, 10, clock)
    a.announce("m", {"service_id": "modelpool:m", "model_id": "m", "state": "HOT"})
    a.step()
    assert [p for p, _ in sent] == ["/register"]
    a.step()
    assert len(sent) == 1  # nothing due before the heartbeat interval
    clock.now += 10
    a.set_state("m", "COOLING")
    a.step()
    assert sent[-1][0] == "/heartbeat" and sent[-1][1]["state"] == "COOLING"
    done = a.withdraw("m")
    assert not done.is_set()
    a.step()
    assert sent[-1][0] == "/deregister" and done.is_set()
    clock.now += 100
    a.step()
    assert sent[-1][0] == "/deregister" and len(sent) == 3


def test_announcer_backs_off_while_the_registry_is_down_and_recovers() -> None:
    sent: list[str] = []
    status = {"code": 0}
    clock = FakeClock()
    a = RegistryAnnouncer(lambda p, b: (sent.append(p), status["code"])[1], PATHS, 10, clock)
    a.announce("m", {"service_id": "modelpool:m", "model_id": "m", "state": "HOT"})
    for _ in range(8):
        a.step()
        clock.now += 0.5
    # Tries at 0, 1 and 3 s (backoff 1 s, then 2 s): three in 3.5 s, not eight.
    assert sent == ["/register"] * 3
    status["code"] = 200
    clock.now += 10
    a.step()
    assert sent[-1] == "/register"
    clock.now += 10
    status["code"] = 404  # the registry restarted and forgot us
    a.step()
    status["code"] = 200
    a.step()
    assert sent[-2:] == ["/heartbeat", "/register"]


def test_withdraw_of_an_unregistered_model_is_immediate() -> None:
    a = RegistryAnnouncer(lambda p, b: 200, PATHS, 10, FakeClock())
    assert a.withdraw("never").is_set()


# --- end to end: a stack talking to a recording registry ---------------------------------------


@pytest.fixture(scope="module")
def recorder_port() -> int:
    return free_port_block(1)


@pytest.fixture(scope="module")
def stack(make_stack: Any, recorder_port: int) -> Iterator[Stack]:
    s: Stack = make_stack(
        [
            {"model_id": "tiny:1b", "ttl_minutes": 0.05, "tags": ["small"], "model_type": "code"},
            {"model_id": "llama3.1:8b"},
        ],
        {
            "service_registry_url": f"http://127.0.0.1:{recorder_port}",
            "service_registry_heartbeat_seconds": 0.3,
            "grace_period_minutes": 0.01,
        },
    )
    yield s


def test_register_heartbeat_deregister_across_a_ttl_unload(
    stack: Stack, recorder_port: int
) -> None:
    rec = Recorder(recorder_port).start()
    try:
        m = stack.load("tiny:1b")
        wait_until(lambda: "/heartbeat" in rec.paths_for("tiny:1b"), timeout=5)
        stack.wait_state("tiny:1b", "COLD", timeout=15)
        wait_until(lambda: "/deregister" in rec.paths_for("tiny:1b"), timeout=5)
        paths = rec.paths_for("tiny:1b")
        assert paths[0] == "/register" and paths[-1] == "/deregister"
        assert set(paths[1:-1]) == {"/heartbeat"}
        body = next(b for p, b in rec.calls if p == "/register")
        assert body["endpoint"] == f"http://127.0.0.1:{m['port']}"
        assert body["port"] == m["port"] and body["tags"] == ["small"]
        assert body["model_type"] == "code" and body["state"] == "HOT"
        assert body["url"].endswith("/v1") and body["service_id"] == "modelpool:tiny:1b"
    finally:
        rec.stop()


def test_registry_down_never_blocks_and_catches_up(stack: Stack, recorder_port: int) -> None:
    # Nothing listens on the registry's port: loading and serving go on regardless.
    m = stack.load("llama3.1:8b")
    assert m["state"] == "HOT"
    rec = Recorder(recorder_port).start()  # the registry comes back
    try:
        wait_until(lambda: "/register" in rec.paths_for("llama3.1:8b"), timeout=10)
        r = stack.post("/models/llama3.1:8b/unload", {"wait": True})
        assert r.json()["state"] == "COLD"
        wait_until(lambda: rec.paths_for("llama3.1:8b")[-1:] == ["/deregister"], timeout=5)
        # Withdrawn before draining: the deregistration came before the worker stopped.
        history = stack.get("/models/llama3.1:8b/health").json()["history"]
        assert history[-1]["to"] == "COLD"
        with rec.lock:
            gone = max(
                t
                for (p, b), t in zip(rec.calls, rec.times, strict=True)
                if p == "/deregister" and b["model_id"] == "llama3.1:8b"
            )
        assert history[-2]["to"] == "UNLOADING" and history[-2]["at"] <= gone <= history[-1]["at"]
    finally:
        rec.stop()
