"""Small validators of config values: each error names the key and the value and says what was
expected (nothing is clamped silently)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

HOST_RE: Final = re.compile(r"^[A-Za-z0-9.:-]+$")
MODEL_ID_MAX: Final = 200
MODEL_ID_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$")
#: A model id may not end in one of these after a '/': /models/<id>/<segment> is a route.
RESERVED_LAST_SEGMENTS: Final = frozenset(
    {"health", "load", "unload", "extend-ttl", "leases", "scale"}
)


class ConfigError(ValueError):
    """Invalid configuration or registry input; the message names the key."""


# --- small validators -------------------------------------------------------------------------


def check_number(
    key: str, value: Any, *, minimum: float | None = None, integer: bool = False
) -> Any:
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok:
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{key}: {value!r} is not {kind}")
    number: float = value
    if not math.isfinite(number):
        raise ConfigError(f"{key}: {value!r} is not a finite number")
    if minimum is not None and number < minimum:
        raise ConfigError(f"{key}: {value!r} is below the minimum {minimum}")
    return value if integer else float(number)


def check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: {value!r} is not a boolean (true or false)")
    return value


def check_str(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: {value!r} is not a string")
    return value


def check_url(key: str, value: Any, *, empty_ok: bool = False) -> str:
    text = check_str(key, value)
    if empty_ok and text == "":
        return text
    if not re.match(r"^https?://[^\s/]+", text):
        raise ConfigError(f"{key}: {value!r} is not an http:// or https:// URL")
    return text.rstrip("/")


def check_port(key: str, value: Any) -> int:
    port = int(check_number(key, value, integer=True))
    if not 1 <= port <= 65535:
        raise ConfigError(f"{key}: {port} is not a TCP port (1-65535)")
    return port


def check_str_list(key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list | tuple):
        raise ConfigError(f"{key}: {value!r} is not a list of strings")
    return tuple(check_str(f"{key}[{i}]", v) for i, v in enumerate(value))


@dataclass(frozen=True)
class PortRange:
    start: int = 8051
    end: int = 8099


def check_port_range(key: str, value: Any) -> PortRange:
    if isinstance(value, PortRange):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: {value!r} is not a mapping with start and end")
    unknown = sorted(set(value) - {"start", "end"})
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}: unknown key (expected start, end)")
    start = check_port(f"{key}.start", value.get("start", 8051))
    end = check_port(f"{key}.end", value.get("end", 8099))
    if end < start:
        raise ConfigError(f"{key}.end: {end} is below {key}.start {start}")
    return PortRange(start, end)


def check_host(key: str, value: Any) -> str:
    text = check_str(key, value)
    # fullmatch: `$` would let a final newline through ("localhost\n" binds nothing).
    if not HOST_RE.fullmatch(text):
        hint = " (an empty host binds nothing; 0.0.0.0 is every address)" if not text else ""
        raise ConfigError(f"{key}: {text!r} is not an IP address or host name{hint}")
    return text


def check_range(minimum: float, maximum: float) -> Callable[[str, Any], Any]:
    def check(key: str, value: Any) -> Any:
        number = check_number(key, value, minimum=minimum)
        if number > maximum:
            raise ConfigError(f"{key}: {value!r} is above the maximum {maximum:g}")
        return number

    return check


#: RFC 6750 bearer token characters: what a client can put in an Authorization header.
TOKEN_RE: Final = re.compile(r"^[A-Za-z0-9._~+/-]+=*$")


def check_api_key(key: str, value: Any) -> str:
    text = check_str(key, value)
    if text and not TOKEN_RE.fullmatch(text):  # fullmatch: no trailing newline either
        raise ConfigError(
            f"{key}: may hold only letters, digits and - . _ ~ + / (then =), as a bearer token"
        )
    return text


def check_paths(key: str, value: Any) -> tuple[str, ...]:
    paths = check_str_list(key, value)
    for i, p in enumerate(paths):
        if not p.startswith("/") or any(c.isspace() for c in p):
            raise ConfigError(f"{key}[{i}]: {p!r} is not a URL path starting with /")
    return paths


def check_choice(choices: tuple[str, ...]) -> Callable[[str, Any], Any]:
    def check(key: str, value: Any) -> str:
        text = check_str(key, value)
        if text not in choices:
            raise ConfigError(f"{key}: {text!r} is not one of {', '.join(choices)}")
        return text

    return check


def check_int(minimum: int) -> Callable[[str, Any], Any]:
    return lambda k, v: check_number(k, v, minimum=minimum, integer=True)


def validate_model_id(value: Any, key: str = "model_id") -> str:
    """A model id: 1-200 characters of letters, digits and ``. _ : / @ + -``."""
    text = check_str(key, value)
    if not text:
        raise ConfigError(f"{key}: must not be empty")
    if len(text) > MODEL_ID_MAX:
        raise ConfigError(f"{key}: {len(text)} characters, more than {MODEL_ID_MAX}")
    if not MODEL_ID_RE.fullmatch(text) or ".." in text.split("/") or "//" in text:
        raise ConfigError(
            f"{key}: {text!r} may hold only letters, digits and . _ : / @ + - "
            "(starting with a letter or digit)"
        )
    if text == "register":
        raise ConfigError(f"{key}: 'register' is reserved by the API (POST /models/register)")
    if "/" in text and text.rsplit("/", 1)[1] in RESERVED_LAST_SEGMENTS:
        raise ConfigError(
            f"{key}: {text!r} ends in /{text.rsplit('/', 1)[1]}, which the API reserves "
            "(/models/{id}/health, /load, ...)"
        )
    return text
