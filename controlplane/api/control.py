"""The control API: registry, lifecycle and configuration of models."""

from __future__ import annotations

import math
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from controlplane.errors import InvalidInput
from controlplane.service import PoolService
from model_service import jsonbody

bp = Blueprint("control", __name__)


def service() -> PoolService:
    svc: PoolService = current_app.extensions["modelpool"]
    return svc


def body(optional: bool = True) -> dict[str, Any]:
    """The JSON object sent with the request ({} if none and ``optional``)."""
    raw = request.get_data(cache=True)
    if not raw.strip():
        if optional:
            return {}
        raise InvalidInput("body: expected a JSON object")
    try:
        return jsonbody.load_object(raw)
    except jsonbody.BadJSON as exc:
        raise InvalidInput(f"body: not valid JSON ({exc})") from None


def flag(data: dict[str, Any], key: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise InvalidInput(f"{key}: {value!r} is not a boolean")
    return value


def positive(data: dict[str, Any], key: str, required: bool = False) -> float | None:
    value = data.get(key)
    if value is None:
        if required:
            raise InvalidInput(f"{key}: missing (expected a number of {key})")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidInput(f"{key}: {value!r} is not a number")
    if value <= 0:
        raise InvalidInput(f"{key}: {value!r} must be greater than 0")
    return float(value)


@bp.get("/models")
def list_models() -> Response:
    pool = service().pool
    now = pool.clock()
    return jsonify({"models": [pool.describe(r, now) for r in pool.records()]})


@bp.get("/nodes")
def list_nodes() -> Response:
    """Every node: UP or DOWN (and why), address, memory used and limit, models."""
    return jsonify({"nodes": service().pool.nodes_view()})


@bp.post("/models/register")
def register() -> tuple[Response, int]:
    entry = service().register(body(optional=False))
    pool = service().pool
    return jsonify(
        {"registered": entry.model_id, "model": pool.describe(pool.record(entry.model_id))}
    ), 201


@bp.get("/models/<path:model_id>/health")
def model_health(model_id: str) -> Response:
    svc = service()
    rec = svc.pool.record(model_id)
    view = svc.pool.describe(rec)
    worker = None
    if rec.port is not None and view["state"] in ("WARMING", "HOT", "COOLING", "UNLOADING"):
        health = svc.probe.health(svc.pool.address_of(rec.node), rec.port, 2.0)
        worker = health.raw if health is not None else {"status": "unreachable"}
    return jsonify(
        {
            "model_id": model_id,
            "state": view["state"],
            "port": rec.port,
            "pid": view["pid"],
            "uptime_seconds": round(svc.pool.clock() - rec.loaded_at, 1)
            if rec.loaded_at and view["state"] in ("HOT", "COOLING")
            else None,
            "last_error": rec.last_error,
            "history": [
                {"from": t.old.value, "to": t.new.value, "at": t.at, "reason": t.reason}
                for t in rec.history
            ],
            "worker": worker,
        }
    )


@bp.post("/models/<path:model_id>/load")
def load(model_id: str) -> tuple[Response, int]:
    data = body()
    wait = flag(data, "wait")
    timeout = positive(data, "timeout")
    pool = service().pool
    if wait:
        pool.ensure_loaded(model_id, timeout, manual=True, wait=True)
    else:
        pool.load_job(model_id, timeout)  # started, or queued for room: the view's job
    view = pool.describe(pool.record(model_id))
    return jsonify(view), 200 if view["state"] in ("HOT", "COOLING") else 202


@bp.post("/models/<path:model_id>/unload")
def unload(model_id: str) -> tuple[Response, int]:
    data = body()
    pool = service().pool
    pool.unload(model_id, force=flag(data, "force"), wait=flag(data, "wait"))
    view = pool.describe(pool.record(model_id))
    return jsonify(view), 200 if view["state"] == "COLD" else 202


@bp.post("/models/<path:model_id>/extend-ttl")
def extend_ttl(model_id: str) -> Response:
    minutes = positive(body(optional=False), "minutes", required=True)
    assert minutes is not None
    pool = service().pool
    rec, clamped = pool.extend_ttl(model_id, minutes)
    view = pool.describe(rec)
    view["clamped"] = clamped
    view["max_ttl_minutes"] = pool.settings.max_ttl_minutes
    return jsonify(view)


@bp.post("/models/<path:model_id>/scale")
def scale(model_id: str) -> Response:
    """Pin the model's replica count (``{"replicas": N}``, within its min..max) or give it back
    to scaling by load (``{"replicas": null}``)."""
    data = body(optional=False)
    if "replicas" not in data:
        raise InvalidInput("replicas: missing (expected a count of replicas, or null)")
    count = data["replicas"]
    if count is not None and (isinstance(count, bool) or not isinstance(count, int)):
        raise InvalidInput(f"replicas: {count!r} is not an integer (or null)")
    pool = service().pool
    pool.pin_replicas(model_id, count)
    pool.scale_replicas()  # the first step at once, not at the reaper's next pass
    return jsonify(pool.describe(pool.record(model_id)))


@bp.get("/models/<path:model_id>")
def get_model(model_id: str) -> Response:
    pool = service().pool
    return jsonify(pool.describe(pool.record(model_id)))


@bp.put("/models/<path:model_id>")
def update(model_id: str) -> Response:
    entry = service().update(model_id, body(optional=False))
    pool = service().pool
    return jsonify({"updated": entry.model_id, "model": pool.describe(pool.record(model_id))})


@bp.delete("/models/<path:model_id>")
def delete(model_id: str) -> Response:
    service().delete(model_id)
    return jsonify({"deleted": model_id})


@bp.get("/config")
def get_config() -> Response:
    return jsonify(service().pool.settings.public_dict())


@bp.patch("/config")
def patch_config() -> Response:
    settings, restart = service().patch_config(body(optional=False))
    data = settings.public_dict()
    return jsonify({"config": data, "restart_required": restart})


@bp.post("/drain")
def drain() -> Response:
    """Unload every model (drained, reason "shutdown") and refuse new loads until a restart.

    ``modelpool down`` calls this before it stops supervisord.
    """
    svc = service()
    timeout = positive(body(), "timeout") or svc.pool.settings.graceful_shutdown_seconds + 30
    left = svc.pool.drain(timeout)
    return jsonify({"drained": not left, "still_loaded": left})
