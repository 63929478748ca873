"""Ollama drift repair: Ollama can drop a model behind the pool's back (its own memory handling,
a restart, another client's ``keep_alive: 0``). Each pass over a node compares Ollama's
``/api/ps`` with the node's HOT Ollama models; a missing one is pinned again (``keep_alive: -1``,
with the worker's options) before requests notice, counted (``modelpool_backend_drift_total``)
and logged.

A cancelled load of an Ollama model is let go of too: Ollama may finish a load whose client
went away and keep the model pinned (``keep_alive: -1``), so the node's ``/api/ps`` is watched
for it for up to ``load_timeout_seconds`` and, once it shows, it is released (``keep_alive: 0``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import requests

from controlplane.adapters.worker import local_session
from controlplane.core.states import OCCUPYING, SERVING
from controlplane.errors import UnknownModel
from controlplane.pool import ModelPool
from controlplane.records import Loaded
from model_service.backends.ollama_http import KEEP_FOREVER, same_model

log = logging.getLogger("modelpool.drift")

#: /api/ps is a bookkeeping call: answer quickly or be asked again next pass.
PS_TIMEOUT: Final = 1.0
#: How often /api/ps is read while a cancelled load may still finish.
RELEASE_POLL_SECONDS: Final = 0.5


class DriftRepair:
    """The Ollama of one node, checked against the pool's HOT Ollama models on that node."""

    def __init__(
        self,
        pool: ModelPool,
        node: str,
        ollama_url: Callable[[], str],
        spawn: Callable[..., None],
        stopping: threading.Event | None = None,
    ) -> None:
        self.pool = pool
        self.node = node
        self.ollama_url = ollama_url
        self.spawn = spawn
        self.stopping = stopping or threading.Event()
        self._session = local_session()
        self._repinning: set[str] = set()
        self._lock = threading.Lock()

    def check(self, loaded: list[Loaded], serving: set[str]) -> list[str]:
        """Pin again what Ollama dropped; returns those models (an unreachable Ollama is not
        drift: the workers report that themselves)."""
        ours = [
            w
            for w in loaded
            if w.node == self.node and w.backend == "ollama" and w.model_id in serving
        ]
        if not ours:
            return []
        base = self._base()
        listed = _running(self._session, base)
        if listed is None:
            return []
        dropped = []
        for w in ours:
            try:
                rec = self.pool.worker(w.model_id)
            except UnknownModel:
                continue
            if rec.gen != w.gen or rec.state not in SERVING:
                continue  # unloading or loaded again since the snapshot: not drift
            name = rec.entry.upstream_model or rec.entry.model_id
            if any(same_model(n, name) for n in listed):
                continue
            with self._lock:
                if w.model_id in self._repinning:
                    continue
                self._repinning.add(w.model_id)
            self.pool.stats.drifted(rec.entry.model_id)
            log.warning(
                "drift model=%s node=%s: Ollama at %s no longer has %s loaded; pinning it again",
                w.model_id,
                self.node,
                base,
                name,
            )
            dropped.append(w.model_id)
            self.spawn(f"repin-{w.model_id}", self._repin, w, base, name, dict(rec.entry.options))
        return dropped

    def _base(self) -> str:
        return self.ollama_url().rstrip("/").removesuffix("/v1")

    def release_cancelled(self, model_id: str, name: str, gen: int, within: float) -> None:
        """Let go of ``name`` in this node's Ollama once a cancelled load (``gen``) of it shows
        in ``/api/ps``, for up to ``within`` seconds (lock held by the caller: only starts)."""
        until = time.monotonic() + within
        self.spawn(f"release-{model_id}", self._release, model_id, name, gen, until)

    def _release(self, model_id: str, name: str, gen: int, until: float) -> None:
        session = local_session()
        base = self._base()
        try:
            while time.monotonic() < until:
                try:
                    rec = self.pool.worker(model_id)
                    if rec.gen != gen and rec.node == self.node and rec.state in OCCUPYING:
                        return  # loaded here again: its worker holds the model now
                except UnknownModel:
                    pass
                listed = _running(session, base)
                if listed is not None and any(same_model(n, name) for n in listed):
                    session.post(
                        base + "/api/generate", json={"model": name, "keep_alive": 0}, timeout=10
                    ).close()
                    log.info("released %s at %s after its load was cancelled", name, base)
                    return
                if self.stopping.wait(RELEASE_POLL_SECONDS):
                    return
        except requests.RequestException as exc:
            log.warning("releasing %s at %s after a cancelled load failed: %s", name, base, exc)
        finally:
            session.close()

    def _repin(self, w: Loaded, base: str, name: str, options: dict[str, Any]) -> None:
        session = local_session()  # this thread's own: a Session is not shared across threads
        try:
            payload = {"model": name, "keep_alive": KEEP_FOREVER, "options": options}
            try:
                session.post(
                    base + "/api/generate", json={**payload, "stream": False}, timeout=300
                ).close()
            except requests.RequestException as exc:
                log.error("pinning %s again at %s failed: %s", name, base, exc)
                return
            try:
                rec = self.pool.worker(w.model_id)
                gone = rec.node != self.node or rec.state not in OCCUPYING
            except UnknownModel:
                gone = True
            if gone:
                # Unloaded meanwhile (and not loaded here again): its worker already let go,
                # so let go of our pin too.
                session.post(
                    base + "/api/generate", json={"model": name, "keep_alive": 0}, timeout=10
                ).close()
        except Exception:
            log.exception("drift repair of %s failed", w.model_id)
        finally:
            session.close()
            with self._lock:
                self._repinning.discard(w.model_id)


def _running(session: requests.Session, base: str) -> list[str] | None:
    """The models Ollama at ``base`` has loaded (``/api/ps``), or None if it does not answer."""
    try:
        resp = session.get(base + "/api/ps", timeout=PS_TIMEOUT)
        resp.raise_for_status()
        return [
            name
            for entry in resp.json().get("models") or []
            if isinstance(entry, dict)
            for name in (entry.get("name"), entry.get("model"))
            if isinstance(name, str)
        ]
    except (requests.RequestException, ValueError, AttributeError):
        return None
