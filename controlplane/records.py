"""What the pool records about each model, and the interface of its side effects."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from controlplane.core.chores import RUNNING, Chore
from controlplane.core.jobs import Job
from controlplane.core.leases import Lease
from controlplane.core.schedule import Window
from controlplane.core.states import State
from controlplane.settings import ModelEntry


class Loaded(NamedTuple):
    """What the reaper needs to watch one worker."""

    model_id: str
    gen: int
    program: str
    port: int
    backend: str
    pid: int | None
    node: str = "local"


@dataclass(frozen=True)
class Transition:
    """One applied state change."""

    old: State
    new: State
    at: float
    reason: str


@dataclass
class Record:
    """Everything the pool knows about one registered model (mutated only under the lock)."""

    entry: ModelEntry
    program: str
    #: Its key in the pool: the model id for a model's first replica, ``model#k`` for its
    #: replica ``k`` >= 2 (``#`` is not allowed in model ids). Lifecycle calls name it.
    key: str = ""
    #: Which replica of the model this worker is (1: the one loaded on demand).
    replica: int = 1
    state: State = State.COLD
    since: float = 0.0
    #: Bumped on every load; work started for an older generation is ignored.
    gen: int = 0
    port: int | None = None
    pid: int | None = None
    #: The node the worker runs on (None: no worker).
    node: str | None = None
    deadline: float | None = None
    grace_until: float | None = None
    #: Deadline to restore when an adopted worker is ready again.
    restore_deadline: float | None = None
    loaded_at: float | None = None
    last_used: float = 0.0
    #: Its load time, a moving average over its loads (``core.eviction``).
    load_seconds: float | None = None
    #: Its recent visit rate (visits per second, decayed; as of ``rate_at``, the last visit
    #: counted, None before the first; ``core.eviction``).
    rate: float = 0.0
    rate_at: float | None = None
    #: When its load last reported more progress (monotonic): callers waiting with the default
    #: load timeout wait that long from here, as the lifecycle does.
    progressed_at: float | None = None
    #: Requests counted by the pool itself (front door), in flight now.
    in_flight: int = 0
    #: What the worker last said it has in flight (requests sent straight to its port).
    worker_in_flight: int = 0
    #: Requests served by earlier worker processes, plus the current one's count.
    requests_base: int = 0
    worker_requests: int = 0
    measured_mb: float | None = None
    #: The last measurement of any earlier worker: a reload is expected to need as much.
    last_measured_mb: float | None = None
    #: Memory expected before the worker is measured (set when a load starts).
    estimate_mb: float | None = None
    last_error: str | None = None
    failures: int = 0
    retry_at: float = 0.0
    #: What is being done about the worker program beside the state (``core.chores``).
    chore: Chore = Chore.NONE
    #: Deleted from the registry: hidden from requests, dropped once its worker is gone.
    deleting: bool = False
    unload_reason: str = ""
    #: Fingerprint of the spec the current worker was started with (None: no worker).
    fingerprint: str | None = None
    #: Load again once stopped (its worker served an outdated spec).
    reload: bool = False
    #: Callers waiting for this model to become HOT (capped by max_queue_per_model).
    waiters: int = 0
    #: Its latest load job (``core.jobs``), live or finished.
    job: Job | None = None
    #: A load generation that was cancelled: its waiting callers get ``LoadCancelled``.
    cancelled_gen: int | None = None
    #: Live leases by id: while there is one, the model neither expires nor is evicted.
    leases: dict[str, Lease] = field(default_factory=dict)
    history: deque[Transition] = field(default_factory=lambda: deque(maxlen=20))

    def __post_init__(self) -> None:
        if not self.key:
            self.key = replica_key(self.entry.model_id, self.replica)

    @property
    def model_id(self) -> str:
        return self.entry.model_id

    @property
    def windows(self) -> tuple[Window, ...]:
        return self.entry.windows()

    @property
    def busy(self) -> bool:
        """A stop or cleanup job runs on the program."""
        return self.chore in RUNNING

    @property
    def needs_cleanup(self) -> bool:
        """A FAILED model whose worker is not removed yet (it keeps its port until it is)."""
        return self.chore is Chore.CLEANUP_DUE

    @property
    def adopting(self) -> bool:
        """The load in progress takes over a running worker."""
        return self.chore is Chore.ADOPTING

    @property
    def requests(self) -> int:
        return self.requests_base + self.worker_requests

    @property
    def total_in_flight(self) -> int:
        return self.in_flight + self.worker_in_flight

    def memory(self) -> float:
        """Measured memory if the worker reports it, else the estimate made at load."""
        if self.measured_mb is not None:
            return self.measured_mb
        if self.estimate_mb is not None:
            return self.estimate_mb
        return float(self.entry.memory_mb or 0.0)


def replica_key(model_id: str, replica: int) -> str:
    """The pool's key of replica ``replica`` of ``model_id``."""
    return model_id if replica == 1 else f"{model_id}#{replica}"


def model_of(key: str) -> str:
    """The model a worker's key names (``model#k`` → ``model``; a model id as it is)."""
    return key.partition("#")[0]


class Lifecycle:
    """Side effects the pool asks for; implemented by ``controlplane.lifecycle.Workers``."""

    def start_load(self, model_id: str, gen: int, adopt: bool) -> None:
        raise NotImplementedError

    def start_stop(self, model_id: str, gen: int, force: bool) -> None:
        raise NotImplementedError

    def start_cleanup(self, model_id: str, gen: int) -> None:
        raise NotImplementedError

    def hurry(self, model_id: str, gen: int) -> None:
        """Cut short the drain of a stop that is already running."""
        raise NotImplementedError
