"""The llama.cpp backend: a GGUF model loaded in the worker's own process (llama-cpp-python).

One model instance generates one answer at a time (a lock around it); requests beyond that wait
in a bounded queue, and a full queue answers 503 with Retry-After instead of piling up threads.
llama-cpp-python calls into C through ctypes, which releases the GIL, so ``/health`` and other
threads stay responsive while a request generates.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import llama_cpp

from model_service.backends import (
    SSE_DONE,
    ClosingStream,
    embedding_answer,
    sse_error,
    sse_event,
)
from model_service.backends.base import BackendError, Result
from model_service.backends.llamacpp_answers import TokenCap, openai_tool_deltas, plain, pooled
from model_service.spec import WorkerSpec

#: Options passed to ``llama_cpp.Llama`` as they are, with their types.
LLAMA_OPTIONS: Final[dict[str, type]] = {
    "n_ctx": int,
    "n_threads": int,
    "n_batch": int,
    "n_gpu_layers": int,
    "seed": int,
    "chat_format": str,
    "use_mmap": bool,
    "use_mlock": bool,
    "rope_freq_base": float,
    "embedding": bool,
    # Keeps the logits of every token: needed for logprobs (and costs n_ctx x vocab floats).
    "logits_all": bool,
}
#: llama-cpp-python chat formats that call tools (``options.chat_format``).
TOOL_FORMATS: Final = frozenset(
    {"chatml-function-calling", "functionary", "functionary-v1", "functionary-v2"}
)
#: Options of the worker itself.
#: Bytes read at a time ahead of llama.cpp (the load's progress moves by this much).
READ_AHEAD_CHUNK: Final = 8 * 2**20
WORKER_OPTIONS: Final[dict[str, type]] = {"max_queue": int, "queue_timeout": float}
DEFAULTS: Final[dict[str, Any]] = {
    "n_ctx": 2048,
    # Read the weights into memory, so that "ready" means resident and RSS counts them.
    "use_mmap": False,
    "max_queue": 16,
    "queue_timeout": 300.0,
}


def read_ahead(path: Path, chunk: int, on_read: Callable[[int], None]) -> int:
    """Read ``path`` through, ``chunk`` bytes at a time, telling ``on_read`` each count; the
    total read."""
    total = 0
    buf = bytearray(chunk)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
            on_read(n)
    return total


def _invalid(message: str) -> BackendError:
    return BackendError(message, status=400, type="invalid_request_error", code="invalid_request")


def _busy(message: str, retry_after: int = 2) -> BackendError:
    return BackendError(
        message, status=503, type="server_error", code="queue_full", retry_after=retry_after
    )


class LlamaCppBackend:
    """A GGUF model in this process, one generation at a time, with a bounded queue."""

    name = "llamacpp"
    #: The OpenAI parameters this backend honours (see model_service.params).
    supports: frozenset[str] = frozenset(
        {
            "stream", "stream_options", "temperature", "top_p", "stop", "max_tokens",
            "max_completion_tokens", "presence_penalty", "frequency_penalty", "seed", "tools",
            "tool_choice", "response_format", "encoding_format", "logprobs", "top_logprobs",
        }
    )  # fmt: skip

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.options = self._check_options(dict(spec.options))
        path = Path(spec.model_path)
        if not path.is_absolute():
            # Relative paths are relative to the project directory (the worker's cwd).
            path = Path.cwd() / path
        self.path = path
        self.llm: llama_cpp.Llama | None = None
        #: The model file's size and how much of it ``load`` has read (``load_progress``).
        self._size = 0
        self._read = 0
        self._model_lock = threading.Lock()
        # Running plus waiting requests: more than this is refused at once.
        self._slots = threading.BoundedSemaphore(1 + int(self.options["max_queue"]))

    @staticmethod
    def _check_options(opts: dict[str, Any]) -> dict[str, Any]:
        known = {**LLAMA_OPTIONS, **WORKER_OPTIONS}
        for key, value in opts.items():
            kind = known.get(key)
            if kind is None:
                raise BackendError(
                    f"options.{key}: unknown llamacpp option (known: {', '.join(sorted(known))})",
                    status=500,
                    type="configuration_error",
                    code="invalid_option",
                )
            ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                ok = True
            if not ok:
                raise BackendError(
                    f"options.{key}: {value!r} is not {kind.__name__}",
                    status=500,
                    type="configuration_error",
                    code="invalid_option",
                )
        return {**DEFAULTS, **opts}

    # --- Backend ------------------------------------------------------------------------------

    def load(self) -> None:
        if not self.path.is_file():
            hint = ""
            if self.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf":
                hint = " (the quick start's model: `modelpool fetch-model` puts it there)"
            raise BackendError(
                f"model file not found: {self.path}{hint}",
                status=500,
                type="configuration_error",
                code="model_not_found",
            )
        self._read_ahead()
        kwargs = {k: v for k, v in self.options.items() if k in LLAMA_OPTIONS}
        kwargs.setdefault("n_threads", max(1, (os.cpu_count() or 2)))
        try:
            self.llm = llama_cpp.Llama(model_path=str(self.path), verbose=False, **kwargs)
        except (ValueError, RuntimeError, OSError) as exc:
            raise BackendError(
                f"llama.cpp could not load {self.path}: {exc}",
                status=500,
                type="configuration_error",
                code="load_failed",
            ) from None

    def _read_ahead(self) -> None:
        """Read the file once before llama.cpp opens it, counting bytes (the load's progress).

        llama.cpp then finds the file in the page cache, whether it maps or reads it, so the
        whole load takes about as long; what it does after reading is not counted.
        """
        self._size = self.path.stat().st_size
        self._read = 0

        def count(n: int) -> None:
            self._read += n

        read_ahead(self.path, READ_AHEAD_CHUNK, count)

    def load_progress(self) -> float | None:
        if self._size <= 0:
            return None
        return min(1.0, self._read / self._size)

    def unload(self) -> None:
        llm, self.llm = self.llm, None
        if llm is not None:
            llm.close()

    def memory_mb(self) -> float | None:
        # In-process: the control plane measures the worker's process tree (RSS) itself.
        return None

    def chat_completions(self, body: dict[str, Any]) -> Result:
        self._generative()
        params = self._params(body)
        params.update(self._chat_params(body))
        params.update(self._logprobs(body, chat=True))
        messages = body["messages"]
        return self._run(
            body,
            lambda llm, stream, procs: llm.create_chat_completion(
                messages=messages, stream=stream, logits_processor=procs, **params
            ),
            chat=True,
        )

    def completions(self, body: dict[str, Any]) -> Result:
        self._generative()
        if body.get("tools") is not None or body.get("response_format") is not None:
            key = "tools" if body.get("tools") is not None else "response_format"
            raise _invalid(f"{key}: only /v1/chat/completions takes it")
        prompt = body["prompt"]
        if isinstance(prompt, list) and len(prompt) != 1:
            if body.get("stream") or not prompt:
                raise _invalid(
                    f"prompt: a list of {len(prompt)} prompts cannot be streamed by the llamacpp "
                    "backend (one prompt per request when streaming)"
                )
            return self._each_prompt(body, prompt)
        if isinstance(prompt, list):
            prompt = prompt[0]
        params = self._params(body)
        params.update(self._logprobs(body, chat=False))
        return self._run(
            body,
            lambda llm, stream, procs: llm.create_completion(
                prompt=prompt, stream=stream, logits_processor=procs, **params
            ),
            chat=False,
        )

    def embeddings(self, body: dict[str, Any]) -> Result:
        if not self.options.get("embedding"):
            raise _invalid(
                f"model {self.spec.model_id!r} does not embed: register it with "
                "model_type: embedding (or options.embedding: true)"
            )
        inputs = body["input"]
        self._acquire()
        try:
            llm = self.llm
            if llm is None:
                raise BackendError("the model is not loaded", status=503, retry_after=5)
            out = llm.create_embedding(input=inputs)
        finally:
            self._release()
        vectors = [pooled(item["embedding"]) for item in out["data"]]
        tokens = int((out.get("usage") or {}).get("prompt_tokens") or 0)
        return Result(json=embedding_answer(vectors, self.spec.model_id, tokens, body))

    # --- internals ----------------------------------------------------------------------------

    def _each_prompt(self, body: dict[str, Any], prompts: list[str]) -> Result:
        """Several prompts: one generation each, in order, as one answer with a choice each."""
        merged: dict[str, Any] | None = None
        for index, text in enumerate(prompts):
            out = self.completions({**body, "prompt": text}).json or {}
            for choice in out.get("choices", []):
                choice["index"] = index
            if merged is None:
                merged = out
                continue
            merged["choices"].extend(out.get("choices", []))
            for key, value in (out.get("usage") or {}).items():
                merged["usage"][key] = merged["usage"].get(key, 0) + value
        assert merged is not None
        return Result(json=merged)

    def _generative(self) -> None:
        if self.options.get("embedding"):
            raise _invalid(
                f"model {self.spec.model_id!r} is an embedding model: use /v1/embeddings"
            )

    def _logprobs(self, body: dict[str, Any], chat: bool) -> dict[str, Any]:
        """``logprobs`` (chat: a boolean and ``top_logprobs`` 0-20; completions: 0-5 top
        tokens), which llama.cpp gives only for a model loaded with ``options.logits_all``."""
        if chat:
            wanted, top = body.get("logprobs"), body.get("top_logprobs")
            if wanted is not None and not isinstance(wanted, bool):
                raise _invalid(f"logprobs: {wanted!r} is not a boolean")
            if top is not None and (
                isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20
            ):
                raise _invalid(f"top_logprobs: {top!r} is not an integer from 0 to 20")
            if top and not wanted:
                raise _invalid("top_logprobs: needs logprobs: true")
            params: dict[str, Any] = {"logprobs": True, "top_logprobs": top or 0} if wanted else {}
        else:
            n = body.get("logprobs")
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 5):
                raise _invalid(f"logprobs: {n!r} is not an integer from 0 to 5")
            params = {"logprobs": n} if n else {}
        if params and not self.options.get("logits_all"):
            raise _invalid(
                f"logprobs: model {self.spec.model_id!r} was loaded without the logits of every "
                "token; register it with options.logits_all: true to get logprobs"
            )
        return params

    def _chat_params(self, body: dict[str, Any]) -> dict[str, Any]:
        """Tools and JSON output, as llama-cpp-python's chat handlers take them."""
        params: dict[str, Any] = {}
        if body.get("tools") is not None:
            fmt = self.options.get("chat_format")
            if fmt not in TOOL_FORMATS:
                raise _invalid(
                    f"tools: model {self.spec.model_id!r} has chat format {fmt or 'from its GGUF'}"
                    f", which does not call tools; register it with options.chat_format: "
                    "chatml-function-calling (or a functionary format)"
                )
            params["tools"] = body["tools"]
            if body.get("tool_choice") is not None:
                params["tool_choice"] = body["tool_choice"]
        rf = body.get("response_format")
        if isinstance(rf, dict) and rf.get("type") == "json_object":
            params["response_format"] = {"type": "json_object"}
        elif isinstance(rf, dict) and rf.get("type") == "json_schema":
            schema = (rf.get("json_schema") or {}).get("schema")
            params["response_format"] = {"type": "json_object", "schema": schema}
        elif rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
            raise _invalid(f"response_format: {rf!r} is not text, json_object or json_schema")
        return params

    def _params(self, body: dict[str, Any]) -> dict[str, Any]:
        params: dict[str, Any] = {}
        for key, kind in (
            ("temperature", float),
            ("top_p", float),
            ("presence_penalty", float),
            ("frequency_penalty", float),
        ):
            if body.get(key) is not None:
                value = body[key]
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise _invalid(f"{key}: {value!r} is not a number")
                params[key] = kind(value)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if max_tokens is not None:
            if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
                raise _invalid(f"max_tokens: {max_tokens!r} is not a positive integer")
            params["max_tokens"] = max_tokens
        if body.get("seed") is not None:
            if isinstance(body["seed"], bool) or not isinstance(body["seed"], int):
                raise _invalid(f"seed: {body['seed']!r} is not an integer")
            params["seed"] = body["seed"]
        stop = body.get("stop")
        if stop is not None:
            if isinstance(stop, str):
                stop = [stop]
            if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
                raise _invalid("stop: expected a string or a list of strings")
            params["stop"] = stop
        return params

    def _acquire(self) -> None:
        """Take a queue slot, then the model: 503 if the queue is full or waits too long."""
        if not self._slots.acquire(blocking=False):
            raise _busy(
                f"model {self.spec.model_id!r} is busy: {self.options['max_queue']} requests "
                "already wait (options.max_queue)"
            )
        if not self._model_lock.acquire(timeout=float(self.options["queue_timeout"])):
            self._slots.release()
            raise _busy(f"model {self.spec.model_id!r} stayed busy", retry_after=5)

    def _release(self) -> None:
        self._model_lock.release()
        self._slots.release()

    def _run(self, body: dict[str, Any], call: Any, chat: bool) -> Result:
        self._acquire()
        llm = self.llm
        if llm is None:
            self._release()
            raise BackendError("the model is not loaded", status=503, retry_after=5)
        stream = bool(body.get("stream"))
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        cap = TokenCap(max_tokens if isinstance(max_tokens, int) else None, llm.token_eos())
        try:
            out = call(llm, stream, llama_cpp.LogitsProcessorList([cap]))
        except ValueError as exc:  # e.g. the prompt does not fit the context window
            self._release()
            raise _invalid(str(exc)) from None
        except BaseException:
            self._release()
            raise
        if not stream:
            self._release()
            if "logprobs" in body:
                out = plain(out)
            out["model"] = self.spec.model_id
            if cap.forced:
                for choice in out.get("choices", []):
                    choice["finish_reason"] = "length"
            return Result(json=out)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        chunks = self._sse(out, llm, chat, include_usage, cap)
        return Result(stream=ClosingStream(chunks, self._once(self._release)))

    @staticmethod
    def _once(fn: Any) -> Any:
        done = threading.Event()

        def run() -> None:
            if not done.is_set():
                done.set()
                fn()

        return run

    def _sse(
        self,
        chunks: Iterator[dict[str, Any]],
        llm: llama_cpp.Llama,
        chat: bool,
        usage: bool,
        cap: TokenCap,
    ) -> Iterator[bytes]:
        """OpenAI SSE events from llama-cpp-python's chunks, with usage if asked for."""
        created = int(time.time())
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        finish: str | None = None
        named: set[int] = set()
        try:
            for chunk in chunks:
                if chunk.get("choices") and chunk["choices"][0].get("logprobs") is not None:
                    chunk = plain(chunk)
                chunk["model"] = self.spec.model_id
                chunk["id"] = ident
                chunk.setdefault("created", created)
                for choice in chunk.get("choices") or []:
                    openai_tool_deltas(choice.get("delta"), named)
                    if choice.get("finish_reason"):
                        if cap.forced:
                            choice["finish_reason"] = "length"
                        finish = choice["finish_reason"]
                yield sse_event(chunk)
            if usage:
                yield sse_event(
                    {
                        "id": ident,
                        "object": "chat.completion.chunk" if chat else "text_completion",
                        "created": created,
                        "model": self.spec.model_id,
                        "choices": [],
                        "usage": cap.usage(finish, llm.n_tokens),
                    }
                )
            yield SSE_DONE
        except ValueError as exc:
            yield sse_error(str(exc), type="invalid_request_error", code="invalid_request")
