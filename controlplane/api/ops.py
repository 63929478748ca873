"""Operations endpoints: ``/health`` and ``/metrics``."""

from __future__ import annotations

import os

from flask import Blueprint, Response, current_app, jsonify

from controlplane.service import PoolService

bp = Blueprint("ops", __name__)


@bp.get("/health")
def health() -> tuple[Response, int]:
    svc: PoolService = current_app.extensions["modelpool"]
    reachable = svc.supervisor_reachable()
    data = svc.pool.summary()
    data["status"] = "healthy" if reachable and svc.started else "degraded"
    data["supervisord"] = "ok" if reachable else "unreachable"
    data["reaper_last_pass"] = svc.reaper.last_tick
    data["pid"] = os.getpid()
    ordered = {"status": data.pop("status"), **data}
    return jsonify(ordered), 200 if ordered["status"] == "healthy" else 503


@bp.get("/health/live")
def live() -> Response:
    """Liveness: the control plane process answers."""
    return jsonify({"status": "alive", "pid": os.getpid()})


@bp.get("/health/ready")
def ready() -> tuple[Response, int]:
    """Readiness: supervisord reachable, pool started (registry loaded and validated, workers
    adopted), reaper alive (it passed within the last few seconds)."""
    svc: PoolService = current_app.extensions["modelpool"]
    last = svc.reaper.last_tick
    checks = {
        "supervisord": svc.supervisor_reachable(),
        "pool_started": svc.started,
        "reaper": last is not None and svc.pool.clock() - last < 5.0,
    }
    ok = all(checks.values())
    body = {
        "status": "ready" if ok else "not_ready",
        "checks": checks,
        "registered_models": len(svc.pool.ids()),
    }
    return jsonify(body), 200 if ok else 503


@bp.get("/sd/workers")
def sd_workers() -> Response:
    """Prometheus HTTP service discovery: every model worker that serves /metrics."""
    svc: PoolService = current_app.extensions["modelpool"]
    groups = [
        {
            "targets": [f"{svc.pool.address_of(w.node)}:{w.port}"],
            "labels": {
                "model": w.model_id,
                "backend": w.backend,
                "program": w.program,
                "node": w.node,
            },
        }
        for w in svc.pool.loaded()
    ]
    return jsonify(groups)
