"""Following ``ollama pull`` (``POST /api/pull``, streamed): how far it is, and how it failed.

Ollama streams one status object per line: ``pulling manifest``, then for each layer
``pulling <digest>`` lines with the layer's ``total`` and ``completed`` bytes, then
``verifying sha256 digest``, ``writing manifest`` and ``success``; a failure is an ``error``
line. The HTTP side is ``model_service.backends.ollama``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import requests

from model_service.backends.base import BackendError
from model_service.backends.ollama_http import CONNECT_TIMEOUT, ollama_message, short_reason


def failed(where: str, model: str, error: str, missing: bool) -> BackendError:
    """A pull that failed: permanent (404) when the library does not have the model, else
    worth another try (the network, a full disk, ...)."""
    return BackendError(
        f"{where} could not pull model {model!r}: {error}",
        status=404 if missing else 502,
        type="invalid_request_error" if missing else "backend_error",
        code="pull_failed",
    )


class PullProgress:
    """One pull, followed line by line; ``share`` (0..1, None before it starts) is read by
    the worker's health while the pull runs in the load thread."""

    def __init__(self, where: str, model: str) -> None:
        self.where = where
        self.model = model
        self.share: float | None = None
        self._layers: dict[str, tuple[int, int]] = {}  # digest: (completed, total)

    def run(self, session: requests.Session, url: str, read_timeout: float) -> None:
        """Ask for the pull at ``url`` and follow it; a refused connection is the caller's to
        report (requests.ConnectionError), anything else a BackendError."""
        try:
            response = session.post(
                url,
                json={"model": self.model, "stream": True},
                stream=True,
                timeout=(CONNECT_TIMEOUT, read_timeout),
            )
        except requests.Timeout:
            raise failed(self.where, self.model, "it did not start the pull", False) from None
        with response:
            if response.status_code != 200:
                error = f"HTTP {response.status_code}: {ollama_message(response)}"
                raise failed(self.where, self.model, error, response.status_code == 404)
            try:
                self.follow(response.iter_lines())
            except requests.RequestException as exc:
                error = f"the pull broke off: {short_reason(exc)}"
                raise failed(self.where, self.model, error, False) from exc

    def follow(self, lines: Iterable[bytes]) -> None:
        """Read the pull's lines to its ``success``; raises BackendError if it fails or ends
        without one."""
        self.share = 0.0
        for line in lines:
            try:
                status = json.loads(line) if line else {}
            except ValueError:
                raise failed(self.where, self.model, f"not JSON: {line[:200]!r}", False) from None
            if not isinstance(status, dict):
                continue
            if "error" in status:
                error = str(status["error"])
                raise failed(self.where, self.model, error, "does not exist" in error)
            self._count(status)
            if status.get("status") == "success":
                self.share = 1.0
                return
        raise failed(self.where, self.model, "the pull ended before it succeeded", False)

    def _count(self, status: dict[str, object]) -> None:
        total, done, digest = status.get("total"), status.get("completed"), status.get("digest")
        if not isinstance(total, int) or total <= 0 or not isinstance(digest, str):
            return
        self._layers[digest] = (done if isinstance(done, int) else 0, total)
        share = sum(c for c, _ in self._layers.values()) / sum(t for _, t in self._layers.values())
        # Ollama names each layer as it starts on it: a new one can lower the share.
        self.share = max(self.share or 0.0, share)
