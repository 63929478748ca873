"""Leases over HTTP: an agent holds a model for a task (``controlplane/pool_leases.py``)."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

from controlplane.api.control import body, service
from controlplane.core.leases import Lease
from controlplane.errors import InvalidInput

bp = Blueprint("leases", __name__)
DEFAULT_SECONDS = 600.0


def _lease_body(allowed: frozenset[str]) -> dict[str, Any]:
    data = body()
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise InvalidInput(f"{unknown[0]}: unknown key (expected {', '.join(sorted(allowed))})")
    return data


def _answer(model_id: str, lease: Lease) -> dict[str, Any]:
    pool = service().pool
    rec = pool.record(model_id)
    return {**lease.view(), "model_id": model_id, "state": rec.state.value}


@bp.post("/models/<path:model_id>/leases")
def create(model_id: str) -> tuple[Response, int]:
    data = _lease_body(frozenset({"seconds", "holder"}))
    lease = service().pool.add_lease(
        model_id, data.get("seconds", DEFAULT_SECONDS), data.get("holder")
    )
    return jsonify(_answer(model_id, lease)), 201


@bp.post("/models/<path:model_id>/leases/<lease_id>/renew")
def renew(model_id: str, lease_id: str) -> Response:
    data = _lease_body(frozenset({"seconds", "holder"}))
    lease = service().pool.renew_lease(model_id, lease_id, data.get("seconds", DEFAULT_SECONDS))
    return jsonify(_answer(model_id, lease))


@bp.delete("/models/<path:model_id>/leases/<lease_id>")
def end(model_id: str, lease_id: str) -> tuple[str, int]:
    service().pool.end_lease(model_id, lease_id)
    return "", 204
