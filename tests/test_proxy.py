"""The front door's connection pool (controlplane.adapters.proxy) against a real HTTP server."""

from __future__ import annotations

import os
import resource
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from controlplane.adapters.proxy import WorkerProxy


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    connections: set[tuple[str, int]] = set()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        _Handler.connections.add(self.client_address)
        body = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def server() -> Iterator[ThreadingHTTPServer]:
    _Handler.connections = set()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    t.join(5)


def _call(proxy: WorkerProxy, port: int) -> bytes:
    resp, done = proxy.send("127.0.0.1", port, "POST", "/x", b"{}", {})
    body = resp.read()
    resp.close()
    done(True)
    return body


def test_idle_connection_is_reused(server: ThreadingHTTPServer) -> None:
    proxy = WorkerProxy(timeout=5)
    port = server.server_address[1]
    for _ in range(3):
        assert _call(proxy, port) == b'{"ok": true}'
    assert len(_Handler.connections) == 1
    proxy.forget("127.0.0.1", port)


def test_fd_past_1024_keeps_idle_connections_usable(server: ThreadingHTTPServer) -> None:
    """Regression: select() raised past FD_SETSIZE, so every pooled connection was dropped.

    Deterministic: the connections are made while 1,100 descriptors are held open, so their
    descriptor numbers are above 1024 whatever else the process has open.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.fail(f"the hard descriptor limit {hard} is too low for this test")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        proxy = WorkerProxy(timeout=5)
        port = server.server_address[1]
        for _ in range(3):
            assert _call(proxy, port) == b'{"ok": true}'
        idle = proxy._idle[("127.0.0.1", port)]
        assert idle and idle[0].sock is not None and idle[0].sock.fileno() > 1024
        assert len(_Handler.connections) == 1, "the idle connection was not reused"
        proxy.forget("127.0.0.1", port)
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
