"""The client's typed errors: what went wrong, in terms a caller can act on."""

from __future__ import annotations


class ModelPoolError(Exception):
    """An answer the pool gave as an error (``status``, ``code``) or no answer at all."""

    def __init__(
        self,
        message: str,
        status: int | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        #: Seconds the pool asks to wait before trying again (its Retry-After), if it said.
        self.retry_after = retry_after


class ModelNotFound(ModelPoolError):
    """No such model is registered (or no such lease on it)."""


class NoCapacity(ModelPoolError):
    """No room for the model now; try again after ``retry_after`` seconds."""


class LoadFailed(ModelPoolError):
    """The model did not load (bad file, backend error, or not within the timeout)."""


class PoolUnavailable(ModelPoolError):
    """The control plane (or the supervisord behind it) did not answer."""
