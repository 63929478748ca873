"""The pool's load jobs: a load call answers with a job at once (202), the job waits for room if
it must, follows the load through its phases, and can be cancelled.

A part of ``ModelPool`` (one lock, one writer). A job follows the record's load generation: every
transition of a WARMING model moves its job (``_job_follows``), the lifecycle reports progress
(``load_progress``), and a cancel stops the worker like a forced unload (WARMING → UNLOADING →
COLD, reason ``cancelled``). The phases are ``core.jobs``.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time

from controlplane.core import jobs
from controlplane.core.chores import Chore
from controlplane.core.jobs import Job, Phase
from controlplane.core.states import SERVING, Event, State
from controlplane.errors import Conflict, LoadCancelled, NoCapacity, PoolError, UnknownJob
from controlplane.pool_parts import PoolParts
from controlplane.records import Record

log = logging.getLogger("modelpool.pool")

#: Finished jobs kept for ``GET /jobs`` (the live ones are always kept).
KEEP_FINISHED_JOBS = 100


class Jobs:
    """The pool's load jobs (a mixin of ``ModelPool``: ``self`` is the pool)."""

    def load_job(self: PoolParts, model_id: str, timeout: float | None = None) -> Job | None:
        """A load call without ``wait``: start the load of ``model_id`` if room allows, else
        queue a job for room (``capacity_wait_seconds``); the job either way. None when the
        model is loaded already. Raises what a load that cannot even wait raises (unknown
        model, a model that never fits, a failure backoff, shutting down)."""
        with self._lock:
            rec = self._get(model_id)
            if rec.state in SERVING:
                return None
            if rec.job is not None and not rec.job.finished:
                return rec.job  # single flight: the load already under way (or queued)
        try:
            self.ensure_loaded(model_id, timeout, manual=True, wait=False)
        except NoCapacity as refusal:
            if not refusal.waitable or self.settings.capacity_wait_seconds <= 0:
                raise
            with self._lock:
                rec = self._get(model_id)
                if rec.job is not None and not rec.job.finished:
                    return rec.job  # another caller queued it meanwhile
                job = self._new_job(rec, "load")
            threading.Thread(
                target=self._run_queued,
                args=(job, timeout),
                name=f"modelpool-job-{model_id}",
                daemon=True,
            ).start()
            return job
        with self._lock:
            return self._records[model_id].job

    def _run_queued(self: PoolParts, job: Job, timeout: float | None) -> None:
        """A queued job's thread: wait in the queue for room, then for the load."""
        try:
            self.ensure_loaded(job.model_id, timeout, manual=True, job=job)
        except LoadCancelled:
            pass
        except PoolError as exc:
            with self._lock:
                if jobs.finish(job, Phase.FAILED, self.clock(), exc.message):
                    self._changed.notify_all()
        except Exception as exc:  # the job must end whatever happened
            log.exception("load job %s failed", job.job_id)
            with self._lock:
                jobs.finish(job, Phase.FAILED, self.clock(), f"{type(exc).__name__}: {exc}")

    def _new_job(self: PoolParts, rec: Record, origin: str) -> Job:
        """A job for ``rec``'s next load (lock held)."""
        job = Job(
            job_id="job-" + secrets.token_hex(6),
            model_id=rec.entry.model_id,
            started_at=self.clock(),
            origin=origin,
        )
        rec.job = job
        self._jobs.append(job)
        self._jobs[:] = jobs.retained(self._jobs, KEEP_FINISHED_JOBS)
        return job

    def _job_follows(self: PoolParts, rec: Record, old: State, new: State, reason: str) -> None:
        """Move ``rec``'s job with a transition (lock held; called by ``_apply``)."""
        if new is State.WARMING:
            if reason == "adopt":
                return  # taking over a running worker is not a load
            job = rec.job
            if job is None or job.finished or job.gen is not None:
                origin = {"manual": "load", "scale_up": "scale"}.get(reason, "request")
                job = self._new_job(rec, origin)
            job.gen = rec.gen
            job.node = rec.node
            jobs.advance(job, Phase.SPAWNING)
            return
        job = rec.job
        if job is None or job.gen != rec.gen or old is not State.WARMING:
            return
        now = self.clock()
        if new is State.HOT:
            jobs.finish(job, Phase.READY, now)
        elif reason == "cancelled":
            jobs.finish(job, Phase.CANCELLED, now, "cancelled")
        else:
            jobs.finish(job, Phase.FAILED, now, rec.last_error or reason)

    def load_progress(self: PoolParts, model_id: str, gen: int, progress: float | None) -> bool:
        """The worker of load ``gen`` answers and loads its weights (``progress`` 0..1 if its
        backend says). True when the load got further than it was (the load timeout then
        counts from now, for the lifecycle and for waiting callers)."""
        with self._lock:
            rec = self._records.get(model_id)
            if rec is None or rec.gen != gen or rec.state is not State.WARMING:
                return False
            if rec.job is None or rec.job.gen != gen:
                return False
            before = rec.job.progress
            jobs.advance(rec.job, Phase.LOADING_WEIGHTS, progress)
            if rec.job.progress is None or (before is not None and rec.job.progress <= before):
                return False
            rec.progressed_at = time.monotonic()
            return True

    def jobs(self: PoolParts) -> list[dict[str, object]]:
        """Every live job and the last finished ones, newest first (``GET /jobs``)."""
        with self._lock:
            return [j.view() for j in reversed(self._jobs)]

    def job(self: PoolParts, job_id: str) -> dict[str, object]:
        with self._lock:
            return self._find_job(job_id).view()

    def _find_job(self: PoolParts, job_id: str) -> Job:
        for job in self._jobs:
            if job.job_id == job_id:
                return job
        raise UnknownJob(job_id)

    def cancel_job(self: PoolParts, job_id: str) -> dict[str, object]:
        """Cancel a load that has not finished: a queued job leaves the queue; a load under
        way has its worker stopped (the model ends COLD); callers waiting for it get
        ``LoadCancelled``. A finished job is a Conflict."""
        with self._lock:
            job = self._find_job(job_id)
            if job.finished:
                raise Conflict(f"job {job_id} has ended ({job.phase.value}); nothing to cancel")
            # The load of any replica of the model (a scale-up's is a job of the model too).
            rec = next((r for r in self._group(job.model_id) if r.gen == job.gen), None)
            if job.gen is None or rec is None:
                jobs.finish(job, Phase.CANCELLED, self.clock(), "cancelled")
            elif rec.state is State.WARMING:
                if rec.chore is Chore.ADOPTING:
                    raise Conflict(f"model {job.model_id!r} is taking over a running worker")
                rec.cancelled_gen = rec.gen
                self._begin_unload(rec, Event.LOAD_CANCELLED, "cancelled", force=True)
            log.info("load job cancelled job=%s model=%s", job_id, job.model_id)
            self._changed.notify_all()
            view = job.view()
        self.on_change()
        return view

    def _check_cancelled(
        self: PoolParts, rec: Record, job: Job | None, gens: tuple[int | None, ...]
    ) -> None:
        """Raise ``LoadCancelled`` (lock held) for a caller whose job, or whose load (one of
        ``gens``), was cancelled."""
        if job is not None and job.phase is Phase.CANCELLED:
            raise LoadCancelled(f"the load of model {rec.entry.model_id!r} was cancelled")
        if rec.cancelled_gen is not None and rec.cancelled_gen in gens:
            raise LoadCancelled(
                f"the load of model {rec.entry.model_id!r} was cancelled (DELETE /jobs/…); "
                "ask again to load it"
            )
