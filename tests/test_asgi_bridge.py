"""The WSGI bridge (model_service/asgi.py): a Flask app served through ASGI messages.

The receive and send callables are plain ASGI: the messages an ASGI server exchanges.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

from flask import Flask, Response, jsonify, request

from model_service.asgi import WSGIBridge, read_body


def make_app(closed: list[str], produced: list[int]) -> Flask:
    app = Flask("bridge-test")
    app.config["MAX_CONTENT_LENGTH"] = 100

    @app.route("/echo/<name>", methods=["GET", "POST"])
    def echo(name: str) -> Response:
        return jsonify(
            name=name,
            query=request.args.to_dict(),
            body=request.get_data(as_text=True),
            accept=request.headers.get("Accept"),
            multi=request.headers.get("X-Multi"),
            remote=request.remote_addr,
            method=request.method,
        )

    @app.get("/stream")
    def stream() -> Response:
        def gen() -> Iterator[bytes]:
            try:
                for i in range(1000):
                    produced.append(i)
                    yield f"{i}\n".encode()
            finally:
                closed.append(threading.current_thread().name)

        return Response(gen(), mimetype="text/plain")

    return app


def serve(
    bridge: WSGIBridge,
    method: str,
    path: str,
    body: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    query: bytes = b"",
    stop_after: int | None = None,
) -> list[dict[str, Any]]:
    """Serve one request; ``stop_after``: the client goes away after that many body messages."""
    sent: list[dict[str, Any]] = []

    async def main() -> None:
        gone = asyncio.Event()
        pieces = [{"type": "http.request", "body": body[:3], "more_body": True}] if body else []
        pieces.append({"type": "http.request", "body": body[3:], "more_body": False})

        async def receive() -> dict[str, Any]:
            if pieces:
                return pieces.pop(0)
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)
            bodies = [m for m in sent if m["type"] == "http.response.body"]
            if stop_after is not None and len(bodies) >= stop_after:
                gone.set()

        scope = {
            "type": "http",
            "method": method,
            "path": path,
            "query_string": query,
            "headers": headers or [],
            "server": ("127.0.0.1", 8050),
            "client": ("127.0.0.9", 40000),
            "http_version": "1.1",
        }
        await asyncio.wait_for(bridge(scope, receive, send), 10)

    try:
        asyncio.run(main())
    finally:
        bridge.close()
    return sent


def test_a_request_reaches_flask_whole_and_its_answer_comes_back() -> None:
    bridge = WSGIBridge(make_app([], []), 4, 100)
    sent = serve(
        bridge,
        "POST",
        "/echo/caf\u00e9",
        body=b"hello body",
        headers=[(b"accept", b"text/x"), (b"x-multi", b"a"), (b"x-multi", b"b")],
        query=b"a=1&b=%C3%A9",
    )
    start, body = sent
    assert start["status"] == 200
    assert (b"content-type", b"application/json") in start["headers"]
    import json

    data = json.loads(body["body"])
    assert data == {
        "name": "caf\u00e9",
        "query": {"a": "1", "b": "\u00e9"},
        "body": "hello body",
        "accept": "text/x",
        "multi": "a,b",
        "remote": "127.0.0.9",
        "method": "POST",
    }
    assert body.get("more_body", False) is False


def test_a_body_over_the_limit_is_flasks_413() -> None:
    bridge = WSGIBridge(make_app([], []), 4, 100)
    sent = serve(bridge, "POST", "/echo/x", body=b"x" * 500)
    assert sent[0]["status"] == 413


def test_a_streamed_answer_is_closed_when_the_client_goes_away() -> None:
    closed: list[str] = []
    produced: list[int] = []
    bridge = WSGIBridge(make_app(closed, produced), 4, 100)
    sent = serve(bridge, "GET", "/stream", stop_after=3)
    assert sent[0]["status"] == 200
    assert len(closed) == 1 and closed[0].startswith("http")  # closed in the pool's thread
    assert len(produced) < 1000  # not run to its end for nobody


def test_a_streamed_answer_runs_to_its_end() -> None:
    closed: list[str] = []
    bridge = WSGIBridge(make_app(closed, []), 4, 100)
    sent = serve(bridge, "GET", "/stream")
    body = b"".join(m.get("body", b"") for m in sent[1:])
    assert body == b"".join(f"{i}\n".encode() for i in range(1000))
    assert sent[-1] == {"type": "http.response.body", "body": b""}
    assert len(closed) == 1


def test_read_body_stops_past_the_limit() -> None:
    async def main() -> bytes:
        chunks = [{"type": "http.request", "body": b"x" * 60, "more_body": True}] * 10

        async def receive() -> dict[str, Any]:
            return chunks.pop()

        return await read_body(receive, 100)

    assert len(asyncio.run(main())) == 120  # the limit and one chunk more, not all 600


def test_an_answer_is_closed_when_its_request_is_cancelled_mid_call() -> None:
    """Regression: a request cancelled (its client gone) while Flask ran dropped the answer
    unclosed, so what closing releases (a request counted in flight) was never released."""
    app = Flask("bridge-cancel")
    entered, go = threading.Event(), threading.Event()
    closed: list[str] = []

    @app.get("/slow")
    def slow() -> Response:
        entered.set()
        go.wait(5)
        resp = Response(iter([b"a", b"b"]), mimetype="text/plain")
        resp.call_on_close(lambda: closed.append("closed"))
        return resp

    bridge = WSGIBridge(app, 2, 100)

    async def main() -> None:
        async def receive() -> dict[str, Any]:
            await asyncio.sleep(10)
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            raise AssertionError("nothing is sent for a cancelled request")

        scope = {"type": "http", "method": "GET", "path": "/slow", "headers": []}
        task = asyncio.ensure_future(bridge(scope, receive, send, b""))
        while not entered.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        go.set()
        try:
            await task
        except asyncio.CancelledError:
            pass
        for _ in range(100):  # the call finishes in its thread, then its answer is closed
            if closed:
                break
            await asyncio.sleep(0.01)

    try:
        asyncio.run(main())
    finally:
        bridge.close()
    assert closed == ["closed"]
