"""Domain errors of the pool. The HTTP layer (api/errors.py) turns them into responses."""

from __future__ import annotations


class PoolError(Exception):
    """Base of every error the pool reports to a caller."""

    code = "pool_error"

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class InvalidInput(PoolError):
    """Bad input: the message says what was wrong and where."""

    code = "invalid_request"


class UnknownModel(PoolError):
    """No such model in the registry."""

    code = "model_not_found"

    def __init__(self, model_id: str) -> None:
        super().__init__(f"model {model_id!r} is not registered")
        self.model_id = model_id


class UnknownLease(PoolError):
    """No such lease on the model (never given, ended, or lapsed)."""

    code = "lease_not_found"

    def __init__(self, model_id: str, lease_id: str) -> None:
        super().__init__(
            f"model {model_id!r} has no live lease {lease_id!r} (it ended or lapsed: take a "
            "new one)"
        )


class Conflict(PoolError):
    """The model's state does not allow the operation now."""

    code = "conflict"


class NoCapacity(PoolError):
    """No room within max_concurrent_models / memory_limit_mb, or no free port."""

    code = "no_capacity"
    #: Room may free up (a model expires, is unloaded, passes its residency): worth waiting.
    waitable = False
    #: When a model now resident may make room (the pool's clock), if one will.
    room_at: float | None = None


class LoadFailed(PoolError):
    """The model could not be loaded (its last error says why)."""

    code = "load_failed"


class LoadCancelled(PoolError):
    """The load this caller waited for was cancelled (``DELETE /jobs/{id}``)."""

    code = "load_cancelled"


class UnknownJob(PoolError):
    """No such load job (never made, or ended long enough ago to be forgotten)."""

    code = "job_not_found"

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no load job {job_id!r} (GET /jobs lists them)")


class LoadTimeout(PoolError):
    """The model did not become ready in time."""

    code = "load_timeout"


class BackendDown(PoolError):
    """supervisord (or another service the pool needs) is not reachable."""

    code = "backend_unavailable"
