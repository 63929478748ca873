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
