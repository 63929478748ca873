"""The pool's leases: a part of ``ModelPool`` (its lock, records and clock), kept apart so each
concept reads in one sitting. The rules are pure, in ``controlplane.core.leases``."""

from __future__ import annotations

import uuid

from controlplane.core import leases
from controlplane.core.leases import Lease
from controlplane.core.states import SERVING
from controlplane.errors import InvalidInput, UnknownLease
from controlplane.pool_parts import PoolParts


class Leasing:
    """Lease methods of ``ModelPool`` (a mixin: ``self`` is the pool)."""

    def add_lease(self: PoolParts, model_id: str, seconds: object, holder: object) -> Lease:
        """Hold ``model_id`` for ``seconds``; a COLD model starts loading, as for a request.

        Raises InvalidInput, UnknownModel, and what a load raises (NoCapacity, LoadFailed).
        """
        try:
            length, who = leases.check_seconds(seconds), leases.check_holder(holder)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        self.ensure_loaded(model_id, wait=False)
        with self._lock:
            rec = self._get(model_id)
            now = self.clock()
            lease = Lease(uuid.uuid4().hex, who, now, now + length)
            rec.leases[lease.lease_id] = lease
            self._version += 1
            if rec.state in SERVING:
                self.touch(rec, now)
        self.on_change()
        return lease

    def renew_lease(self: PoolParts, model_id: str, lease_id: str, seconds: object) -> Lease:
        """Move a live lease's end to now + ``seconds``; a lapsed one is gone (UnknownLease)."""
        try:
            length = leases.check_seconds(seconds)
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        with self._lock:
            rec = self._get(model_id)
            now = self.clock()
            old = rec.leases.get(lease_id)
            if old is None or old.expires_at <= now:
                raise UnknownLease(model_id, lease_id)
            lease = Lease(old.lease_id, old.holder, old.created_at, now + length)
            rec.leases[lease_id] = lease
            self._version += 1
        self.on_change()
        return lease

    def end_lease(self: PoolParts, model_id: str, lease_id: str) -> None:
        """Release a lease; the model's TTL runs from now if it was the last one."""
        with self._lock:
            rec = self._get(model_id)
            if rec.leases.pop(lease_id, None) is None:
                raise UnknownLease(model_id, lease_id)
            self._version += 1
            if not rec.leases and rec.state in SERVING:
                self.touch(rec, self.clock())
        self.on_change()

    def _lapse_leases(self: PoolParts, now: float) -> None:
        """Drop leases past their end (lock held); a model's TTL runs from its last lapse."""
        for rec in self._records.values():
            if not rec.leases:
                continue
            live, lapsed_at = leases.lapse(rec.leases, now)
            if len(live) == len(rec.leases):
                continue
            rec.leases = live
            self._version += 1
            if not live and lapsed_at is not None and rec.state in SERVING:
                self.touch(rec, lapsed_at)
