"""Announcing loaded models to the service registry (the PAS Registry, by default on 6121).

HTTP contract (paths configurable with ``service_registry_paths``; JSON bodies, any 2xx is
success):

- ``POST {url}/register`` when a model becomes HOT: ``service_id`` ("modelpool:<model id>"),
  ``name``/``model_id``, ``endpoint`` (worker base URL), ``url`` (its OpenAI base, ``/v1``),
  ``health_url``, ``port``, ``tags``, ``model_type``, ``backend``, ``display_name``, ``state``.
- ``POST {url}/heartbeat`` every ``service_registry_heartbeat_seconds`` while registered:
  ``service_id``, ``model_id``, ``endpoint``, ``state``. A 404 means the registry forgot us:
  the model is registered again.
- ``POST {url}/deregister`` before the model starts draining (unload, eviction, TTL) or when
  it fails: ``service_id``, ``model_id``.

Calls happen on this module's own thread with short timeouts and are retried with
exponential backoff (1 s doubling to 60 s) while the registry is down; serving never waits for
the registry, except that a stop waits up to two seconds for its deregistration.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import requests

from controlplane.adapters.worker import local_session

log = logging.getLogger("modelpool.registry")

Send = Callable[[str, dict[str, Any]], int]
BACKOFF_START = 1.0
BACKOFF_MAX = 60.0
TIMEOUT = 2.0


@dataclass
class _Entry:
    payload: dict[str, Any]
    wanted: bool = True  # announce (True) or withdraw (False)
    registered: bool = False
    next_try: float = 0.0
    next_heartbeat: float = 0.0
    failures: int = 0
    done: threading.Event = field(default_factory=threading.Event)


def http_sender(base_url: str, timeout: float = TIMEOUT) -> Send:
    """POST JSON to ``base_url + path``; the status code, or 0 if nothing answered."""
    session = local_session()

    def send(path: str, body: dict[str, Any]) -> int:
        try:
            return session.post(base_url + path, json=body, timeout=timeout).status_code
        except requests.RequestException:
            return 0

    return send


class RegistryAnnouncer:
    """Keeps the registry's view of loaded models in line with the pool's, in the background."""

    def __init__(
        self,
        send: Send,
        paths: dict[str, str],
        heartbeat_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.send = send
        self.paths = paths
        self.heartbeat_seconds = heartbeat_seconds
        self.clock = clock
        self._entries: dict[str, _Entry] = {}
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    # --- what the pool says (never blocks on the network) -------------------------------------

    def announce(self, model_id: str, payload: dict[str, Any]) -> None:
        with self._cond:
            e = self._entries.get(model_id)
            if e is None or not e.wanted:
                e = _Entry(payload=payload, registered=bool(e and e.registered))
                self._entries[model_id] = e
            e.payload = payload
            self._cond.notify_all()

    def set_state(self, model_id: str, state: str) -> None:
        with self._cond:
            e = self._entries.get(model_id)
            if e is not None and e.wanted:
                e.payload = {**e.payload, "state": state}

    def withdraw(self, model_id: str) -> threading.Event:
        """Ask for a deregistration; the event is set once it is done (or was not needed)."""
        with self._cond:
            e = self._entries.get(model_id)
            if e is None:
                done = threading.Event()
                done.set()
                return done
            if e.wanted:
                e.wanted = False
                e.next_try = 0.0
                e.failures = 0
                e.done = threading.Event()
            if not e.registered:
                e.done.set()
            self._cond.notify_all()
            return e.done

    # --- the loop -----------------------------------------------------------------------------

    def step(self) -> float:
        """Make the calls that are due; return seconds until the next one."""
        now = self.clock()
        with self._cond:
            due = [
                (m, e)
                for m, e in self._entries.items()
                if now >= e.next_try
                and (
                    (e.wanted and (not e.registered or now >= e.next_heartbeat))
                    or (not e.wanted and e.registered)
                )
            ]
            jobs = [(m, e, dict(e.payload), e.wanted, e.registered) for m, e in due]
        for model_id, e, payload, wanted, registered in jobs:
            sid = {"service_id": payload["service_id"], "model_id": model_id}
            if not wanted:
                status = self.send(self.paths["deregister"], sid)
                ok = 200 <= status < 300 or status == 404
            elif not registered:
                status = self.send(self.paths["register"], payload)
                ok = 200 <= status < 300
            else:
                body = {**sid, "endpoint": payload.get("endpoint"), "state": payload.get("state")}
                status = self.send(self.paths["heartbeat"], body)
                ok = 200 <= status < 300
            self._settle(model_id, e, wanted, registered, ok, status)
        with self._cond:
            times = [
                e.next_try
                if (not e.wanted or not e.registered)
                else max(e.next_try, e.next_heartbeat)
                for e in self._entries.values()
                if e.wanted or e.registered
            ]
        return max(0.0, min(times, default=now + 1.0) - self.clock())

    def _settle(
        self, model_id: str, e: _Entry, wanted: bool, registered: bool, ok: bool, status: int
    ) -> None:
        now = self.clock()
        with self._cond:
            if self._entries.get(model_id) is not e:
                return
            if ok:
                e.failures = 0
                e.next_try = now
                if not wanted:
                    e.registered = False
                    e.done.set()
                    if not e.wanted:
                        del self._entries[model_id]
                else:
                    e.registered = True
                    e.next_heartbeat = now + self.heartbeat_seconds
            elif wanted and registered and status == 404:
                e.registered = False  # the registry forgot us: register again
            else:
                e.failures += 1
                e.next_try = now + min(BACKOFF_MAX, BACKOFF_START * 2 ** (e.failures - 1))
                if e.failures == 1:
                    log.warning(
                        "service registry call failed model=%s status=%s; retrying with backoff",
                        model_id,
                        status or "unreachable",
                    )

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="modelpool-registry", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        while True:
            try:
                delay = self.step()
            except Exception:
                log.exception("service registry pass failed")
                delay = 1.0
            with self._cond:
                if self._stop:
                    return
                self._cond.wait(min(max(delay, 0.01), 1.0))
                if self._stop:
                    return
