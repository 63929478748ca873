"""The one interface every backend implements, and the values that cross it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol


class BackendError(Exception):
    """A failure the worker reports to its client in the OpenAI error shape."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 502,
        type: str = "backend_error",
        code: str = "backend_error",
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.code = code
        self.retry_after = retry_after

    @property
    def permanent(self) -> bool:
        """Retrying will not help (a bad file or option, a model the backend does not have)."""
        return self.type == "configuration_error" or self.status in (400, 401, 403, 404)


class BackendUnavailable(BackendError):
    """The backend cannot be reached (503 with Retry-After)."""

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(
            message,
            status=503,
            type="backend_unavailable",
            code="backend_unavailable",
            retry_after=retry_after,
        )


@dataclass
class Result:
    """A backend's answer: either a JSON body or a stream of SSE-encoded chunks.

    ``stream`` yields complete SSE events (``b"data: {...}\\n\\n"``) and ends with
    ``b"data: [DONE]\\n\\n"``. Closing the iterator early (client went away) must release
    whatever the backend holds for the request.
    """

    json: dict[str, Any] | None = None
    stream: Iterator[bytes] | None = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


class Backend(Protocol):
    """One model on one inference engine."""

    name: str

    def load(self) -> None:
        """Make the model resident. Blocks; raises BackendError with a clear message on failure."""

    def load_progress(self) -> float | None:
        """How far ``load`` is, 0..1, while it runs (read from another thread); None when the
        backend cannot say."""

    def unload(self) -> None:
        """Release the model (best effort; called when the worker stops)."""

    def memory_mb(self) -> float | None:
        """Memory the model holds, as the backend measures it; None if unknown."""

    def chat_completions(self, body: dict[str, Any]) -> Result:
        """Serve an OpenAI ``/v1/chat/completions`` request (``body["stream"]`` selects SSE)."""

    def completions(self, body: dict[str, Any]) -> Result:
        """Serve an OpenAI ``/v1/completions`` request."""

    def embeddings(self, body: dict[str, Any]) -> Result:
        """Serve an OpenAI ``/v1/embeddings`` request (400 if the model does not embed)."""
