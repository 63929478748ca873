"""The Ollama backend: one model on an Ollama server, driven through Ollama's native API.

Ollama's OpenAI-compatible ``/v1`` endpoints ignore ``keep_alive`` and let a model expire after
Ollama's own default (five minutes), under the pool's feet. So this backend translates OpenAI
requests to ``/api/chat`` and ``/api/generate`` and pins the model with ``keep_alive: -1`` on
every call: the pool, not Ollama, decides when the model goes.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any, Final

import requests

from model_service.backends import (
    SSE_DONE,
    ClosingStream,
    embedding_answer,
    sse_error,
    sse_event,
)
from model_service.backends import ollama_messages as msgs
from model_service.backends.base import BackendError, BackendUnavailable, Result
from model_service.backends.ollama_http import (
    CONNECT_TIMEOUT,
    CONTROL_TIMEOUT,
    KEEP_FOREVER,
    MIB,
    READ_TIMEOUT,
    same_model,
)
from model_service.backends.ollama_http import new_session as _new_session
from model_service.backends.ollama_http import ollama_message as _ollama_message
from model_service.backends.ollama_http import short_reason as _short_reason
from model_service.backends.ollama_messages import invalid as _invalid
from model_service.backends.ollama_pull import PullProgress
from model_service.spec import WorkerSpec

log = logging.getLogger(__name__)

# OpenAI sampling parameters Ollama takes under the same name in ``options``. None of them is a
# runner option, so a request setting them does not make Ollama reload the model.
_SAMPLING_KEYS: Final = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty")


def _finish_reason(final: dict[str, Any]) -> str:
    return "length" if final.get("done_reason") == "length" else "stop"


def _usage(final: dict[str, Any]) -> dict[str, int]:
    # Ollama leaves prompt_eval_count out when the whole prompt came from its cache.
    prompt = int(final.get("prompt_eval_count") or 0)
    completion = int(final.get("eval_count") or 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _wants_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


class OllamaBackend:
    """One model on an Ollama server (``spec.ollama_base_url``), served OpenAI-style.

    ``spec.options`` go to Ollama as ``options`` on every call, load included, unchanged: Ollama
    reloads a model when a runner option such as ``num_ctx`` differs from the loaded one.
    Per-request sampling parameters are merged on top of them.
    """

    name: str = "ollama"
    #: The OpenAI parameters this backend honours (see model_service.params).
    supports: frozenset[str] = frozenset(
        {
            "stream", "stream_options", "temperature", "top_p", "stop", "max_tokens",
            "max_completion_tokens", "presence_penalty", "frequency_penalty", "seed", "tools",
            "tool_choice", "response_format", "suffix", "dimensions", "encoding_format",
        }
    )  # fmt: skip

    def __init__(self, spec: WorkerSpec, session: requests.Session | None = None) -> None:
        self.spec = spec
        # The native API lives at the server root; accept a base URL given with the /v1 suffix.
        self.base_url = spec.ollama_base_url.strip().rstrip("/").removesuffix("/v1").rstrip("/")
        self.model = spec.backend_model
        self._options: dict[str, Any] = dict(spec.options)
        self._session = session or _new_session()
        self._read_timeout = max(READ_TIMEOUT, spec.load_timeout_seconds)
        #: The load's pull, if it pulled the model.
        self._pulling: PullProgress | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def load(self) -> None:
        """Load the model in Ollama and pin it there; a model Ollama does not have is pulled
        first when the entry says ``pull`` (``load_progress`` follows the download)."""
        try:
            self._load()
        except BackendError as exc:
            if exc.code != "model_not_found" or not self.spec.pull:
                raise
            self._pull()
            self._load()

    def _load(self) -> None:
        payload = {
            "model": self.model,
            "keep_alive": KEEP_FOREVER,
            "options": self._options,
            "stream": False,
        }
        timeout = self.spec.load_timeout_seconds
        try:
            response = self._session.post(
                self.base_url + "/api/generate", json=payload, timeout=(CONNECT_TIMEOUT, timeout)
            )
        except requests.ConnectionError as exc:
            raise self._unreachable(exc) from exc
        except requests.Timeout as exc:
            raise BackendError(
                f"Ollama at {self.base_url} did not load model {self.model!r} within {timeout:g} s",
                status=504,
                type="timeout",
                code="load_timeout",
            ) from exc
        with response:
            if response.status_code != 200:
                raise self._http_error(response, "load")

    def _pull(self) -> None:
        """``ollama pull``, streamed: the share of the layers' bytes downloaded so far is the
        load's progress (1 once pulled; the load that follows reports none)."""
        log.info("pulling %s into Ollama at %s", self.model, self.base_url)
        self._pulling = PullProgress(f"Ollama at {self.base_url}", self.model)
        try:
            self._pulling.run(self._session, self.base_url + "/api/pull", self._read_timeout)
        except requests.ConnectionError as exc:
            raise self._unreachable(exc) from exc

    def unload(self) -> None:
        payload = {"model": self.model, "keep_alive": 0}
        try:
            self._session.post(
                self.base_url + "/api/generate", json=payload, timeout=CONTROL_TIMEOUT
            ).close()
        except requests.RequestException as exc:
            # Best effort: the worker is stopping either way, and Ollama may be gone already.
            log.warning("unloading %s from Ollama at %s failed: %s", self.model, self.base_url, exc)

    def load_progress(self) -> float | None:
        # Ollama says how far a pull is, not how far a load is.
        return None if self._pulling is None else self._pulling.share

    def memory_mb(self) -> float | None:
        try:
            response = self._session.get(self.base_url + "/api/ps", timeout=CONTROL_TIMEOUT)
            response.raise_for_status()
            models = response.json().get("models") or []
        except (requests.RequestException, ValueError, AttributeError):
            return None
        for entry in models:
            if not isinstance(entry, dict):
                continue
            if same_model(entry.get("name"), self.model) or same_model(
                entry.get("model"), self.model
            ):
                size = entry.get("size")
                return size / MIB if isinstance(size, int | float) else None
        return None

    # -- requests ----------------------------------------------------------------------------

    def chat_completions(self, body: dict[str, Any]) -> Result:
        stream = bool(body.get("stream"))
        payload: dict[str, Any] = {
            "model": self.model,
            "messages": msgs.chat_messages(body),
            "stream": stream,
            "keep_alive": KEEP_FOREVER,
            "options": self._request_options(body),
        }
        fmt = msgs.response_format(body)
        if fmt is not None:
            payload["format"] = fmt
        tools = msgs.offered_tools(body)
        if tools is not None:
            payload["tools"] = tools
        response = self._post("/api/chat", payload, stream=stream)
        if stream:
            chunks = self._translate_stream(response, body, chat=True)
            return Result(stream=ClosingStream(chunks, response.close))
        data = self._json(response)
        message = data.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        calls = msgs.openai_tool_calls(
            message.get("tool_calls") if isinstance(message, dict) else None
        )
        reply: dict[str, Any] = {"role": "assistant", "content": content or ""}
        if calls:
            reply["content"] = content or None
            reply["tool_calls"] = calls
        answer = {
            "id": "chatcmpl-" + uuid.uuid4().hex[:24],
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.spec.model_id,
            "choices": [
                {
                    "index": 0,
                    "message": reply,
                    "finish_reason": "tool_calls" if calls else _finish_reason(data),
                }
            ],
            "usage": _usage(data),
        }
        return Result(json=answer)

    def embeddings(self, body: dict[str, Any]) -> Result:
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if (
            not isinstance(inputs, list)
            or not inputs
            or not all(isinstance(t, str) for t in inputs)
        ):
            raise _invalid("input: must be a string or a non-empty list of strings")
        payload: dict[str, Any] = {
            "model": self.model,
            "input": inputs,
            "keep_alive": KEEP_FOREVER,
            "options": dict(self._options),
        }
        dims = body.get("dimensions")
        if dims is not None:
            if isinstance(dims, bool) or not isinstance(dims, int) or dims < 1:
                raise _invalid(f"dimensions: must be a positive integer, got {dims!r}")
            payload["dimensions"] = dims
        data = self._json(self._post("/api/embed", payload, stream=False))
        vectors = data.get("embeddings")
        if not isinstance(vectors, list) or len(vectors) != len(inputs):
            raise BackendError(f"Ollama at {self.base_url} answered /api/embed without embeddings")
        tokens = int(data.get("prompt_eval_count") or 0)
        return Result(json=embedding_answer(vectors, self.spec.model_id, tokens, body))

    def completions(self, body: dict[str, Any]) -> Result:
        prompt = body.get("prompt")
        raw = prompt if isinstance(prompt, list) else [prompt]
        prompts = [p for p in raw if isinstance(p, str)]
        if not prompts or len(prompts) != len(raw):
            raise _invalid("prompt: must be a string or a list of strings")
        stream = bool(body.get("stream"))
        if stream and len(prompts) > 1:
            raise _invalid(
                f"prompt: a list of {len(prompts)} prompts cannot be streamed by the ollama "
                "backend (one prompt per request when streaming)"
            )
        options = self._request_options(body)
        if stream:
            response = self._post(
                "/api/generate", self._generate(prompts[0], body, options), stream=True
            )
            chunks = self._translate_stream(response, body, chat=False)
            return Result(stream=ClosingStream(chunks, response.close))
        # Several prompts: one generation each, in order, as one answer with a choice each.
        choices: list[dict[str, Any]] = []
        usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for index, text in enumerate(prompts):
            payload = self._generate(text, body, options)
            data = self._json(self._post("/api/generate", payload, stream=False))
            choices.append(
                {
                    "index": index,
                    "text": str(data.get("response") or ""),
                    "logprobs": None,
                    "finish_reason": _finish_reason(data),
                }
            )
            for key, value in _usage(data).items():
                usage[key] += value
        answer = {
            "id": "cmpl-" + uuid.uuid4().hex[:24],
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.spec.model_id,
            "choices": choices,
            "usage": usage,
        }
        return Result(json=answer)

    def _generate(
        self, prompt: str, body: dict[str, Any], options: dict[str, Any]
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.model,
            "prompt": prompt,
            "stream": bool(body.get("stream")),
            "keep_alive": KEEP_FOREVER,
            "options": options,
        }
        if isinstance(body.get("suffix"), str):
            payload["suffix"] = body["suffix"]
        return payload

    # -- helpers -----------------------------------------------------------------------------

    def _request_options(self, body: dict[str, Any]) -> dict[str, Any]:
        options = dict(self._options)
        for key in _SAMPLING_KEYS:
            value = body.get(key)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise _invalid(f"{key}: must be a number, got {value!r}")
                options[key] = value
        max_tokens = body.get("max_completion_tokens")
        if max_tokens is None:
            max_tokens = body.get("max_tokens")
        if max_tokens is not None:
            if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
                raise _invalid(f"max_tokens: must be a positive integer, got {max_tokens!r}")
            options["num_predict"] = max_tokens
        stop = body.get("stop")
        if isinstance(stop, str):
            options["stop"] = [stop]
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
            options["stop"] = list(stop)
        elif stop is not None:
            raise _invalid(f"stop: must be a string or a list of strings, got {stop!r}")
        return options

    def _post(self, path: str, payload: dict[str, Any], *, stream: bool) -> requests.Response:
        try:
            response = self._session.post(
                self.base_url + path,
                json=payload,
                stream=stream,
                timeout=(CONNECT_TIMEOUT, self._read_timeout),
            )
        except requests.ConnectionError as exc:
            raise self._unreachable(exc) from exc
        except requests.Timeout as exc:
            raise BackendError(
                f"Ollama at {self.base_url} did not answer for model {self.model!r} "
                f"within {self._read_timeout:g} s",
                status=504,
                type="timeout",
                code="backend_timeout",
            ) from exc
        if response.status_code != 200:
            with response:
                raise self._http_error(response, "run")
        return response

    def _json(self, response: requests.Response) -> dict[str, Any]:
        try:
            data = response.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise BackendError(f"Ollama at {self.base_url} answered with something not JSON")
        return data

    def _unreachable(self, exc: Exception) -> BackendUnavailable:
        return BackendUnavailable(
            f"Ollama is not reachable at {self.base_url} ({_short_reason(exc)}); "
            f"is `ollama serve` running there?"
        )

    def _http_error(self, response: requests.Response, action: str) -> BackendError:
        message = _ollama_message(response)
        where = f"Ollama at {self.base_url}"
        if response.status_code == 404:
            return BackendError(
                f"model {self.model!r} is not available in {where}: {message}; "
                f"fetch it with `ollama pull {self.model}`",
                status=404,
                type="invalid_request_error",
                code="model_not_found",
            )
        if response.status_code == 400:
            return _invalid(f"{where} rejected the request for model {self.model!r}: {message}")
        if response.status_code == 503:
            # Ollama answers 503 when its request queue is full: worth a retry later.
            return BackendUnavailable(f"{where} is busy: {message}")
        return BackendError(
            f"{where} failed to {action} model {self.model!r}: "
            f"HTTP {response.status_code}: {message}"
        )

    def _ndjson(self, response: requests.Response) -> Iterator[dict[str, Any]]:
        """Ollama's streamed objects as they arrive; the last one is marked done."""
        done = False
        # Read to the end of the body, past the done object, so the connection can be reused.
        for line in response.iter_lines():
            if not line or done:
                continue
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise BackendError(f"Ollama at {self.base_url} streamed something not an object")
            if "error" in obj:
                raise BackendError(f"Ollama at {self.base_url} failed mid-answer: {obj['error']}")
            done = bool(obj.get("done"))
            yield obj
        if not done:
            raise BackendError(f"Ollama at {self.base_url} ended the answer before it was done")

    def _translate_stream(
        self, response: requests.Response, body: dict[str, Any], *, chat: bool
    ) -> Iterator[bytes]:
        """Ollama's NDJSON stream as OpenAI SSE chunks, one chunk per piece as it arrives."""
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        head = {
            "id": ident,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.spec.model_id,
        }

        def chunk(piece: str | None, finish_reason: str | None = None) -> bytes:
            if chat:
                delta = {} if piece is None else {"content": piece}
                choice: dict[str, Any] = {"index": 0, "delta": delta}
            else:
                choice = {"index": 0, "text": piece or "", "logprobs": None}
            choice["finish_reason"] = finish_reason
            return sse_event({**head, "choices": [choice]})

        try:
            if chat:  # OpenAI streams open with the role
                yield sse_event(
                    {
                        **head,
                        "choices": [
                            {
                                "index": 0,
                                "delta": {"role": "assistant", "content": ""},
                                "finish_reason": None,
                            }
                        ],
                    }
                )
            final: dict[str, Any] = {}
            calls = 0
            for obj in self._ndjson(response):
                message = obj.get("message")
                piece = message.get("content") if chat and isinstance(message, dict) else None
                if not chat:
                    piece = obj.get("response")
                if piece:
                    yield chunk(str(piece))
                if chat and isinstance(message, dict) and message.get("tool_calls"):
                    for call in msgs.openai_tool_calls(message["tool_calls"]):
                        yield from msgs.tool_call_deltas(head, calls, call)
                        calls += 1
                if obj.get("done"):
                    final = obj
            yield chunk(None, "tool_calls" if calls else _finish_reason(final))
            if _wants_usage(body):
                yield sse_event({**head, "choices": [], "usage": _usage(final)})
        except (requests.RequestException, BackendError, ValueError) as exc:
            # The status line is gone already: tell the client in the stream itself.
            if isinstance(exc, BackendError):
                message = exc.message
            else:
                message = f"the answer from Ollama at {self.base_url} broke off: {exc}"
            log.warning("%s (model %s)", message, self.model)
            yield sse_error(message)
        finally:
            response.close()
        yield SSE_DONE
