"""The control plane as gunicorn serves it: the Flask app behind an event loop.

Every request goes to Flask (in a thread pool), except the front door's plain case: a ``/v1``
request for a model that is serving now is counted in flight and relayed on the event loop,
byte for byte, and released when its answer ends or the client goes away. Anything else about
such a request (no key, bad JSON, a model to load or to wait for, a worker that does not answer)
goes to Flask, whose front door handles it as it always has: one place for the answers.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from flask import Flask

from controlplane.api.metrics import HTTP_EXT
from controlplane.api.openai import VIA_HEADER
from controlplane.app import EXT, create_app, is_public
from controlplane.core.states import State
from controlplane.records import Record
from controlplane.service import PoolService
from controlplane.settings import CONTROL_THREADS
from model_service import jsonbody
from model_service.aio import BrokenAnswer, Unreachable, Upstreams
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
from model_service.auth import bearer_ok

#: The front door's routes relayed on the event loop when the model is serving.
RELAYED = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
#: Answer headers passed on to the client (the body's framing is the server's own).
PASSED = (
    b"content-type",
    b"content-length",
    b"retry-after",
    b"cache-control",
    b"x-accel-buffering",
)


class ControlPlane:
    """The ASGI app: the front door's fast relay, and Flask for everything else."""

    def __init__(self, flask: Flask) -> None:
        self.flask = flask
        self.svc: PoolService = flask.extensions[EXT]
        self.max_body = int(flask.config["MAX_CONTENT_LENGTH"])
        self.bridge = WSGIBridge(flask, CONTROL_THREADS, self.max_body)
        self.upstreams = Upstreams()
        self.metrics: tuple[Any, Any] | None = flask.extensions.get(HTTP_EXT)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.svc.pool.listeners.append(self._drop_idle)

    @property
    def extensions(self) -> dict[str, Any]:
        return self.flask.extensions

    def _drop_idle(self, rec: Record, old: State, new: State) -> None:
        # A worker that starts to drain (or died) needs no idle connection of ours; the pool
        # calls this from its own threads, the connections belong to the loop.
        loop = self._loop
        if new in (State.UNLOADING, State.FAILED) and rec.port is not None and loop is not None:
            host = self.svc.pool.address_of(rec.node)
            loop.call_soon_threadsafe(self.upstreams.forget, host, rec.port)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        self._loop = asyncio.get_running_loop()
        if kind == "http":
            if scope["method"] == "POST" and scope["path"] in RELAYED:
                body = await read_body(receive, self.max_body)
                if not await self._relay(scope, body, receive, send):
                    await self.bridge(scope, receive, send, body)
                return
            await self.bridge(scope, receive, send)
        elif kind == "lifespan":
            await lifespan(receive, send)

    def _model(self, scope: Scope, body: bytes) -> str | None:
        """The model of a request the fast path may take, else None (Flask answers it)."""
        settings = self.svc.pool.settings
        if (
            settings.api_key
            and not is_public(scope["path"], settings.public_paths)
            and not bearer_ok(header(scope, b"authorization"), settings.api_key)
        ):
            return None
        if len(body) > self.max_body:
            return None
        try:
            model = jsonbody.load_object(body).get("model")
        except jsonbody.BadJSON:
            return None
        return model if isinstance(model, str) and model else None

    async def _relay(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> bool:
        """Relay a request for a serving model; False (nothing sent) if Flask must answer.

        A replica that dies before anything of its answer reached the client (no answer, or
        an answer broken before its first byte of body) is left out and the request goes once
        more to another serving replica of the model."""
        started = time.perf_counter()
        model = self._model(scope, body)
        pool = self.svc.pool
        held = pool.try_begin_request(model) if model is not None else None
        if held is None:
            return False
        assert model is not None
        headers = {
            "Content-Type": "application/json",
            VIA_HEADER: "frontdoor",
            "Accept": header(scope, b"accept") or "*/*",
        }
        if pool.settings.api_key:
            headers["Authorization"] = f"Bearer {pool.settings.api_key}"
        failed: frozenset[str] = frozenset()
        while True:
            host, port, gen, key = held
            try:
                broken = await self._attempt(
                    scope, body, (host, port), headers, receive, send, started
                )
            finally:
                pool.release(model, gen, thread=False)
            if broken is None:
                return True
            failed |= {key}
            retry = pool.try_begin_request(model, failed) if len(failed) < 2 else None
            if retry is not None:
                held = retry
                continue
            if broken == "" and len(failed) == 1:
                return False  # Flask tries once more and reports it (503 + Retry-After)
            # Two replicas failed it (no more tries), or an answer broke before its body.
            status, data, retry_after = (
                (502, _broken(broken), [])
                if broken
                else (503, _unanswered(model, len(failed)), [(b"retry-after", b"2")])
            )
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [(b"content-type", b"application/json"), *retry_after],
                }
            )
            await send({"type": "http.response.body", "body": data})
            return True

    async def _attempt(
        self,
        scope: Scope,
        body: bytes,
        where: tuple[str, int],
        headers: dict[str, str],
        receive: Receive,
        send: Send,
        started: float,
    ) -> str | None:
        """One try on one replica: None once answered, else why nothing could be sent ("": the
        worker did not answer, else how its answer broke before its body began)."""
        try:
            answer = await self.upstreams.request(*where, "POST", scope["path"], body, headers)
        except (Unreachable, BrokenAnswer):
            return ""
        try:
            passed = [
                (name, answer.headers[name.decode()].encode("latin-1"))
                for name in PASSED
                if name.decode() in answer.headers
            ]
            start = {"type": "http.response.start", "status": answer.status, "headers": passed}
            if answer.header("content-length") is not None:
                try:
                    data = await answer.read()
                except BrokenAnswer as exc:
                    return str(exc) or "broken answer"
                # Counted when the answer is in, as the exporter times a Flask view (which
                # returns before its body is relayed).
                self._count(scope, answer.status, started)
                await send(start)
                await send({"type": "http.response.body", "body": data})
                return None
            watch = Disconnect(receive)
            try:
                chunks = aiter(answer)
                try:  # the head goes out with the first piece of body: until then, a retry
                    first = await anext(chunks)
                except StopAsyncIteration:
                    first = b""
                except BrokenAnswer as exc:
                    return str(exc) or "broken answer"
                self._count(scope, answer.status, started)
                await send(start)
                if first:
                    await send({"type": "http.response.body", "body": first, "more_body": True})
                try:
                    async for chunk in chunks:
                        if watch.gone:
                            return None
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                except BrokenAnswer:
                    pass  # the worker broke off: the body ends here, as a closed stream ends
                if watch.gone:
                    return None
            finally:
                watch.stop()
            await send({"type": "http.response.body", "body": b""})
            return None
        finally:
            answer.release()

    def _count(self, scope: Scope, status: int, started: float) -> None:
        """The exporter's request metrics, as Flask's view of this route would count them."""
        if self.metrics is None:
            return
        duration, total = self.metrics
        duration.labels(method="POST", url_rule=scope["path"], status=str(status)).observe(
            time.perf_counter() - started
        )
        total.labels(method="POST", status=str(status)).inc()


def _unanswered(model: str, tried: int) -> bytes:
    message = f"model {model!r}: none of the {tried} replicas tried answered"
    error = {"message": message, "type": "server_error", "code": "backend_unavailable"}
    return json.dumps({"error": error}).encode()


def _broken(reason: str) -> bytes:
    return json.dumps(
        {
            "error": {
                "message": f"the model's worker broke off its answer: {reason}",
                "type": "server_error",
                "code": "backend_unavailable",
            }
        }
    ).encode()


def create() -> ControlPlane:
    """The gunicorn entry point (``controlplane.asgi:create()``)."""
    return ControlPlane(create_app())
