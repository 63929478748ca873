"""Load jobs over HTTP: what each load is doing, and cancelling one (``pool_jobs.py``)."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify

from controlplane.api.control import service

bp = Blueprint("jobs", __name__)


@bp.get("/jobs")
def list_jobs() -> Response:
    return jsonify({"jobs": service().pool.jobs()})


@bp.get("/jobs/<job_id>")
def get_job(job_id: str) -> Response:
    return jsonify(service().pool.job(job_id))


@bp.delete("/jobs/<job_id>")
def cancel(job_id: str) -> Response:
    return jsonify(service().pool.cancel_job(job_id))
