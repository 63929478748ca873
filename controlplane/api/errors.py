"""The one place where errors become HTTP responses, in the OpenAI error shape."""

from __future__ import annotations

import math
import re
from typing import Any

from flask import Flask, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed
from werkzeug.routing import Rule
from werkzeug.routing.exceptions import RoutingException

from controlplane.adapters.supervisord import SupervisorUnavailable
from controlplane.errors import (
    BackendDown,
    Conflict,
    InvalidInput,
    LoadCancelled,
    LoadFailed,
    LoadTimeout,
    NoCapacity,
    PoolError,
    UnknownJob,
    UnknownLease,
    UnknownModel,
)
from controlplane.settings import ConfigError

STATUS: dict[type[PoolError], tuple[int, str]] = {
    InvalidInput: (400, "invalid_request_error"),
    UnknownModel: (404, "invalid_request_error"),
    UnknownLease: (404, "invalid_request_error"),
    UnknownJob: (404, "invalid_request_error"),
    Conflict: (409, "invalid_request_error"),
    LoadCancelled: (409, "invalid_request_error"),
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


def _literal_length(rule: Rule) -> int:
    """How much of a rule is literal text: the more, the more specific the route."""
    return len(re.sub(r"<[^<>]*>", "", rule.rule))


def allowed_methods(methods: set[str] | None = None) -> list[str]:
    """The methods of the route the request's path really is, for ``Allow``.

    Werkzeug answers with every method of every rule that matches the path, but
    ``/models/<path:model_id>`` also matches ``/models/m/load`` (and ``/models/register``):
    only the most specific of the matching rules is the path's route (the model id itself can
    never end in ``/load``). ``methods`` are the methods routing found for the path (all of
    them when not given).
    """
    adapter = current_app.create_url_adapter(request)
    if adapter is None:
        return sorted(methods or ())
    if methods is None:
        methods = set(adapter.allowed_methods())
    rules: dict[tuple[str, str], Rule] = {}  # Rule is not hashable
    for method in sorted(methods):
        try:
            rule, _ = adapter.match(method=method, return_rule=True)
        except (HTTPException, RoutingException):
            continue
        rules[(rule.rule, rule.endpoint)] = rule
    if not rules:
        return sorted(methods)
    best = max(_literal_length(r) for r in rules.values())
    return sorted(
        {m for r in rules.values() if _literal_length(r) == best for m in r.methods or ()}
    )


def register(app: Flask) -> None:
    """Install the handlers that map domain and HTTP errors to JSON.

    A 405 names the methods of the path's route in ``Allow`` (RFC 9110), and so does the
    automatic answer to ``OPTIONS``. A request that routing gave to a less specific route
    (``GET /models/m/load`` to ``GET /models/<path:model_id>``) is a 405 of the path's route,
    answered where routing errors are: after the API key check.
    """

    @app.url_value_preprocessor
    def route_of_path(endpoint: str | None, values: dict[str, Any] | None) -> None:
        rule = request.url_rule
        # Only a rule whose converter takes slashes can match a more specific route's path.
        if rule is None or "<path:" not in rule.rule:
            return
        allowed = allowed_methods()
        if request.method not in allowed:
            request.routing_exception = MethodNotAllowed(valid_methods=allowed)

    @app.after_request
    def exact_options(resp: Response) -> Response:
        rule = request.url_rule
        if (
            request.method == "OPTIONS"
            and rule is not None
            and getattr(rule, "provide_automatic_options", False)
            and "Allow" in resp.headers
        ):
            resp.headers["Allow"] = ", ".join(allowed_methods())
        return resp

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
        message = exc.description or exc.name
        allow = None
        if isinstance(exc, MethodNotAllowed):
            allow = ", ".join(allowed_methods(set(exc.valid_methods or ())))
            message = f"{request.method} is not allowed on {request.path} (Allow: {allow})"
        resp = error_body(message, type_, codes.get(status, "error"), status)
        if allow is not None:
            resp.headers["Allow"] = allow
        return resp
