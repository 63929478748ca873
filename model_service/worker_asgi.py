"""The worker as gunicorn serves it: the Flask app behind an event loop.

Every request goes to Flask (in a thread pool), except the plain case of a pass-through backend
(``openai`` with a plain http upstream): a valid ``/v1`` request to a ready model is counted,
relayed to the upstream on the event loop, and timed like any other. Anything else (no key, bad
JSON, an invalid body, a model still loading, an upstream that does not answer) goes to Flask,
which answers it as it always has.
"""

from __future__ import annotations

import json
import time
from typing import Any

from flask import Flask

from model_service import jsonbody
from model_service.aio import Answer, BrokenAnswer, Unreachable, Upstreams
from model_service.app import (
    ENDPOINTS,
    EXT,
    KEYS_EXT,
    METRICS_EXT,
    VIA_HEADER,
    WorkerState,
    create_app_from_env,
    request_problem,
)
from model_service.asgi import (
    Disconnect,
    Receive,
    Scope,
    Send,
    WSGIBridge,
    header,
    lifespan,
    read_body,
)
from model_service.auth import KeySource, bearer_ok
from model_service.backends.base import BackendError
from model_service.metrics import WorkerMetrics

#: Threads for the Flask app: enough that a thousand streams of an in-process backend
#: (llama.cpp), each a thread while it generates, are held at once; created as needed.
THREADS = 1100


class Worker:
    """The ASGI app of a model worker."""

    def __init__(self, flask: Flask) -> None:
        self.flask = flask
        self.state: WorkerState = flask.extensions[EXT]
        self.metrics: WorkerMetrics = flask.extensions[METRICS_EXT]
        self.keys: KeySource = flask.extensions[KEYS_EXT]
        self.max_body = int(flask.config["MAX_CONTENT_LENGTH"])
        self.bridge = WSGIBridge(flask, THREADS, self.max_body)
        self.route = getattr(self.state.backend, "fast_route", lambda: None)()
        self.upstreams = Upstreams(timeout=600.0)

    @property
    def extensions(self) -> dict[str, Any]:
        return self.flask.extensions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            endpoint = ENDPOINTS.get(scope["path"])
            if self.route is not None and endpoint is not None and scope["method"] == "POST":
                body = await read_body(receive, self.max_body)
                if not await self._relay(endpoint, scope, body, receive, send):
                    await self.bridge(scope, receive, send, body)
                return
            await self.bridge(scope, receive, send)
        elif kind == "lifespan":
            await lifespan(receive, send)

    def _request(self, endpoint: str, scope: Scope, body: bytes) -> dict[str, Any] | None:
        """The body of a request the fast path may take, else None (Flask answers it)."""
        if self.state.status != "ready" or len(body) > self.max_body:
            return None
        key = self.keys.get()
        if key is None or (key and not bearer_ok(header(scope, b"authorization"), key)):
            return None
        try:
            data = jsonbody.load_object(body)
        except jsonbody.BadJSON:
            return None
        if request_problem(endpoint, data, self.state.spec.model_id) is not None:
            return None
        return data

    async def _relay(
        self, endpoint: str, scope: Scope, raw: bytes, receive: Receive, send: Send
    ) -> bool:
        """Relay a plain request to the upstream; False (nothing sent) if Flask must answer."""
        started = time.perf_counter()
        body = self._request(endpoint, scope, raw)
        if body is None:
            return False
        assert self.route is not None
        host, port, prefix, headers = self.route
        backend: Any = self.state.backend
        direct = header(scope, VIA_HEADER.lower().encode()) != "frontdoor"
        self.state.begin(direct)
        try:
            answer = await self.upstreams.request(
                host, port, "POST", prefix + scope["path"], backend.payload(body), headers
            )
        except (Unreachable, BrokenAnswer):
            self.state.end(direct, served=False)
            return False  # Flask tries once more and reports it
        try:
            if body.get("stream") and 200 <= answer.status < 300:
                await self._stream(endpoint, started, answer, receive, send)
            else:
                await self._whole(endpoint, started, scope["path"], answer, send)
        finally:
            answer.release()
            self.state.end(direct)
        return True

    async def _whole(
        self, endpoint: str, started: float, path: str, answer: Answer, send: Send
    ) -> None:
        backend: Any = self.state.backend
        try:
            raw = await answer.read()
            result = backend.answer_from(
                path, answer.status, raw, answer.reason, answer.header("retry-after")
            )
            status, data, extra = result.status, result.json, result.headers
        except BrokenAnswer as exc:
            status, extra = 502, {}
            data = _error(f"the answer from the upstream broke off: {exc}", "backend_error")
        except BackendError as exc:
            status, extra = exc.status, {}
            data = _error(exc.message, exc.code, exc.type)
            if exc.retry_after is not None:
                extra["Retry-After"] = str(int(exc.retry_after))
        payload = json.dumps(data).encode()
        headers = [(b"content-type", b"application/json")]
        headers += [(k.lower().encode(), v.encode("latin-1")) for k, v in extra.items()]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
        usage = (data or {}).get("usage") if status < 300 else None
        self.metrics.finished(endpoint, status, started, usage)

    async def _stream(
        self, endpoint: str, started: float, answer: Answer, receive: Receive, send: Send
    ) -> None:
        timed = self.metrics.stream(endpoint, started, iter(()))
        completed = False
        watch = Disconnect(receive)
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": answer.status,
                    "headers": [
                        (b"content-type", b"text/event-stream"),
                        (b"cache-control", b"no-cache"),
                        (b"x-accel-buffering", b"no"),
                    ],
                }
            )
            try:
                async for chunk in answer:
                    timed.note(chunk)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    if watch.gone:
                        return
            except BrokenAnswer as exc:
                last: Any = self.state.backend
                await send(
                    {"type": "http.response.body", "body": last.broke(exc), "more_body": True}
                )
            await send({"type": "http.response.body", "body": b""})
            completed = True
        finally:
            watch.stop()
            timed.end(completed)


def _error(message: str, code: str, type_: str = "server_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "code": code}}


def create() -> Worker:
    """The gunicorn entry point (``model_service.worker_asgi:create()``)."""
    return Worker(create_app_from_env())
