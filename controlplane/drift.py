"""Ollama drift repair: Ollama can drop a model behind the pool's back (its own memory handling,
a restart, another client's ``keep_alive: 0``). Each pass over a node compares Ollama's
``/api/ps`` with the node's HOT Ollama models; a missing one is pinned again (``keep_alive: -1``,
with the worker's options) before requests notice, counted (``modelpool_backend_drift_total``)
and logged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Final

import requests

from controlplane.adapters.worker import local_session
from controlplane.core.states import OCCUPYING, SERVING
from controlplane.errors import UnknownModel
from controlplane.pool import ModelPool
from controlplane.records import Loaded
from model_service.backends.ollama import KEEP_FOREVER, same_model

log = logging.getLogger("modelpool.drift")

#: /api/ps is a bookkeeping call: answer quickly or be asked again next pass.
PS_TIMEOUT: Final = 1.0


class DriftRepair:
    """The Ollama of one node, checked against the pool's HOT Ollama models on that node."""

    def __init__(
        self,
        pool: ModelPool,
        node: str,
        ollama_url: Callable[[], str],
        spawn: Callable[..., None],
    ) -> None:
        self.pool = pool
        self.node = node
        self.ollama_url = ollama_url
        self.spawn = spawn
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
        base = self.ollama_url().rstrip("/").removesuffix("/v1")
        try:
            resp = self._session.get(base + "/api/ps", timeout=PS_TIMEOUT)
            resp.raise_for_status()
            listed = [
                name
                for entry in resp.json().get("models") or []
                if isinstance(entry, dict)
                for name in (entry.get("name"), entry.get("model"))
            ]
        except (requests.RequestException, ValueError, AttributeError):
            return []
        dropped = []
        for w in ours:
            try:
                rec = self.pool.record(w.model_id)
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
            self.pool.stats.drifted(w.model_id)
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
                rec = self.pool.record(w.model_id)
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
