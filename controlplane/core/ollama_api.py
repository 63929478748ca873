"""Ollama's API requests as OpenAI's: the pure half of the front door's ``/api`` routes.

``chat_plan``, ``generate_plan`` and ``embed_plan`` turn an Ollama request body into the OpenAI
request a worker serves (``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``), or
raise ``BadRequest`` naming the key. ``keep_alive`` never reaches the backend: it is parsed here
(``KeepAlive``) and the front door applies it to the pool's TTL. The answers' way back is
``controlplane.core.ollama_answers``. No I/O, no clock reads.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

#: The Ollama release whose API the front door speaks (clients gate features on it).
API_VERSION: Final = "0.9.0"
CHAT_PATH: Final = "/v1/chat/completions"
COMPLETIONS_PATH: Final = "/v1/completions"
EMBEDDINGS_PATH: Final = "/v1/embeddings"

#: Ollama options that are OpenAI parameters of the same name. The other sampling options
#: (top_k, min_p, repeat_penalty, mirostat, ...) have no OpenAI parameter, which is all a worker
#: speaks: they are a 400 naming them, never dropped.
SAME_NAME_OPTIONS: Final = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty")
SUPPORTED_OPTIONS: Final = (*SAME_NAME_OPTIONS, "num_predict", "stop")
#: How a model is loaded rather than how one answer is sampled. The registry entry's ``options``
#: decide these for every client of the model; a request's values are ignored (and named in the
#: answer's ``X-Modelpool-Ignored-Options`` header), never sent on: one client's ``num_ctx``
#: would make Ollama reload the model under everyone else's requests.
RUNNER_OPTIONS: Final = frozenset(
    {
        "num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "use_mmap", "use_mlock",
        "numa", "low_vram", "f16_kv", "logits_all", "vocab_only", "embedding_only",
    }
)  # fmt: skip
#: Image magic numbers (as base64 prefixes) for the data URLs of image content parts.
_IMAGE_TYPES: Final = (
    ("iVBORw0KGgo", "png"),
    ("/9j/", "jpeg"),
    ("R0lGOD", "gif"),
    ("UklGR", "webp"),
)
_NUMBER: Final = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_UNIT: Final = r"(?:ns|us|µs|μs|ms|s|m|h)"
#: keep_alive as a string: seconds, or a Go duration ("5m", "1h30m", "-1m"). The OpenAPI
#: document states the same pattern.
DURATION_PATTERN: Final = rf"[+-]?(?:(?:{_NUMBER}{_UNIT})+|{_NUMBER})"
_DURATION_PART = re.compile(rf"({_NUMBER})({_UNIT})")
#: Base64 as Ollama takes images (standard alphabet, padded); the document states it too.
BASE64_PATTERN: Final = (
    r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=|[A-Za-z0-9+/]{4})"
)
_UNITS: Final = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0
}  # fmt: skip


class BadRequest(ValueError):
    """Bad input: answered 400 in Ollama's shape; the message names the key."""


# --- requests ---------------------------------------------------------------------------------


def parse_duration(value: Any, key: str = "keep_alive") -> float:
    """Seconds from Ollama's duration: a number of seconds, or a Go duration such as "5m"."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and re.fullmatch(DURATION_PATTERN, value):
        sign = -1.0 if value.startswith("-") else 1.0
        unsigned = value.lstrip("+-")
        parts = _DURATION_PART.findall(unsigned)
        if not parts:
            return sign * float(unsigned)  # a number of seconds
        return sign * sum(float(n) * _UNITS[u] for n, u in parts)
    raise BadRequest(f'{key}: {value!r} is not a duration (seconds, or e.g. "5m", "1h", "-1")')


@dataclass(frozen=True)
class KeepAlive:
    """What a request's ``keep_alive`` asks of the pool (seconds; negative: for ever)."""

    seconds: float

    @property
    def unload(self) -> bool:
        """0: unload the model once this answer is relayed."""
        return self.seconds == 0

    def extend_minutes(self, max_ttl_minutes: float) -> float | None:
        """Minutes to extend the TTL by (the pool caps them at the max TTL); None: no change."""
        if self.seconds < 0:
            return max_ttl_minutes
        return self.seconds / 60.0 if self.seconds > 0 else None


@dataclass(frozen=True)
class Plan:
    """One Ollama request as the worker's OpenAI request, plus what the front door does."""

    kind: str  # "chat", "generate" or "embed": the shape of the answer
    model: str  # as the client named it
    path: str  # the worker's endpoint
    body: dict[str, Any]  # the OpenAI request without "model" (the registry id goes there)
    stream: bool
    keep_alive: KeepAlive | None = None
    load_only: bool = False  # no prompt: load (or with keep_alive 0, unload) the model only
    ignored: tuple[str, ...] = ()  # runner options not forwarded

    @property
    def source(self) -> str:
        """Which OpenAI answer comes back: "chat", "completions" or "embeddings"."""
        return {CHAT_PATH: "chat", COMPLETIONS_PATH: "completions"}.get(self.path, "embeddings")


def resolve_model(name: str, registered: Iterable[str]) -> str | None:
    """The registry id an Ollama model name means: exact, or with/without the ":latest" tag."""
    ids = set(registered)
    if name in ids:
        return name
    tagged = ":" in name.rsplit("/", 1)[-1]
    if not tagged and f"{name}:latest" in ids:
        return f"{name}:latest"
    if name.endswith(":latest") and name[: -len(":latest")] in ids:
        return name[: -len(":latest")]
    return None


def model_name(body: Mapping[str, Any], legacy_name: bool = False) -> str:
    """The ``model`` key (or, where Ollama still takes it and ``model`` is absent, ``name``)."""
    if legacy_name and "name" in body and (not isinstance(body["name"], str) or not body["name"]):
        raise BadRequest(f"name: {body['name']!r} is not the name of a model")
    key = "name" if legacy_name and "model" not in body and "name" in body else "model"
    value = body.get(key)
    if value is None:
        raise BadRequest("model: missing (expected the name of a registered model)")
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{key}: {value!r} is not the name of a model")
    return value


def _optional(body: Mapping[str, Any], key: str, kind: type, where: str = "") -> Any:
    """``body[key]`` if it is of ``kind``; None if absent or null; else a 400 naming it."""
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise BadRequest(f"{where}{key}: expected {_KINDS[kind]}, got {value!r}")
    return value


_KINDS: Final = {
    str: "a string",
    bool: "a boolean",
    int: "an integer",
    dict: "an object",
    list: "a list",
}


def _stream(body: Mapping[str, Any]) -> bool:
    value = body.get("stream")
    if value is None:
        return True  # Ollama streams unless told not to
    if not isinstance(value, bool):
        raise BadRequest(f"stream: {value!r} is not a boolean")
    return value


def _keep_alive(body: Mapping[str, Any]) -> KeepAlive | None:
    value = body.get("keep_alive")
    return None if value is None else KeepAlive(parse_duration(value))


def _number(key: str, value: Any, integer: bool = False) -> Any:
    kinds = int if integer else int | float
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise BadRequest(f"{key}: {value!r} is not {'an integer' if integer else 'a number'}")
    return value


def _options(body: Mapping[str, Any], sampling: bool) -> tuple[dict[str, Any], tuple[str, ...]]:
    """(OpenAI parameters, ignored runner options) from ``options``."""
    options = body.get("options")
    if options is None:
        return {}, ()
    if not isinstance(options, dict):
        raise BadRequest("options: expected an object")
    out: dict[str, Any] = {}
    ignored: list[str] = []
    for key, value in options.items():
        where = f"options.{key}"
        if value is None:
            continue
        if key in RUNNER_OPTIONS or not sampling:
            ignored.append(key)  # embeddings are not sampled: sampling options change nothing
        elif key in SAME_NAME_OPTIONS:
            out[key] = _number(where, value, integer=key == "seed")
        elif key == "num_predict":
            if _number(where, value, integer=True) > 0:  # 0 or negative: no limit, as in Ollama
                out["max_tokens"] = value
        elif key == "stop":
            stops = [value] if isinstance(value, str) else value
            if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
                raise BadRequest(f"{where}: expected a string or a list of strings")
            out["stop"] = stops
        else:
            raise BadRequest(
                f"{where}: not supported through the pool: it has no OpenAI parameter, which "
                f"is what every worker speaks (supported: {', '.join(SUPPORTED_OPTIONS)}; "
                f"runner options such as num_ctx come from the model's registry entry)"
            )
    return out, tuple(ignored)


def _refuse(body: Mapping[str, Any], keys: Iterable[str], why: str) -> None:
    """400 for keys Ollama honours and the translation cannot (absent, empty or false is fine)."""
    for key in keys:
        if body.get(key) not in (None, "", [], False):
            raise BadRequest(f"{key}: {why}")


def _response_format(value: Any) -> dict[str, Any] | None:
    if value is None or value == "":
        return None
    if value == "json":
        return {"type": "json_object"}
    if isinstance(value, dict):
        return {"type": "json_schema", "json_schema": {"name": "response", "schema": value}}
    raise BadRequest(f'format: {value!r} is neither "json" nor a JSON schema object')


def _image_part(where: str, image: Any) -> dict[str, Any]:
    if not isinstance(image, str) or not image:
        raise BadRequest(f"{where}: expected base64 image data")
    if not re.fullmatch(BASE64_PATTERN, image):
        raise BadRequest(f"{where}: not base64 image data")
    kind = next((k for prefix, k in _IMAGE_TYPES if image.startswith(prefix)), "png")
    return {"type": "image_url", "image_url": {"url": f"data:image/{kind};base64,{image}"}}


def _with_images(where: str, text: str, images: Any) -> Any:
    """``text``, or with ``images`` the OpenAI content parts of both."""
    if images is not None and not isinstance(images, list):
        raise BadRequest(f"{where}images: expected a list of base64 images")
    if not images:
        return text
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    parts += [_image_part(f"{where}images[{i}]", image) for i, image in enumerate(images)]
    return parts


def _content(where: str, message: Mapping[str, Any]) -> Any:
    """A message's text, with its ``images`` as OpenAI image content parts."""
    text = _optional(message, "content", str, f"{where}.") or ""
    return _with_images(f"{where}.", text, message.get("images"))


def _openai_tool_call(where: str, call: Any, fallback_id: str) -> dict[str, Any]:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise BadRequest(f"{where}.function: expected an object with the tool's name")
    function = call["function"]
    name = function.get("name")
    if not isinstance(name, str):
        raise BadRequest(f"{where}.function.name: expected a string, got {name!r}")
    arguments = function.get("arguments")
    if arguments is not None and not isinstance(arguments, dict):
        raise BadRequest(f"{where}.function.arguments: expected an object, got {arguments!r}")
    ident = _optional(call, "id", str, f"{where}.") or fallback_id
    text = json.dumps(arguments or {})  # OpenAI's arguments are a JSON string
    return {"id": ident, "type": "function", "function": {"name": name, "arguments": text}}


def _messages(raw: Any) -> list[dict[str, Any]]:
    """Ollama chat messages as OpenAI's; a tool result finds its call by id or by tool name."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise BadRequest("messages: expected a list of messages")
    out: list[dict[str, Any]] = []
    unanswered: dict[str, list[str]] = {}  # tool name -> ids of calls without a result yet
    for i, message in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f"{where}: expected an object with a role")
        role = message["role"]
        translated: dict[str, Any] = {"role": role, "content": _content(where, message)}
        calls = _optional(message, "tool_calls", list, f"{where}.")
        if calls:
            translated["tool_calls"] = [
                _openai_tool_call(f"{where}.tool_calls[{j}]", call, f"call_{i}_{j}")
                for j, call in enumerate(calls)
            ]
            for call in translated["tool_calls"]:
                unanswered.setdefault(call["function"]["name"], []).append(call["id"])
        name = _optional(message, "tool_name", str, f"{where}.")
        ident = _optional(message, "tool_call_id", str, f"{where}.")
        if role == "tool":
            if not ident:
                waiting = unanswered.get(name) if name else None
                if waiting:
                    ident = waiting.pop(0)
                else:
                    ident = f"call_{name or i}"
                    if name:
                        translated["name"] = name  # no call to point at: say which tool it was
            translated["tool_call_id"] = ident
        out.append(translated)
    return out


def _tools(raw: Any) -> list[dict[str, Any]] | None:
    """Tools in OpenAI's shape, which is Ollama's with ``type`` required."""
    if raw is not None and not isinstance(raw, list):
        raise BadRequest("tools: expected a list of tool objects")
    if not raw:
        return None
    for i, tool in enumerate(raw):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict):
            raise BadRequest(f"{where}.function: expected an object")
        if tool.get("type") not in (None, "function"):
            raise BadRequest(f'{where}.type: {tool["type"]!r} is not "function"')
        function = tool["function"]
        if not isinstance(function.get("name"), str):
            raise BadRequest(f"{where}.function.name: expected a string")
        _optional(function, "description", str, f"{where}.function.")
        _optional(function, "parameters", dict, f"{where}.function.")
    return [{**tool, "type": "function"} for tool in raw]  # Ollama lets "type" default


def _sampled(
    body: Mapping[str, Any], out: dict[str, Any], stream: bool
) -> tuple[dict[str, Any], tuple[str, ...]]:
    _refuse(body, ("think", "logprobs", "top_logprobs"), "not translated by the front door")
    params, ignored = _options(body, sampling=True)
    out.update(params)
    fmt = _response_format(body.get("format"))
    if fmt is not None:
        out["response_format"] = fmt
    out["stream"] = stream
    if stream:
        out["stream_options"] = {"include_usage": True}  # the counts of the final line
    return out, ignored


def chat_plan(body: Mapping[str, Any]) -> Plan:
    """``POST /api/chat`` as ``/v1/chat/completions``; no messages: load the model only."""
    model, stream, keep = model_name(body), _stream(body), _keep_alive(body)
    messages = _messages(body.get("messages"))
    out: dict[str, Any] = {"messages": messages}
    tools = _tools(body.get("tools"))
    if tools is not None:
        out["tools"] = tools
    out, ignored = _sampled(body, out, stream)
    return Plan("chat", model, CHAT_PATH, out, stream, keep, not messages, ignored)


def generate_plan(body: Mapping[str, Any]) -> Plan:
    """``POST /api/generate``: the model's chat template applies as Ollama's would, so the
    prompt (and ``system``, ``images``) go to ``/v1/chat/completions`` as one user turn; ``raw``
    or ``suffix`` skip the template and go to ``/v1/completions`` as they are."""
    model, stream, keep = model_name(body), _stream(body), _keep_alive(body)
    _refuse(body, ("template", "context"), "not supported (the model's own template applies)")
    prompt = _optional(body, "prompt", str) or ""
    system, suffix = _optional(body, "system", str), _optional(body, "suffix", str)
    raw = _optional(body, "raw", bool)
    images = _optional(body, "images", list)
    turn = _with_images("", prompt, images)
    out: dict[str, Any]
    if raw or suffix:
        # No template: nowhere to put a system prompt, images or (in OpenAI's completions) a
        # response format.
        why = "not applied with raw or suffix (no template)"
        for key, value in (("system", system), ("images", images)):
            if value:
                raise BadRequest(f"{key}: {why}")
        if _response_format(body.get("format")) is not None:
            raise BadRequest(f"format: {why}")
        path, out = COMPLETIONS_PATH, {"prompt": prompt}
        if suffix:
            out["suffix"] = suffix
    else:
        system_turn = [{"role": "system", "content": system}] if system else []
        path, out = CHAT_PATH, {"messages": [*system_turn, {"role": "user", "content": turn}]}
    out, ignored = _sampled(body, out, stream)
    return Plan("generate", model, path, out, stream, keep, not prompt, ignored)


def embed_plan(body: Mapping[str, Any]) -> Plan:
    """``POST /api/embed`` as ``/v1/embeddings``; empty input: load the model only."""
    model, keep = model_name(body), _keep_alive(body)
    texts = body.get("input")
    if texts is None:
        texts = []
    if isinstance(texts, str):
        texts = [texts] if texts else []
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise BadRequest("input: expected a string or a list of strings")
    if _optional(body, "truncate", bool) is False:
        raise BadRequest("truncate: false is not supported (the backend's truncation applies)")
    out: dict[str, Any] = {"input": texts}
    dimensions = _optional(body, "dimensions", int)
    if dimensions is not None:
        if dimensions < 1:
            raise BadRequest(f"dimensions: {dimensions} is not a positive integer")
        out["dimensions"] = dimensions
    _, ignored = _options(body, sampling=False)
    return Plan("embed", model, EMBEDDINGS_PATH, out, False, keep, not texts, ignored)
