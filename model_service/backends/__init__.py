"""Backends: how a worker reaches the engine that runs its model.

``make_backend`` picks the implementation the worker spec names. Each backend module is imported
only when asked for: the llama.cpp one needs the optional llama-cpp-python package, and a worker
for an Ollama model has no reason to import it. The small SSE helpers here are shared by the
HTTP backends.
"""

from __future__ import annotations

import base64
import importlib
import json
import struct
from collections.abc import Callable, Iterator
from typing import Any, Final

from model_service.backends.base import Backend, BackendError
from model_service.spec import WorkerSpec

BACKENDS: Final = ("ollama", "llamacpp", "openai")
SSE_DONE: Final = b"data: [DONE]\n\n"


def sse_event(payload: dict[str, Any]) -> bytes:
    """One server-sent event carrying ``payload`` as JSON."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def sse_error(message: str, *, type: str = "backend_error", code: str = "backend_error") -> bytes:
    """An error event in the OpenAI shape, for failures after a stream's headers went out."""
    return sse_event({"error": {"message": message, "type": type, "code": code}})


def embedding_answer(
    vectors: list[Any], model: str, tokens: int, body: dict[str, Any]
) -> dict[str, Any]:
    """An OpenAI ``/v1/embeddings`` answer; ``encoding_format: base64`` packs each vector as
    little-endian float32 (what the openai SDK asks for by default)."""
    b64 = body.get("encoding_format") == "base64"

    def encode(vector: list[float]) -> Any:
        if not b64:
            return vector
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()

    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": encode(v)}
            for i, v in enumerate(vectors)
        ],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


class ClosingStream(Iterator[bytes]):
    """A stream of SSE chunks that releases its upstream response when closed.

    A generator's ``finally`` does not run if the generator is closed before it started, so the
    release callback is called here as well: whoever closes the stream (the worker, when the
    client goes away) frees the upstream connection whether or not a chunk was ever read.
    """

    def __init__(self, chunks: Iterator[bytes], release: Callable[[], None]) -> None:
        self._chunks = chunks
        self._release = release

    def __iter__(self) -> ClosingStream:
        return self

    def __next__(self) -> bytes:
        return next(self._chunks)

    def close(self) -> None:
        try:
            close = getattr(self._chunks, "close", None)
            if close is not None:
                close()
        finally:
            self._release()


def make_backend(spec: WorkerSpec) -> Backend:
    """The backend for ``spec.backend``; raises BackendError for an unknown or missing one."""
    if spec.backend == "ollama":
        from model_service.backends.ollama import OllamaBackend

        return OllamaBackend(spec)
    if spec.backend == "openai":
        from model_service.backends.openai import OpenAIBackend

        return OpenAIBackend(spec)
    if spec.backend == "llamacpp":
        try:
            # By name, so type checking does not need the optional package installed.
            module = importlib.import_module("model_service.backends.llamacpp")
        except ImportError as exc:
            raise BackendError(
                "the llamacpp backend needs llama-cpp-python: pip install 'modelpool[llamacpp]'",
                status=500,
                type="configuration_error",
                code="backend_not_installed",
            ) from exc
        backend: Backend = module.LlamaCppBackend(spec)
        return backend
    raise BackendError(
        f"backend: unknown backend {spec.backend!r} for model {spec.model_id!r}; "
        f"expected one of {', '.join(BACKENDS)}",
        status=500,
        type="configuration_error",
        code="unknown_backend",
    )
