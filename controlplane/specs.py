"""What a model's worker is started with: its spec, built from the registry entry and settings.

The spec's fingerprint (``WorkerSpec.fingerprint``) tells whether a running worker still serves
what its entry says; one that does not is drained and loaded again (reason ``config_changed``).
"""

from __future__ import annotations

from controlplane.settings import ModelEntry, Settings, resolve_model_path
from model_service.spec import WorkerSpec


def build_spec(entry: ModelEntry, settings: Settings, port: int, api_key_file: str) -> WorkerSpec:
    """The spec of a worker for ``entry`` on ``port``; the API key travels in its own file.

    A llama.cpp entry of ``model_type: embedding`` is loaded in embedding mode.
    """
    options = dict(entry.options)
    if entry.backend == "llamacpp" and entry.model_type == "embedding":
        options.setdefault("embedding", True)
    return WorkerSpec(
        model_id=entry.model_id,
        port=port,
        backend=entry.backend,
        ollama_base_url=settings.ollama_base_url,
        upstream_url=entry.upstream_url,
        upstream_model=entry.upstream_model,
        model_path=resolve_model_path(entry.model_path),
        memory_mb=entry.memory_mb,
        options=options,
        pull=entry.pull,
        load_timeout_seconds=settings.load_timeout_seconds,
        api_key_file=api_key_file,
    )


def wanted_fingerprint(entry: ModelEntry, settings: Settings) -> str:
    """The fingerprint a worker for ``entry`` would have if it were started now."""
    return build_spec(entry, settings, 0, "").fingerprint()
