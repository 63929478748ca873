"""The worker: one model behind an OpenAI-compatible API (``create_app(spec)``).

The backend loads in a background thread; ``/health`` says ``loading`` until it is resident,
then ``ready`` (or ``error`` with the reason). Every ``/v1`` request is counted as in flight
until its response (streamed or not) is closed, so the control plane can see requests sent
straight to this port.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from flask import Flask, Response, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from werkzeug.exceptions import HTTPException

from model_service import jsonbody, params
from model_service.auth import KeySource, bearer_ok
from model_service.backends import make_backend
from model_service.backends.base import Backend, BackendError, Result
from model_service.metrics import WorkerMetrics
from model_service.spec import SPEC_DATA_ENV, SPEC_ENV, WorkerSpec

log = logging.getLogger("modelpool.worker")
VIA_HEADER = "X-Modelpool-Via"
MEMORY_REFRESH_SECONDS = 10.0
EXT = "modelpool_worker"
METRICS_EXT = "modelpool_worker_metrics"
KEYS_EXT = "modelpool_worker_keys"
ENDPOINTS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}


class WorkerState:
    """Load status and request counters of this worker (thread safe)."""

    def __init__(self, spec: WorkerSpec, backend: Backend) -> None:
        self.spec = spec
        self.backend = backend
        self.fingerprint = spec.fingerprint()
        self.status = "loading"
        self.error: str | None = None
        #: "permanent" (bad file, bad config, unknown model: retrying will not help) or
        #: "transient" (backend down, crash, timeout).
        self.error_kind: str | None = None
        #: The backend's last memory report (refreshed by watch_memory).
        self.memory: float | None = None
        self.started = time.time()
        self.ready_at: float | None = None
        self.requests_served = 0
        self.in_flight = 0
        #: Requests that did not come through the control plane's front door (which counts its
        #: own): the control plane adds these to what it counts.
        self.in_flight_direct = 0
        self.last_request_at: float | None = None
        self._lock = threading.Lock()
        self.ready = threading.Event()

    def load(self) -> None:
        try:
            self.backend.load()
        except BackendError as exc:
            self._finish("error", exc.message, exc.permanent)
        except Exception as exc:
            log.exception("loading %s failed", self.spec.model_id)
            self._finish("error", f"{type(exc).__name__}: {exc}", False)
        else:
            self._finish("ready", None, False)

    def _finish(self, status: str, error: str | None, permanent: bool) -> None:
        with self._lock:
            self.status = status
            self.error = error
            self.error_kind = ("permanent" if permanent else "transient") if error else None
            self.ready_at = time.time()
        self.ready.set()
        log.info("model=%s status=%s error=%s", self.spec.model_id, status, error)

    def begin(self, direct: bool) -> None:
        with self._lock:
            self.in_flight += 1
            self.in_flight_direct += direct
            self.last_request_at = time.time()

    def end(self, direct: bool, served: bool = True) -> None:
        with self._lock:
            self.in_flight -= 1
            self.in_flight_direct -= direct
            self.requests_served += served
            self.last_request_at = time.time()

    def watch_memory(self, every: float = MEMORY_REFRESH_SECONDS) -> None:
        """Refresh the backend's memory report in the background, so /health does no I/O
        (for Ollama it is an HTTP call to /api/ps, and /health is probed every second)."""
        self.ready.wait()
        while self.status == "ready":
            try:
                self.memory = self.backend.memory_mb()
            except Exception:
                self.memory = None
            time.sleep(every)

    def health(self) -> dict[str, Any]:
        memory = self.memory
        with self._lock:
            return {
                "model": self.spec.model_id,
                "backend": self.spec.backend,
                "status": self.status,
                "error": self.error,
                "error_kind": self.error_kind,
                "uptime_seconds": round(time.time() - self.started, 1),
                "requests_served": self.requests_served,
                "in_flight": self.in_flight,
                "in_flight_direct": self.in_flight_direct,
                "last_request_at": self.last_request_at,
                "memory_mb": memory,
                "port": self.spec.port,
                "pid": os.getpid(),
                "fingerprint": self.fingerprint,
                # How far the backend's load is (0..1) while loading, where it says.
                "progress": self.backend.load_progress() if self.status == "loading" else None,
            }


def error_response(
    message: str, status: int, type_: str, code: str, retry_after: int | None = None
) -> Response:
    resp = jsonify({"error": {"message": message, "type": type_, "code": code}})
    resp.status_code = status
    if retry_after is not None:
        resp.headers["Retry-After"] = str(int(retry_after))
    return resp


def _bad(message: str) -> Response:
    return error_response(message, 400, "invalid_request_error", "invalid_request")


def create_app(
    spec: WorkerSpec, backend: Backend | None = None, *, load_in_background: bool = True
) -> Flask:
    """The worker's Flask app for ``spec``; starts loading the model unless told not to."""
    app = Flask("model_service")
    app.config["MAX_CONTENT_LENGTH"] = spec.max_body_bytes
    if backend is None:
        try:
            backend = make_backend(spec)
        except BackendError as exc:
            # Report it through /health (status error) rather than failing to boot, so the
            # control plane shows the reason itself as the model's last error.
            backend = _Unavailable(spec.backend, exc)
    state = WorkerState(spec, backend)
    app.extensions[EXT] = state
    metrics = WorkerMetrics(spec.model_id, lambda: state.status == "ready", lambda: state.in_flight)
    app.extensions[METRICS_EXT] = metrics

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), mimetype=CONTENT_TYPE_LATEST)

    keys = KeySource(spec.api_key_file, spec.api_key)
    app.extensions[KEYS_EXT] = keys

    @app.before_request
    def require_key() -> Response | None:
        if not request.path.startswith("/v1/"):
            return None
        key = keys.get()
        if key is None:
            return error_response(
                f"this worker cannot read its API key file {spec.api_key_file}",
                503,
                "server_error",
                "key_unavailable",
                retry_after=5,
            )
        if not key:
            return None
        if bearer_ok(request.headers.get("Authorization"), key):
            return None
        resp = error_response(
            "missing or wrong API key: send Authorization: Bearer <api_key>",
            401,
            "invalid_request_error",
            "invalid_api_key",
        )
        resp.headers["WWW-Authenticate"] = "Bearer"
        return resp

    @app.get("/health")
    def health() -> Response:
        resp = jsonify(state.health())
        resp.status_code = 200 if state.status == "ready" else 503
        return resp

    @app.get("/v1/models")
    def models() -> Response:
        return jsonify(
            {
                "object": "list",
                "data": [
                    {
                        "id": spec.model_id,
                        "object": "model",
                        "created": int(state.started),
                        "owned_by": "modelpool",
                        "status": state.status,
                    }
                ],
            }
        )

    @app.post("/v1/chat/completions")
    def chat() -> Response:
        return _serve("chat")

    @app.post("/v1/completions")
    def completions() -> Response:
        return _serve("completions")

    @app.post("/v1/embeddings")
    def embeddings() -> Response:
        return _serve("embeddings")

    def _serve(kind: str) -> Response:
        try:
            body = jsonbody.load_object(request.get_data(cache=False))
        except jsonbody.BadJSON as exc:
            return _bad(f"body: not valid JSON ({exc})")
        problem = _validate(kind, body, spec.model_id)
        if problem is not None:
            return problem
        supports: frozenset[str] | None = getattr(state.backend, "supports", None)
        if supports is not None:  # None: a pass-through backend, its upstream decides
            message = params.unsupported(kind, body, supports)
            if message is not None:
                return _bad(message)
        if not state.ready.wait(spec.load_timeout_seconds):
            return error_response(
                "model is still loading", 503, "server_error", "model_loading", retry_after=5
            )
        if state.status != "ready":
            return error_response(
                f"model failed to load: {state.error}", 503, "server_error", "load_failed", 30
            )
        direct = request.headers.get(VIA_HEADER) != "frontdoor"
        endpoint = kind
        started = time.perf_counter()
        state.begin(direct)
        try:
            if kind == "chat":
                result = state.backend.chat_completions(body)
            elif kind == "embeddings":
                result = state.backend.embeddings(body)
            else:
                result = state.backend.completions(body)
        except BackendError as exc:
            state.end(direct)
            metrics.finished(endpoint, exc.status, started, None)
            return error_response(exc.message, exc.status, exc.type, exc.code, exc.retry_after)
        except BaseException:
            state.end(direct)
            metrics.finished(endpoint, 500, started, None)
            raise
        if result.stream is not None:
            result.stream = metrics.stream(endpoint, started, result.stream)
        else:
            usage = (result.json or {}).get("usage")
            metrics.finished(endpoint, result.status, started, usage)
        return _respond(result, lambda: state.end(direct))

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        kinds = {413: "request_too_large", 404: "not_found", 405: "method_not_allowed"}
        return error_response(
            exc.description or exc.name, status, "invalid_request_error", kinds.get(status, "error")
        )

    if load_in_background:
        threading.Thread(target=state.load, name="model-load", daemon=True).start()
        threading.Thread(target=state.watch_memory, name="model-memory", daemon=True).start()
    return app


class _Unavailable:
    """A backend that could not be created: its load fails with the reason."""

    def __init__(self, name: str, error: BackendError) -> None:
        self.name = name
        self.error = error

    def load(self) -> None:
        raise self.error

    def unload(self) -> None:
        return None

    def load_progress(self) -> float | None:
        return None

    def memory_mb(self) -> float | None:
        return None

    def chat_completions(self, body: dict[str, Any]) -> Result:
        raise self.error

    def completions(self, body: dict[str, Any]) -> Result:
        raise self.error

    def embeddings(self, body: dict[str, Any]) -> Result:
        raise self.error


def _validate(kind: str, body: dict[str, Any], model_id: str) -> Response | None:
    problem = request_problem(kind, body, model_id)
    if problem is None:
        return None
    if problem.startswith("model:"):
        return error_response(problem, 404, "invalid_request_error", "model_not_found")
    return _bad(problem)


def request_problem(kind: str, body: dict[str, Any], model_id: str) -> str | None:
    """What is wrong with a request's body, for the client (None: nothing); a message that
    starts with ``model:`` is a 404, any other a 400."""
    model = body.get("model")
    if model is not None and model != model_id:
        return f"model: this worker serves {model_id!r}, not {model!r}"
    if "stream" in body and not isinstance(body["stream"], bool):
        return f"stream: {body['stream']!r} is not a boolean"
    if kind == "chat":
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            return "messages: expected a non-empty list of messages"
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                return f"messages[{i}]: expected an object with a role"
    elif kind == "embeddings":
        inputs = body.get("input")
        if not (
            (isinstance(inputs, str) and inputs)
            or (isinstance(inputs, list) and inputs and all(isinstance(t, str) for t in inputs))
        ):
            return "input: expected a string or a non-empty list of strings"
    else:
        prompt = body.get("prompt")
        if not (
            isinstance(prompt, str)
            or (isinstance(prompt, list) and all(isinstance(p, str) for p in prompt))
        ):
            return "prompt: expected a string or a list of strings"
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        return f"max_tokens: {max_tokens!r} is not a positive integer"
    return None


def _respond(result: Result, on_close: Callable[[], None]) -> Response:
    if result.stream is not None:
        # werkzeug closes the iterable when the response is closed (end, or client gone), which
        # releases the backend's stream even if it was never started.
        resp = Response(result.stream, mimetype="text/event-stream")
        resp.headers["Cache-Control"] = "no-cache"
        resp.headers["X-Accel-Buffering"] = "no"
    else:
        resp = jsonify(result.json)
        resp.status_code = result.status
    for k, v in result.headers.items():
        resp.headers[k] = v
    resp.call_on_close(on_close)
    return resp


def create_app_from_env() -> Flask:
    """The gunicorn entry point: the spec in ``MODELPOOL_SPEC_DATA`` (a worker on a node, whose
    entry carries it) or in the file named by ``MODELPOOL_SPEC``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    data = os.environ.get(SPEC_DATA_ENV)
    if data:
        return create_app(WorkerSpec.decode(data))
    path = os.environ.get(SPEC_ENV)
    if not path:
        raise SystemExit(
            f"neither {SPEC_DATA_ENV} nor {SPEC_ENV} is set: one must give the worker's spec"
        )
    return create_app(WorkerSpec.read(path))
