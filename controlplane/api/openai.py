"""The OpenAI-compatible front door: route by ``model``, load on demand, relay the answer.

Each request is counted in flight (``pool.begin_request``) from before the load until its
answer, streamed or not, has been relayed or the client went away; the reaper never unloads a
model with a request in flight.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from controlplane.adapters.proxy import Relay, WorkerProxy, WorkerUnreachable
from controlplane.errors import BackendDown, InvalidInput
from controlplane.pool import ModelPool
from controlplane.records import Record
from controlplane.service import PoolService
from model_service import jsonbody

bp = Blueprint("openai", __name__)
PROXY_EXT = "modelpool_proxy"
#: Tells the worker that the control plane already counts this request.
VIA_HEADER = "X-Modelpool-Via"


def _svc() -> PoolService:
    svc: PoolService = current_app.extensions["modelpool"]
    return svc


def _model_of(raw: bytes) -> str:
    try:
        body = jsonbody.load_object(raw)
    except jsonbody.BadJSON as exc:
        raise InvalidInput(f"body: not valid JSON ({exc})") from None
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidInput("model: missing (expected the id of a registered model)")
    return model


def begin_and_send(
    pool: ModelPool,
    proxy: WorkerProxy,
    model: str,
    path: str,
    payload: bytes,
    headers: dict[str, str],
) -> tuple[Record, int, Any, Any]:
    """Count a request in flight on a replica of ``model`` (waiting for a load if needed) and
    send it there. A replica that does not answer is left out and the request goes once more to
    another serving one. Returns the replica's record (``pool.release(model, rec.gen)`` ends
    the request), when it was counted (``time.monotonic_ns``), and the answer. Raises
    BackendDown when no replica answered."""
    failed: frozenset[str] = frozenset()
    while True:
        rec = pool.begin_request(model, avoid=failed)
        counted = time.monotonic_ns()
        try:
            assert rec.port is not None
            resp, done = proxy.send(
                pool.address_of(rec.node), rec.port, "POST", path, payload, headers
            )
            return rec, counted, resp, done
        except WorkerUnreachable as exc:
            pool.release(model, rec.gen)
            if failed or not pool.other_replica_serves(model, rec.key):
                raise BackendDown(f"model {model!r}: {exc}", retry_after=2) from None
            failed = frozenset({rec.key})  # once more, on another replica
        except BaseException:
            pool.release(model, rec.gen)
            raise


def _relay(path: str) -> Response:
    svc = _svc()
    raw = request.get_data(cache=False)
    model = _model_of(raw)
    proxy: WorkerProxy = current_app.extensions[PROXY_EXT]
    headers = {
        "Content-Type": "application/json",
        VIA_HEADER: "frontdoor",
        "Accept": request.headers.get("Accept", "*/*"),
    }
    if svc.pool.settings.api_key:
        headers["Authorization"] = f"Bearer {svc.pool.settings.api_key}"
    rec, _, resp, done = begin_and_send(svc.pool, proxy, model, path, raw, headers)
    relay = Relay(resp, done, lambda: svc.pool.release(model, rec.gen))
    out = Response(relay, status=resp.status, content_type=resp.getheader("Content-Type"))
    for name in ("Retry-After", "Cache-Control", "X-Accel-Buffering"):
        value = resp.getheader(name)
        if value is not None:
            out.headers[name] = value
    return out


@bp.post("/v1/chat/completions")
def chat_completions() -> Response:
    return _relay("/v1/chat/completions")


@bp.post("/v1/completions")
def completions() -> Response:
    return _relay("/v1/completions")


@bp.post("/v1/embeddings")
def embeddings() -> Response:
    return _relay("/v1/embeddings")


@bp.get("/v1/models")
def models() -> Response:
    pool = _svc().pool
    now = pool.clock()
    data: list[dict[str, Any]] = []
    for rec in pool.records():
        view = pool.describe(rec, now)
        data.append(
            {
                "id": view["model_id"],
                "object": "model",
                "created": int(rec.loaded_at or time.time()),
                "owned_by": "modelpool",
                "state": view["state"],
                "endpoint": view["endpoint"],
                "node": view["node"],
                "backend": view["backend"],
            }
        )
    return jsonify({"object": "list", "data": data})
