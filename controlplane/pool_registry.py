"""The pool's registry and settings: entries added, replaced and deleted, settings changed,
workers adopted after a restart, outdated workers reloaded, and what the state file keeps.

A part of ``ModelPool`` (one lock, one writer).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from typing import Any

from controlplane.core import leases
from controlplane.core.chores import ChoreEvent
from controlplane.core.slug import program_name
from controlplane.core.states import OCCUPYING, SERVING, Event, State
from controlplane.errors import (
    Conflict,
)
from controlplane.nodeconfig import LOCAL
from controlplane.pool_parts import PoolParts
from controlplane.records import Record
from controlplane.settings import (
    ModelEntry,
    Settings,
)

log = logging.getLogger("modelpool.pool")


class Registry:
    """The pool's registry and settings (a mixin of ``ModelPool``: ``self`` is the pool)."""

    def add_entry(self: PoolParts, entry: ModelEntry) -> None:
        with self._lock:
            if entry.model_id in self._records:
                raise Conflict(f"model {entry.model_id!r} is already registered")
            self._records[entry.model_id] = Record(
                entry=entry, program=program_name(entry.model_id)
            )
            self._order.append(entry.model_id)

    def replace_entry(self: PoolParts, entry: ModelEntry) -> None:
        """A registry entry changed: keep the model's state; ``reload_changed`` decides whether
        its worker must be replaced. A permanent load failure may be retried with the new one."""
        with self._lock:
            scaling = self._scaling.get(entry.model_id)
            if scaling is not None and scaling.pinned is not None:
                low, high = entry.replicas  # a pinned count stays within the new bounds
                scaling.pinned = min(max(scaling.pinned, low), high)
            for rec in self._group(self._get(entry.model_id).key):
                rec.entry = entry
                if rec.state is State.FAILED and rec.retry_at == math.inf:
                    rec.retry_at = 0.0
            self._refit_deadlines()
            self._changed.notify_all()
        self.on_change()

    def mark_deleting(self: PoolParts, model_id: str) -> Record:
        """Hide a model from new requests; unload it if loaded. Conflict while WARMING."""
        with self._lock:
            first = self._get(model_id)
            if first.state is State.WARMING:
                raise Conflict(f"model {model_id!r} is loading; delete it once it is HOT")
            self._scaling.pop(model_id, None)
            for rec in reversed(self._group(model_id)):  # its own record last (``_drop``)
                rec.deleting = True
                if rec.state in SERVING:
                    self._begin_unload(rec, Event.UNLOAD_REQUESTED, "deleted")
                elif rec.state is State.WARMING and not rec.adopting:  # a replica scaling began
                    self._begin_unload(rec, Event.LOAD_CANCELLED, "deleted", force=True)
                elif rec.state is not State.UNLOADING and not rec.busy:  # no job to report
                    self._drop(rec)
            return replace(first)

    def wait_dropped(self: PoolParts, model_id: str, timeout: float) -> bool:
        limit = time.monotonic() + timeout
        with self._lock:
            while model_id in self._records and time.monotonic() < limit:
                self._changed.wait(0.5)
            return model_id not in self._records

    def _drop(self: PoolParts, rec: Record) -> None:
        """Forget a deleted record whose worker is gone (lock held). The model's own record
        goes once its other replicas have: until then its name is not free to register."""
        model_id = rec.entry.model_id
        if rec.replica == 1 and self._extras.get(model_id):
            return  # dropped by the last of its replicas
        self._records.pop(rec.key, None)
        if rec.replica == 1:
            self._order.remove(rec.key)
        else:
            self._drop_replica(rec)
            first = self._records.get(model_id)
            if (
                first is not None
                and first.deleting
                and first.state not in OCCUPYING
                and not first.busy
                and not self._extras.get(model_id)
            ):
                self._drop(first)
        self._changed.notify_all()

    def set_settings(self: PoolParts, settings: Settings) -> None:
        """Apply new settings; deadlines follow a change of warmup set or TTL 0."""
        with self._lock:
            self.settings = settings
            self._refit_deadlines()
            self._changed.notify_all()
        self.on_change()

    def reload_changed(self: PoolParts) -> list[str]:
        """Drain and reload (reason ``config_changed``) every loaded model whose worker serves a
        spec that its entry and the settings no longer give; returns them."""
        changed = []
        with self._lock:
            for rec in self._records.values():
                if (
                    rec.state not in SERVING
                    or rec.fingerprint is None
                    or rec.deleting
                    or not self._node_answers(rec)
                    or self._replacing_another(rec)
                ):
                    continue
                moved = rec.replica == 1 and rec.entry.port not in (None, rec.port)
                if moved or rec.fingerprint != self.fingerprint_for(rec):
                    rec.reload = True
                    self._begin_unload(rec, Event.UNLOAD_REQUESTED, "config_changed")
                    changed.append(rec.entry.model_id)
        return changed

    def _replacing_another(self: PoolParts, rec: Record) -> bool:
        """Another replica of ``rec``'s model is being reloaded or loaded (lock held): replicas
        are replaced one at a time, so the others keep serving meanwhile."""
        return any(
            r is not rec and (r.state is State.WARMING or (r.reload and r.state is State.UNLOADING))
            for r in self._group(rec.entry.model_id)
        )

    def adopt(
        self: PoolParts,
        model_id: str,
        port: int,
        pid: int,
        deadline: float | None,
        fingerprint: str,
        saved_leases: Any = None,
    ) -> bool:
        """Take over a worker that is already running (after a control-plane restart).

        ``fingerprint`` is its spec's: if the entry changed meanwhile, ``reload_changed``
        drains and reloads it once it is HOT.
        """
        with self._lock:
            rec = self._record_for(model_id)  # a replica's key too
            if rec is None or rec.state is not State.COLD:
                return False
            rec.node = LOCAL
            rec.port = port
            rec.pid = pid
            rec.fingerprint = fingerprint
            rec.estimate_mb = self._estimate(rec)
            self._new_generation(rec)
            rec.restore_deadline = deadline
            rec.leases = leases.restore(saved_leases, self.clock())
            self._chore(rec, ChoreEvent.ADOPTION_STARTED)
            self._apply(rec, Event.LOAD_REQUESTED, "adopt")
            self._start_load(rec, adopt=True)
            return True

    def started_with(self: PoolParts, model_id: str, gen: int, fingerprint: str) -> None:
        """The lifecycle wrote the spec of generation ``gen``'s worker; remember what it serves."""
        with self._lock:
            rec = self._records.get(model_id)
            if rec is not None and rec.gen == gen:
                rec.fingerprint = fingerprint

    def persisted(self: PoolParts) -> tuple[tuple[int, int], dict[str, Any]]:
        """What survives a control-plane restart: deadlines and counters of loaded models.

        Returns the snapshot's version with it; the writer calls ``saved(version)`` once the
        file is written, so a failed write leaves the pool dirty and is tried again.
        """
        with self._lock:
            return (self._version, self._moved), {
                "version": 1,
                "pinned": self.pinned_counts(),
                "models": {
                    m: {
                        "program": r.program,
                        "node": r.node or LOCAL,
                        "port": r.port,
                        "fingerprint": r.fingerprint,
                        "state": r.state.value,
                        "deadline": r.deadline or r.restore_deadline,
                        "loaded_at": r.loaded_at,
                        "requests": r.requests,
                        "leases": [lease.view() for lease in r.leases.values()],
                    }
                    for m, r in self._records.items()
                    if r.state in OCCUPYING
                },
            }

    def saved(self: PoolParts, version: tuple[int, int]) -> None:
        """The snapshot ``version`` from ``persisted`` is on disk."""
        with self._lock:
            self._saved, self._moved_saved = version
