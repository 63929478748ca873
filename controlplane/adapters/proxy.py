"""The front door's relay to the workers: see ``model_service.relay``, shared with the workers'
pass-through backend (one pool of keep-alive connections, answers relayed chunk by chunk)."""

from __future__ import annotations

from model_service.relay import CHUNK, Relay, WorkerProxy, WorkerUnreachable

__all__ = ["CHUNK", "Relay", "WorkerProxy", "WorkerUnreachable"]
