"""Strict JSON for request bodies: NaN and Infinity are not JSON, and nothing downstream can
forward them, so they are bad input (400), not a crash later (500)."""

from __future__ import annotations

import json
from typing import Any


class BadJSON(ValueError):
    """The body is not strict JSON; the message says where."""


def _reject(name: str) -> Any:
    raise BadJSON(f"{name} is not a JSON number")


def loads(raw: bytes | str) -> Any:
    """``json.loads`` that refuses NaN, Infinity and -Infinity."""
    try:
        return json.loads(raw, parse_constant=_reject)
    except BadJSON:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadJSON(str(exc)) from None


def load_object(raw: bytes | str) -> dict[str, Any]:
    """A request body that must be a JSON object; BadJSON says what is wrong."""
    data = loads(raw)
    if not isinstance(data, dict):
        raise BadJSON("expected a JSON object")
    return data
