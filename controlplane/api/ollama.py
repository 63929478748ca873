"""Ollama's own API on the front door, so clients that speak it use the pool (OLLAMA_HOST=:8050).

``/api/chat``, ``/api/generate`` and ``/api/embed`` are routed by ``model`` and loaded on demand
exactly like ``/v1`` (``pool.begin_request`` ... ``pool.release``); the request is translated to
the worker's OpenAI endpoint and the answer back to Ollama's shape (NDJSON when streamed, which
is Ollama's default) by the pure ``controlplane.core.ollama_api`` / ``ollama_answers``. A
request stays in flight until its answer is fully relayed.

``keep_alive`` is the pool's TTL, never the backend's: a duration extends the model's TTL as
``extend-ttl`` does (clamped to the max TTL; negative: the max TTL), 0 unloads the model once
the answer is relayed (a model that never expires, such as a warmup model, stays).
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, redirect, request, url_for
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response as BaseResponse

from controlplane.adapters.proxy import Relay, WorkerProxy
from controlplane.api.errors import from_pool_error
from controlplane.api.openai import PROXY_EXT, VIA_HEADER, begin_and_send
from controlplane.core import ollama_answers as answers
from controlplane.core import ollama_api as api
from controlplane.core.states import SERVING, State
from controlplane.errors import BackendDown, Conflict, PoolError, UnknownModel
from controlplane.pool import ModelPool
from controlplane.records import Record
from controlplane.service import PoolService
from model_service import jsonbody

bp = Blueprint("ollama", __name__)
#: Names the request's runner options (num_ctx, ...) that the registry entry decides instead.
IGNORED_HEADER = "X-Modelpool-Ignored-Options"
NDJSON = "application/x-ndjson"
CLOCK = answers.Clock(wall=time.time, mono_ns=time.monotonic_ns)


def _svc() -> PoolService:
    svc: PoolService = current_app.extensions["modelpool"]
    return svc


def ollama_error(status: int, message: str, retry_after: str | None = None) -> Response:
    """An error in Ollama's shape, ``{"error": "..."}``."""
    resp = jsonify({"error": message})
    resp.status_code = status
    if retry_after is not None:
        resp.headers["Retry-After"] = retry_after
    return resp


@bp.errorhandler(PoolError)
def pool_error(exc: PoolError) -> Response:
    # The status and Retry-After the rest of the API gives; the body in Ollama's shape.
    shaped = from_pool_error(exc)
    return ollama_error(shaped.status_code, exc.message, shaped.headers.get("Retry-After"))


@bp.errorhandler(api.BadRequest)
def bad_request(exc: api.BadRequest) -> Response:
    return ollama_error(400, str(exc))


@bp.errorhandler(HTTPException)
def http_error(exc: HTTPException) -> Response:
    return ollama_error(exc.code or 500, exc.description or exc.name)


@bp.errorhandler(Exception)
def unexpected(exc: Exception) -> Response:
    current_app.logger.exception("unexpected error: %s", exc)
    return ollama_error(500, f"internal error: {type(exc).__name__}: {exc}")


@bp.route("/", methods=["GET", "HEAD"])
def root() -> BaseResponse:
    """Ollama's liveness answer for clients that probe it; a browser goes to the web page."""
    if any(mime == "text/html" for mime, _ in request.accept_mimetypes):
        return redirect(url_for("ui.page"))
    return Response("Ollama is running", mimetype="text/plain")


@bp.get("/api/version")
def version() -> Response:
    return jsonify({"version": api.API_VERSION})


def _facts(pool: ModelPool, rec: Record, now: float) -> answers.ModelFacts:
    view = pool.describe(rec, now)
    loaded = rec.state in SERVING
    deadline = view["deadline"]
    if rec.state is State.COOLING:
        deadline = view["grace_until"]
    return answers.ModelFacts(
        model_id=rec.entry.model_id,
        backend=rec.entry.backend,
        model_type=rec.entry.model_type,
        state=rec.state.value,
        memory_mb=rec.memory(),
        modified_at=rec.loaded_at or rec.since or now,
        expires_at=deadline if loaded else None,
        ttl_minutes=view["ttl_minutes"],
        tags=rec.entry.tags,
        options=rec.entry.options,
    )


@bp.get("/api/tags")
def tags() -> Response:
    """Every registered model, loaded or not."""
    pool = _svc().pool
    now = pool.clock()
    return jsonify({"models": [answers.tags_entry(_facts(pool, r, now)) for r in pool.shown()]})


@bp.get("/api/ps")
def ps() -> Response:
    """Loaded models: ``expires_at`` is the TTL deadline, the sizes the pool's memory figure."""
    pool = _svc().pool
    now = pool.clock()
    loaded = [r for r in pool.shown() if r.state in SERVING]  # a replica serving: loaded
    return jsonify({"models": [answers.ps_entry(_facts(pool, r, now), now) for r in loaded]})


def _body() -> dict[str, Any]:
    try:
        return jsonbody.load_object(request.get_data(cache=False))
    except jsonbody.BadJSON as exc:
        raise api.BadRequest(f"body: not valid JSON ({exc})") from None


def _resolve(pool: ModelPool, name: str) -> str:
    model_id = api.resolve_model(name, pool.ids())
    if model_id is None:
        raise UnknownModel(name)
    return model_id


@bp.post("/api/show")
def show() -> Response:
    pool = _svc().pool
    model_id = _resolve(pool, api.model_name(_body(), legacy_name=True))
    return jsonify(answers.show_answer(_facts(pool, pool.record(model_id), pool.clock())))


@bp.post("/api/chat")
def chat() -> Response:
    return _serve(api.chat_plan(_body()))


@bp.post("/api/generate")
def generate() -> Response:
    return _serve(api.generate_plan(_body()))


@bp.post("/api/embed")
def embed() -> Response:
    return _serve(api.embed_plan(_body()))


class _Finish:
    """The end of one request, run once: no longer in flight, then ``keep_alive: 0``'s unload."""

    def __init__(self, pool: ModelPool, model_id: str, gen: int, unload: bool) -> None:
        self.pool, self.model_id, self.gen, self.unload = pool, model_id, gen, unload
        self._done = False

    def __call__(self) -> None:
        if self._done:
            return
        self._done = True
        self.pool.release(self.model_id, self.gen)
        if self.unload:
            _unload(self.pool, self.model_id)


def _unload(pool: ModelPool, model_id: str) -> None:
    """``keep_alive: 0``: unload a loaded model unless it is kept for good (TTL 0)."""
    try:
        rec = pool.record(model_id)
        if rec.state in SERVING and pool.describe(rec)["expires"]:
            pool.unload(model_id, reason="keep_alive")
    except PoolError:  # deleted, or its state changed meanwhile: nothing to unload
        pass


def _extend(pool: ModelPool, model_id: str, keep: api.KeepAlive | None) -> None:
    minutes = None if keep is None else keep.extend_minutes(pool.settings.max_ttl_minutes)
    if minutes is not None:
        try:
            pool.extend_ttl(model_id, minutes)
        except Conflict:  # unloaded under the request (forced): the request fails on its own
            pass


def _headers(plan: api.Plan, resp: Response) -> Response:
    if plan.ignored:
        resp.headers[IGNORED_HEADER] = ", ".join(plan.ignored)
    return resp


def _serve(plan: api.Plan) -> Response:
    started = time.monotonic_ns()
    svc = _svc()
    pool = svc.pool
    model_id = _resolve(pool, plan.model)
    if plan.load_only:
        return _headers(plan, _load_only(pool, plan, model_id))
    proxy: WorkerProxy = current_app.extensions[PROXY_EXT]
    headers = {"Content-Type": "application/json", VIA_HEADER: "frontdoor"}
    if pool.settings.api_key:
        headers["Authorization"] = f"Bearer {pool.settings.api_key}"
    payload = json.dumps({"model": model_id, **plan.body}).encode()
    # Waits for a load; counts the request in flight on the replica it goes to.
    rec, loaded, resp, done = begin_and_send(pool, proxy, model_id, plan.path, payload, headers)
    unload = plan.keep_alive is not None and plan.keep_alive.unload
    finish = _Finish(pool, model_id, rec.gen, unload)
    try:
        _extend(pool, model_id, plan.keep_alive)
    except BaseException:
        done(False)  # the answer is not read: its connection is not reused
        finish()
        raise
    timing = answers.Timing(started=started, loaded=loaded, sent=time.monotonic_ns())
    if resp.status == 200 and plan.stream:
        relay = NdjsonRelay(
            Relay(resp, done, finish),
            lambda events: answers.ndjson_stream(events, plan, model_id, timing, CLOCK),
        )
        out = Response(relay, content_type=NDJSON)
        out.headers["X-Accel-Buffering"] = "no"
        return _headers(plan, out)
    try:
        raw, status, retry = _read_all(resp, done)
    finally:
        finish()
    return _headers(plan, _answer(plan, model_id, raw, status, retry, timing))


def _read_all(
    resp: http.client.HTTPResponse, done: Callable[[bool], None]
) -> tuple[bytes, int, str | None]:
    try:
        raw = resp.read()
    except (OSError, http.client.HTTPException) as exc:
        resp.close()
        done(False)
        raise BackendDown(f"the worker's answer broke off: {exc}", retry_after=2) from None
    done(True)
    return raw, resp.status, resp.getheader("Retry-After")


def _answer(
    plan: api.Plan,
    model_id: str,
    raw: bytes,
    status: int,
    retry: str | None,
    timing: answers.Timing,
) -> Response:
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if status != 200:
        fallback = raw.decode(errors="replace").strip()[:500] or f"HTTP {status}"
        return ollama_error(status, answers.error_text(data, fallback), retry)
    if not isinstance(data, dict):
        return ollama_error(502, "the worker answered with something that is not a JSON object")
    try:
        if plan.kind == "embed":
            return jsonify(answers.embed_answer(data, model_id, timing, CLOCK))
        return jsonify(answers.chat_answer(data, plan, model_id, timing, CLOCK))
    except answers.BadAnswer as exc:
        return ollama_error(502, str(exc))


def _load_only(pool: ModelPool, plan: api.Plan, model_id: str) -> Response:
    """No prompt: load the model (as Ollama does), or with ``keep_alive: 0`` unload it."""
    keep = plan.keep_alive
    if keep is not None and keep.unload:
        _unload(pool, model_id)
        return jsonify(answers.load_answer(plan, model_id, time.time(), unloaded=True))
    rec = pool.begin_request(model_id)
    try:
        _extend(pool, model_id, keep)
    finally:
        pool.release(model_id, rec.gen)
    return jsonify(answers.load_answer(plan, model_id, time.time(), unloaded=False))


class NdjsonRelay:
    """A worker's SSE answer relayed as Ollama's NDJSON lines.

    The body is read through ``Relay`` (a class whose ``close`` releases the connection and
    ends the request's in-flight count exactly once, even if no line was ever asked for) and
    translated by the pure generator ``ollama_answers.ndjson_stream``.
    """

    def __init__(
        self, body: Relay, translate: Callable[[Iterator[bytes]], Generator[bytes, None, None]]
    ) -> None:
        self._body = body
        self._lines = translate(answers.sse_data(body))
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        try:
            return next(self._lines)
        except StopIteration:
            # The translation ends at the worker's [DONE]: read the end of the body after it,
            # so that the connection goes back to the pool.
            for _ in self._body:
                pass
            raise

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._lines.close()
        finally:
            self._body.close()
