"""The one place where errors become HTTP responses, in the OpenAI error shape."""

from __future__ import annotations

import math

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

from controlplane.adapters.supervisord import SupervisorUnavailable
from controlplane.errors import (
    BackendDown,
    Conflict,
    InvalidInput,
    LoadFailed,
    LoadTimeout,
    NoCapacity,
    PoolError,
    UnknownModel,
)
from controlplane.settings import ConfigError

STATUS: dict[type[PoolError], tuple[int, str]] = {
    InvalidInput: (400, "invalid_request_error"),
    UnknownModel: (404, "invalid_request_error"),
    Conflict: (409, "invalid_request_error"),
    NoCapacity: (503, "server_error"),
    LoadFailed: (503, "server_error"),
    BackendDown: (503, "server_error"),
    LoadTimeout: (504, "server_error"),
}


def error_body(
    message: str, type_: str, code: str, status: int, retry_after: float | None = None
) -> Response:
    resp = jsonify({"error": {"message": message, "type": type_, "code": code}})
    resp.status_code = status
    if retry_after is not None:
        seconds = retry_after if math.isfinite(retry_after) else 3600
        resp.headers["Retry-After"] = str(max(1, math.ceil(min(seconds, 3600))))
    return resp


def from_pool_error(exc: PoolError) -> Response:
    status, type_ = STATUS.get(type(exc), (500, "server_error"))
    retry = exc.retry_after
    if status == 503 and retry is None:
        retry = 5
    return error_body(exc.message, type_, exc.code, status, retry)


def register(app: Flask) -> None:
    """Install the handlers that map domain and HTTP errors to JSON."""

    @app.errorhandler(PoolError)
    def pool_error(exc: PoolError) -> Response:
        return from_pool_error(exc)

    @app.errorhandler(ConfigError)
    def config_error(exc: ConfigError) -> Response:
        return error_body(str(exc), "invalid_request_error", "invalid_config", 400)

    @app.errorhandler(SupervisorUnavailable)
    def supervisor_down(exc: SupervisorUnavailable) -> Response:
        return error_body(str(exc), "server_error", "supervisord_unavailable", 503, 5)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        app.logger.exception("unexpected error: %s", exc)
        return error_body(
            f"internal error: {type(exc).__name__}: {exc}", "server_error", "internal_error", 500
        )

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        codes = {
            400: "invalid_request",
            404: "not_found",
            405: "method_not_allowed",
            413: "request_too_large",
        }
        type_ = "invalid_request_error" if status < 500 else "server_error"
        return error_body(exc.description or exc.name, type_, codes.get(status, "error"), status)
