"""How the control plane reads a model worker's ``/health``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import requests


@dataclass(frozen=True)
class WorkerHealth:
    """What a worker says about itself."""

    status: str  # loading | ready | error
    model: str | None = None
    requests_served: int = 0
    in_flight: int = 0
    last_request_at: float | None = None
    memory_mb: float | None = None
    error: str | None = None
    #: "permanent" when retrying the load will not help.
    error_kind: str | None = None
    pid: int | None = None
    #: While loading: how far the backend is, 0..1, where it says (None: it does not).
    progress: float | None = None
    raw: dict[str, Any] | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkerHealth:
        def num(key: str) -> float | None:
            v = data.get(key)
            return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None

        return cls(
            status=str(data.get("status", "")),
            model=data.get("model") if isinstance(data.get("model"), str) else None,
            requests_served=int(num("requests_served") or 0),
            # Requests through the front door are counted by the control plane already.
            in_flight=int(
                (num("in_flight_direct") if "in_flight_direct" in data else num("in_flight")) or 0
            ),
            last_request_at=num("last_request_at"),
            memory_mb=num("memory_mb"),
            error=data.get("error") if isinstance(data.get("error"), str) else None,
            error_kind=data.get("error_kind") if isinstance(data.get("error_kind"), str) else None,
            pid=int(p) if (p := num("pid")) is not None else None,
            progress=num("progress"),
            raw=data,
        )


class WorkerProbe(Protocol):
    """Reads a worker's health; None when it does not answer."""

    def health(self, host: str, port: int, timeout: float) -> WorkerHealth | None: ...


def local_session() -> requests.Session:
    """A session for loopback calls: proxies from the environment must not sit in between."""
    session = requests.Session()
    session.trust_env = False
    return session


class HttpWorkerProbe:
    """The real probe: ``GET http://host:port/health`` on a connection of its own.

    No keep-alive: a kept connection would hold a worker's stop (gunicorn waits for idle
    connections) and linger half-closed here once the worker is gone.
    """

    def __init__(self) -> None:
        self._session = local_session()

    def health(self, host: str, port: int, timeout: float) -> WorkerHealth | None:
        try:
            resp = self._session.get(
                f"http://{host}:{port}/health", timeout=timeout, headers={"Connection": "close"}
            )
            data = resp.json()
        except (requests.RequestException, ValueError):
            return None
        return WorkerHealth.from_json(data) if isinstance(data, dict) else None
