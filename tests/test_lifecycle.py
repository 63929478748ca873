"""Lifecycle tasks with a fake supervisord and a fake worker probe (no processes)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import requests

from controlplane.adapters.supervisord import ProcessInfo, UnknownProgram
from controlplane.adapters.worker import WorkerHealth
from controlplane.core.states import State
from controlplane.lifecycle import BIND_FAILED, Workers
from controlplane.node import Node
from controlplane.nodes import LocalNode
from controlplane.pool import ModelPool
from controlplane.settings import ModelEntry, parse_settings


class FakeSupervisor:
    """Programs live in a dict; a port listed in ``taken`` makes gunicorn log a bind failure."""

    def __init__(self, node: Node, taken: set[int]) -> None:
        self.node = node
        self.taken = taken
        self.running: dict[str, int] = {}  # program -> port
        self.starts: list[tuple[str, int]] = []

    def _port(self, program: str) -> int:
        spec = json.loads(self.node.paths.spec_file(program).read_text())
        return int(spec["port"])

    def add_program(self, name: str, options: Any = None) -> None:
        assert self.node.paths.program_conf(name).exists()

    def start(self, name: str) -> None:
        port = self._port(name)
        self.running[name] = port
        self.starts.append((name, port))
        # Like gunicorn: the log of the program is appended to, run after run.
        with self.node.paths.program_log(name).open("a") as log:
            log.write(f"[INFO] Starting gunicorn on {port}\n")
            if port in self.taken:
                log.write(f"[ERROR] {BIND_FAILED}: ('127.0.0.1', {port})\n")

    def process(self, name: str) -> ProcessInfo:
        if name not in self.running:
            raise UnknownProgram(name)
        return ProcessInfo(name, name, "RUNNING", 4242, 0, 0, "")

    def log_tail(self, name: str, length: int = 2000) -> str:
        return self.node.paths.program_log(name).read_text()[-length:]

    def stop(self, name: str, timeout: float) -> None:
        self.running.pop(name, None)

    def remove_program(self, name: str) -> None:
        pass

    def signal(self, name: str, signame: str) -> None:
        pass


class FakeProbe:
    def __init__(self, sup: FakeSupervisor, model: str) -> None:
        self.sup, self.model = sup, model

    def health(self, host: str, port: int, timeout: float) -> WorkerHealth | None:
        if port in self.sup.taken or port not in self.sup.running.values():
            return None
        return WorkerHealth(status="ready", model=self.model, pid=4243)


def test_a_port_taken_at_bind_time_is_retried_on_another(tmp_path: Path) -> None:
    settings = parse_settings({"port_range": {"start": 9100, "end": 9110}, "control_port": 9099})
    pool = ModelPool(settings, (ModelEntry("m"),))
    node = Node.local(tmp_path / "run", settings)
    node.paths.create()
    sup = FakeSupervisor(node, taken={9100})
    workers = Workers(pool, {"local": LocalNode(node, sup)}, FakeProbe(sup, "m"))  # type: ignore[arg-type]
    pool.lifecycle = workers
    rec = pool.ensure_loaded("m", timeout=20)
    assert rec.state is State.HOT and rec.port == 9101
    assert [port for _, port in sup.starts] == [9100, 9101]
    # The second run is judged by its own output, not by the first run's bind error.
    assert BIND_FAILED in node.paths.program_log(rec.program).read_text()
    # The taken port is avoided for a while, not offered to the next model.
    assert ("local", 9100) in pool._avoid
    workers.join(5)


def test_a_stop_waits_for_the_registry_withdrawal_hook(tmp_path: Path) -> None:
    settings = parse_settings({"port_range": {"start": 9100, "end": 9110}, "control_port": 9099})
    pool = ModelPool(settings, (ModelEntry("m"),))
    node = Node.local(tmp_path / "run", settings)
    node.paths.create()
    sup = FakeSupervisor(node, taken=set())
    workers = Workers(pool, {"local": LocalNode(node, sup)}, FakeProbe(sup, "m"))  # type: ignore[arg-type]
    pool.lifecycle = workers
    order: list[Any] = []
    workers.before_stop = lambda model_id: order.append(("withdraw", dict(sup.running)))
    pool.ensure_loaded("m", timeout=20)
    pool.unload("m", wait=True)
    assert pool.record("m").state is State.COLD
    # The withdrawal ran while the worker was still running, i.e. before its drain.
    assert order and order[0][0] == "withdraw" and order[0][1]
    workers.join(5)


def test_health_probe_keeps_no_connection_open() -> None:
    """Regression: a kept-alive probe connection made every worker stop wait 2 s (gunicorn
    lingers on idle connections) and stayed half-closed in the control plane afterwards.
    Deterministic: the server records the header and whether the client closed."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from controlplane.adapters.worker import HttpWorkerProbe

    seen: list[str | None] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            seen.append(self.headers.get("Connection"))
            body = json.dumps({"status": "ready", "model": "m"}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        probe = HttpWorkerProbe()
        misses: list[str] = []
        answered = 0
        for _ in range(4):
            started = time.monotonic()
            health = probe.health("127.0.0.1", server.server_address[1], 10.0)
            if health is None:
                # The probe says only None: find out why, for the report. In the full suite a
                # fresh loopback connection is, rarely, closed unanswered (a second request at
                # once gets 200); one such miss is tolerated, a probe that fails twice is not.
                try:
                    why = repr(
                        requests.get(f"http://127.0.0.1:{server.server_address[1]}/h", timeout=10)
                    )
                except requests.RequestException as exc:
                    why = repr(exc)
                misses.append(f"nothing after {time.monotonic() - started:.1f} s; again: {why}")
                continue
            assert health.status == "ready"
            answered += 1
        assert len(misses) <= 1, misses
        assert answered >= 3
        # Every request the probe made asked to close its connection (a diagnostic request
        # after a miss, if any, is requests' own and keeps its connection alive).
        assert seen.count("close") == answered, seen
        assert len(seen) == answered + len(misses), seen
    finally:
        server.shutdown()
        server.server_close()
