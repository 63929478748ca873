"""Talking to Ollama over HTTP: the session, the timeouts, and Ollama's words for a failure.
Shared by the backend (``model_service.backends.ollama``), its pulls and the control plane's
drift repair."""

from __future__ import annotations

import re
from typing import Any, Final

import requests
from requests.adapters import HTTPAdapter

KEEP_FOREVER: Final = -1
CONNECT_TIMEOUT: Final = 5.0
#: A non-streamed answer arrives only once the whole generation is done, so reads may be slow.
READ_TIMEOUT: Final = 600.0
#: Unload and /api/ps are bookkeeping calls: answer quickly or be skipped.
CONTROL_TIMEOUT: Final = (2.0, 10.0)
MIB: Final = 1024 * 1024


def new_session() -> requests.Session:
    session = requests.Session()
    # Ollama is a local service: a proxy from the environment must not sit in between.
    session.trust_env = False
    # A threaded worker runs many requests at once; keep that many connections pooled.
    adapter = HTTPAdapter(pool_connections=1, pool_maxsize=64)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def same_model(listed: Any, wanted: str) -> bool:
    # Ollama reports "llama3" as "llama3:latest".
    def full(name: str) -> str:
        return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"

    return isinstance(listed, str) and full(listed) == full(wanted)


def short_reason(exc: Exception) -> str:
    # requests wraps the socket error in several layers; the errno text is what a reader needs.
    text = str(exc)
    match = re.search(r"\[Errno -?\d+\] ([^'\")]+)", text)
    return match.group(1).strip() if match else text


def ollama_message(response: requests.Response) -> str:
    try:
        data = response.json()
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), str):
        return str(data["error"])
    return response.text.strip()[:500] or response.reason or f"HTTP {response.status_code}"
