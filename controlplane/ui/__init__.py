"""The operator web page ("Model Pool"): one static page that drives the control API.

``/ui`` serves the page, ``/ui/static/...`` its script and style sheet, and ``/`` redirects to
``/ui``. The page has no build step and loads nothing from other sites: everything it shows comes
from the control API (``/health``, ``/models``, ``/config``) through ``fetch``, with the
operator's API key (kept in the browser tab's sessionStorage) as a bearer token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from flask import Blueprint, Response, redirect, send_from_directory, url_for
from werkzeug.wrappers import Response as BaseResponse

STATIC_DIR: Final = Path(__file__).resolve().parent / "static"

#: The page runs only its own script and style sheet, and talks only to its own origin.
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

bp = Blueprint("ui", __name__, static_folder=str(STATIC_DIR), static_url_path="/ui/static")


@bp.after_request
def security_headers(resp: Response) -> Response:
    """No sniffing and no framing for the page's own responses; always revalidate."""
    resp.headers.setdefault("X-Content-Type-Options", "nosniff")
    resp.headers.setdefault("Cache-Control", "no-cache")
    return resp


@bp.get("/")
def root() -> BaseResponse:
    return redirect(url_for("ui.page"))


@bp.get("/ui", strict_slashes=False)
def page() -> Response:
    resp = send_from_directory(STATIC_DIR, "index.html")
    resp.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    resp.headers["X-Frame-Options"] = "DENY"
    resp.headers["Referrer-Policy"] = "no-referrer"
    return resp
