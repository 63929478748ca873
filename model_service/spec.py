"""The worker spec: everything a model worker needs to know, passed as a JSON file.

The control plane writes one spec file per loaded model and points the worker at it with the
``MODELPOOL_SPEC`` environment variable. Model details never travel through the supervisord
program entry's text (a model id may contain characters that entry syntax would interpret): on a
node, whose disk the control plane does not share, the spec travels base64-encoded in the entry's
environment (``MODELPOOL_SPEC_DATA``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SPEC_ENV = "MODELPOOL_SPEC"
#: A worker on a node gets its spec in its program entry's environment: base64 of its JSON.
SPEC_DATA_ENV = "MODELPOOL_SPEC_DATA"


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker serves and how it reaches its backend."""

    model_id: str
    port: int
    backend: str = "ollama"
    #: Ollama's base URL (ollama backend).
    ollama_base_url: str = "http://localhost:11434"
    #: Base URL of an OpenAI-compatible upstream, without the ``/v1`` suffix (openai backend).
    upstream_url: str = ""
    #: The model name sent to the backend; defaults to ``model_id``.
    upstream_model: str = ""
    #: Path of a model file (in-process backends).
    model_path: str = ""
    #: Registry estimate, used when the backend cannot report memory itself.
    memory_mb: float | None = None
    #: Backend options (e.g. ``num_ctx`` for Ollama, ``n_ctx``/``n_threads`` for llama.cpp).
    options: dict[str, Any] = field(default_factory=dict)
    #: Pull the model into Ollama when it does not have it (ollama backend).
    pull: bool = False
    #: Seconds the backend may take to load the model.
    load_timeout_seconds: float = 300.0
    #: Largest request body accepted, in bytes.
    max_body_bytes: int = 8 * 1024 * 1024
    #: Bearer token required on /v1 (empty: none), the pool's api_key; ``api_key_file`` wins.
    api_key: str = ""
    #: A file holding the pool's current api_key, re-read when it changes (key rotation).
    api_key_file: str = ""

    @property
    def backend_model(self) -> str:
        return self.upstream_model or self.model_id

    def fingerprint(self) -> str:
        """A short hash of what the worker serves and from where.

        Two specs with the same fingerprint serve the same thing: the port, an API key that the
        worker re-reads from its file and limits such as the load timeout are left out, so only
        a change that needs a new worker changes it.
        """
        served = {
            "model_id": self.model_id,
            "backend": self.backend,
            "ollama_base_url": self.ollama_base_url if self.backend == "ollama" else "",
            "upstream_url": self.upstream_url,
            "upstream_model": self.upstream_model,
            "model_path": self.model_path,
            "options": self.options,
        }
        if self.api_key and not self.api_key_file:
            # A key carried in the spec (a worker on a node) is only read at start: a new key
            # needs a new worker. Workers that re-read a key file keep their fingerprint.
            served["api_key_sha256"] = hashlib.sha256(self.api_key.encode()).hexdigest()
        text = json.dumps(served, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def to_dict(self) -> dict[str, Any]:
        """The spec's fields; ``pull`` only when set, so that a node still running a worker
        that predates it (and rejects keys it does not know) can start the others."""
        data = asdict(self)
        if not data["pull"]:
            del data["pull"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkerSpec:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"worker spec: unknown keys {unknown}")
        return cls(**data)

    def encode(self) -> str:
        """The spec as one environment value: base64 (no ``%``, quote or comma to escape)."""
        return base64.b64encode(json.dumps(self.to_dict(), sort_keys=True).encode()).decode()

    @classmethod
    def decode(cls, data: str) -> WorkerSpec:
        return cls.from_dict(json.loads(base64.b64decode(data, validate=True)))

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> WorkerSpec:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
