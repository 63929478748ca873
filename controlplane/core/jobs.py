"""Loads as jobs: what one load of one model is doing, from the queue for room to ready.

A job is created by a ``load`` call (it may wait for room first) or by a load that a request or
warmup started. Its phase follows the model's load; the pool (the one writer) moves it. Pure:
no clock, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Phase(StrEnum):
    """Where a load job is."""

    #: Waiting for room (in the FIFO queue of ``capacity_wait_seconds``).
    QUEUED = "queued"
    #: The worker's program is being started; its ``/health`` does not answer yet.
    SPAWNING = "spawning"
    #: The worker answers and its backend loads the weights (``progress`` when it says).
    LOADING_WEIGHTS = "loading_weights"
    READY = "ready"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: Phases a job does not leave.
FINISHED = frozenset({Phase.READY, Phase.FAILED, Phase.CANCELLED})


@dataclass
class Job:
    """One load of one model (mutated only under the pool's lock)."""

    job_id: str
    model_id: str
    #: Unix time the job was created.
    started_at: float
    #: What asked for the load: "load" (a load call), "request" or "warmup".
    origin: str
    phase: Phase = Phase.QUEUED
    #: 0..1 where the backend reports it (llama.cpp: the file's bytes read), else None.
    progress: float | None = None
    #: The pool's load generation this job follows (None while queued).
    gen: int | None = None
    error: str | None = None
    finished_at: float | None = None
    #: The node the worker is started on.
    node: str | None = None

    @property
    def finished(self) -> bool:
        return self.phase in FINISHED

    def view(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "model_id": self.model_id,
            "phase": self.phase.value,
            "progress": None if self.progress is None else round(self.progress, 4),
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "origin": self.origin,
            "node": self.node,
            "error": self.error,
        }


def advance(job: Job, phase: Phase, progress: float | None = None) -> bool:
    """Move ``job`` forward to ``phase`` (and ``progress``); False (nothing changed) for a
    finished job or a step back (a late report of an earlier phase)."""
    order = list(Phase)
    if job.finished or (phase not in FINISHED and order.index(phase) < order.index(job.phase)):
        return False
    job.phase = phase
    if phase is Phase.READY:
        job.progress = 1.0
    elif progress is not None:
        job.progress = min(1.0, max(0.0, progress))
    return True


def finish(job: Job, phase: Phase, at: float, error: str | None = None) -> bool:
    """End ``job`` (ready, failed or cancelled) at Unix time ``at``; False if it had ended."""
    if phase not in FINISHED or not advance(job, phase):
        return False
    job.finished_at = at
    job.error = error
    return True


def retained(jobs: list[Job], keep_finished: int) -> list[Job]:
    """The jobs to keep, oldest first: every live job and the last ``keep_finished`` ended."""
    ended = [j for j in jobs if j.finished]
    drop = {id(j) for j in ended[: max(0, len(ended) - keep_finished)]}
    return [j for j in jobs if id(j) not in drop]
