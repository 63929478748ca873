"""``ModelPoolClient``: the control API of a modelpool, as Python calls."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote

import requests

from modelpool.errors import (
    LoadFailed,
    ModelNotFound,
    ModelPoolError,
    NoCapacity,
    PoolUnavailable,
)

log = logging.getLogger("modelpool.client")

#: Error codes of the pool's answers, as the client's exception types.
ERRORS: dict[str, type[ModelPoolError]] = {
    "model_not_found": ModelNotFound,
    "lease_not_found": ModelNotFound,
    "no_capacity": NoCapacity,
    "load_failed": LoadFailed,
    "load_timeout": LoadFailed,
    "backend_unavailable": PoolUnavailable,
}


def _mid(model_id: str) -> str:
    """A model id in a URL path (ids hold ``:`` and ``/``)."""
    return quote(model_id, safe=":@+")


class ModelPoolClient:
    """A client of one modelpool control plane (the front door, port 8050 by default).

    Thread safe for the ordinary use of one client shared by the threads of an agent runner.
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8050",
        api_key: str | None = None,
        timeout: float = 30.0,
        session: requests.Session | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self._session = session or requests.Session()
        if session is None:
            self._session.trust_env = False  # a local pool: no proxy from the environment
        if api_key:
            self._session.headers["Authorization"] = f"Bearer {api_key}"

    # -- HTTP ------------------------------------------------------------------------------------

    def _call(self, method: str, path: str, body: Any = None, timeout: float | None = None) -> Any:
        try:
            resp = self._session.request(
                method, self.url + path, json=body, timeout=timeout or self.timeout
            )
        except requests.ConnectionError as exc:
            raise PoolUnavailable(f"modelpool is not reachable at {self.url}: {exc}") from None
        except requests.Timeout:
            raise PoolUnavailable(
                f"{method} {path}: no answer from {self.url} within {timeout or self.timeout:g} s"
            ) from None
        if resp.status_code == 204:
            return None
        try:
            data = resp.json()
        except ValueError:
            data = None
        if resp.status_code < 400:
            return data
        error = data.get("error") if isinstance(data, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        code = error.get("code") if isinstance(error, dict) else None
        retry = resp.headers.get("Retry-After")
        kind = ERRORS.get(str(code), ModelPoolError)
        if kind is ModelPoolError and resp.status_code == 503:
            kind = PoolUnavailable
        raise kind(
            str(message or f"{method} {path}: HTTP {resp.status_code} {resp.text[:200]}"),
            status=resp.status_code,
            code=code,
            retry_after=float(retry) if retry and retry.replace(".", "", 1).isdigit() else None,
        )

    # -- models ----------------------------------------------------------------------------------

    def models(self) -> list[dict[str, Any]]:
        """Every registered model, as ``GET /models`` shows it."""
        data = self._call("GET", "/models")
        return list(data["models"])

    def model(self, model_id: str) -> dict[str, Any]:
        """One model (state, port, endpoint, TTL, leases, ...); ModelNotFound if unknown."""
        return dict(self._call("GET", f"/models/{_mid(model_id)}"))

    def register(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Register a model (a registry entry: ``model_id``, ``backend``, ...); returns the
        model as ``model()`` shows it."""
        return dict(self._call("POST", "/models/register", entry)["model"])

    def load(self, model_id: str, wait: bool = True, timeout: float = 600.0) -> dict[str, Any]:
        """Load a model; with ``wait``, return once it is HOT (LoadFailed if it does not)."""
        body: dict[str, Any] = {"wait": wait}
        if wait:
            body["timeout"] = timeout
        return dict(
            self._call("POST", f"/models/{_mid(model_id)}/load", body, timeout=timeout + 30)
        )

    def unload(self, model_id: str, force: bool = False) -> dict[str, Any]:
        """Unload a model (in-flight requests finish first unless ``force``)."""
        return dict(self._call("POST", f"/models/{_mid(model_id)}/unload", {"force": force}))

    def extend_ttl(self, model_id: str, minutes: float) -> dict[str, Any]:
        """Move a loaded model's TTL deadline by ``minutes`` (clamped by the pool)."""
        return dict(
            self._call("POST", f"/models/{_mid(model_id)}/extend-ttl", {"minutes": minutes})
        )

    def endpoint_for(self, model_id: str, timeout: float = 600.0) -> str:
        """The OpenAI base URL of the model's own worker, loading it first if needed."""
        model = self.model(model_id)
        if model["state"] not in ("HOT", "COOLING") or not model.get("endpoint"):
            model = self.load(model_id, wait=True, timeout=timeout)
        return f"{model['endpoint']}/v1"

    def openai(self, model_id: str | None = None) -> Any:
        """An ``openai.OpenAI`` client: on the front door, or on ``model_id``'s own worker
        (loaded first). Needs the ``openai`` package."""
        try:
            import openai
        except ImportError:
            raise ImportError("ModelPoolClient.openai() needs the openai package") from None
        base = self.endpoint_for(model_id) if model_id else f"{self.url}/v1"
        return openai.OpenAI(base_url=base, api_key=self.api_key or "unused")

    # -- leases ----------------------------------------------------------------------------------

    def create_lease(
        self, model_id: str, seconds: float = 600.0, holder: str | None = None
    ) -> dict[str, Any]:
        """Hold a model for ``seconds`` (a COLD one starts loading): ``lease_id``,
        ``expires_at``. While a lease is live the model neither expires nor is evicted."""
        body: dict[str, Any] = {"seconds": seconds}
        if holder is not None:
            body["holder"] = holder
        return dict(self._call("POST", f"/models/{_mid(model_id)}/leases", body))

    def renew_lease(self, model_id: str, lease_id: str, seconds: float = 600.0) -> dict[str, Any]:
        """Move a live lease's end to now + ``seconds``; ModelNotFound if it lapsed."""
        path = f"/models/{_mid(model_id)}/leases/{lease_id}/renew"
        return dict(self._call("POST", path, {"seconds": seconds}))

    def end_lease(self, model_id: str, lease_id: str) -> None:
        """Release a lease; the model's TTL runs from now if it was the last one."""
        self._call("DELETE", f"/models/{_mid(model_id)}/leases/{lease_id}")

    @contextmanager
    def lease(
        self, model_id: str, seconds: float = 600.0, holder: str | None = None
    ) -> Iterator[str]:
        """Hold a model for a task: yields its worker's OpenAI base URL (loaded), renews the
        lease in the background every third of ``seconds``, and ends it on exit."""
        lease = self.create_lease(model_id, seconds, holder)
        lease_id = str(lease["lease_id"])
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(max(seconds / 3, 0.5)):
                try:
                    self.renew_lease(model_id, lease_id, seconds)
                except ModelPoolError as exc:
                    log.warning("renewing the lease on %s failed: %s", model_id, exc)

        thread = threading.Thread(target=renew, name=f"lease-{model_id}", daemon=True)
        thread.start()
        try:
            yield self.endpoint_for(model_id)
        finally:
            stop.set()
            thread.join(self.timeout)
            try:
                self.end_lease(model_id, lease_id)
            except ModelNotFound:
                pass  # it lapsed meanwhile
