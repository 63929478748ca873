"""OpenAI answers as Ollama's: the way back of the front door's ``/api`` routes (pure).

``sse_data`` splits a worker's server-sent events into their payloads and ``ndjson_stream`` turns
those payloads into Ollama's NDJSON lines, decoding each event once and assembling tool-call
deltas into Ollama's complete ``tool_calls``; ``chat_answer`` and ``embed_answer`` translate
non-streamed answers. ``tags_entry``, ``ps_entry`` and ``show_answer`` describe registered
models the way Ollama describes its own. No I/O and no clock reads: times come in through
``Clock`` and ``Timing``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from controlplane.core.ollama_api import Plan

MIB: Final = 1024 * 1024
#: Ollama's ``done_reason`` for OpenAI's ``finish_reason`` (a tool call ends with "stop").
DONE_REASONS: Final = {"stop": "stop", "length": "length", "tool_calls": "stop"}
#: Ollama shows a model kept for ever with an expiry this far away (Go's largest duration).
FOREVER: Final = timedelta(days=292 * 365)


class BadAnswer(ValueError):
    """A worker's answer that has no Ollama translation (e.g. tool arguments not an object)."""


@dataclass(frozen=True)
class Clock:
    """The clocks an answer needs: wall seconds (``created_at``) and monotonic nanoseconds."""

    wall: Callable[[], float]
    mono_ns: Callable[[], int]


@dataclass
class Timing:
    """Monotonic nanoseconds of one request's milestones, for Ollama's durations."""

    started: int  # the request arrived (total_duration counts from here)
    loaded: int  # the model was ready for it (load_duration)
    sent: int  # the request went to the worker
    first: int | None = field(default=None)  # the first piece of the answer arrived


def iso(at: float) -> str:
    """RFC 3339 UTC, as Ollama writes times."""
    return datetime.fromtimestamp(at, UTC).isoformat().replace("+00:00", "Z")


# Bound once: every streamed event is decoded once and every line encoded once.
_encode = json.JSONEncoder(separators=(",", ":")).encode
_decode = json.JSONDecoder().decode


def _line(payload: Mapping[str, Any]) -> bytes:
    return _encode(payload).encode() + b"\n"


def error_line(message: str) -> bytes:
    """An error after the stream's status line went out, as Ollama reports one."""
    return _line({"error": message})


def _piece(plan: Plan, model: str, at: float, text: str, **message: Any) -> dict[str, Any]:
    head: dict[str, Any] = {"model": model, "created_at": iso(at)}
    if plan.kind == "chat":
        head["message"] = {"role": "assistant", "content": text, **message}
    else:
        head["response"] = text
    head["done"] = False
    return head


def _arguments(call: Mapping[str, Any]) -> dict[str, Any]:
    function = call.get("function") or {}
    raw = function.get("arguments")
    try:
        value = json.loads(raw) if isinstance(raw, str) and raw.strip() else (raw or {})
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise BadAnswer(
            f"the model called tool {function.get('name')!r} with arguments that are not a "
            f"JSON object: {raw!r}"
        )
    return value


def _ollama_tool_calls(calls: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI tool calls (arguments a JSON string) as Ollama's (arguments an object)."""
    out = []
    for index, call in enumerate(calls):
        function = call.get("function") or {}
        entry: dict[str, Any] = {
            "function": {
                "index": index,
                "name": function.get("name"),
                "arguments": _arguments(call),
            }
        }
        if call.get("id"):
            entry["id"] = call["id"]
        out.append(entry)
    return out


def _final(
    plan: Plan, model: str, usage: Any, reason: Any, timing: Timing, end: int, at: float
) -> dict[str, Any]:
    line = _piece(plan, model, at, "")
    line.update(done=True, done_reason=DONE_REASONS.get(reason, reason or "stop"))
    line.update(total_duration=end - timing.started, load_duration=timing.loaded - timing.started)
    if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
        line["prompt_eval_count"] = usage["prompt_tokens"]
    if timing.first is not None:
        line["prompt_eval_duration"] = timing.first - timing.sent
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        line["eval_count"] = usage["completion_tokens"]
    line["eval_duration"] = end - (timing.sent if timing.first is None else timing.first)
    return line


def sse_data(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The ``data`` payloads of server-sent events arriving in arbitrary chunks."""
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        start = 0
        while (end := buffer.find(b"\n\n", start)) >= 0:
            event, start = buffer[start:end], end + 2
            if event.startswith(b"data: ") and b"\n" not in event:  # the usual one-line event
                yield event[6:]
                continue
            data = [
                line[5:].removeprefix(b" ") for line in event.split(b"\n") if line[:5] == b"data:"
            ]
            if data:
                yield b"\n".join(data)
        buffer = buffer[start:]


def ndjson_stream(
    payloads: Iterable[bytes], plan: Plan, model: str, timing: Timing, clock: Clock
) -> Generator[bytes, None, None]:
    """A worker's OpenAI stream (SSE payloads) as Ollama's NDJSON lines.

    Text pieces go out as they arrive; tool-call deltas (an ``index``, then the id and name,
    then argument fragments) are assembled and sent as one line with complete calls before the
    final line, as Ollama sends them. The final line (``done: true``) carries the done reason,
    the token counts of the usage event and the durations. A stream that ends before its finish
    ends with an error line instead.
    """
    chat = plan.source == "chat"
    calls: dict[int, dict[str, Any]] = {}
    usage: Any = None
    reason: Any = None
    for data in payloads:
        if data == b"[DONE]":
            break
        try:
            event = _decode(data.decode())
        except ValueError:
            yield error_line(f"the worker sent an event that is not JSON: {data[:200]!r}")
            return
        if not isinstance(event, dict):
            continue
        if "error" in event:
            yield error_line(error_text(event))
            return
        if event.get("usage") is not None:
            usage = event["usage"]
        choices = event.get("choices")
        if not choices or not isinstance(choices[0], dict):
            continue
        choice = choices[0]
        if chat:
            delta = choice.get("delta") or {}
            text = delta.get("content")
            for part in delta.get("tool_calls") or ():
                if not isinstance(part, dict):
                    continue
                call = calls.setdefault(part.get("index", len(calls)), {"function": {}})
                if part.get("id"):
                    call["id"] = part["id"]
                function = part.get("function") or {}
                if function.get("name"):
                    call["function"]["name"] = function["name"]
                if function.get("arguments"):
                    so_far = call["function"].get("arguments", "")
                    call["function"]["arguments"] = so_far + function["arguments"]
        else:
            text = choice.get("text")
        if text:
            if timing.first is None:
                timing.first = clock.mono_ns()
            yield _line(_piece(plan, model, clock.wall(), text))
        if choice.get("finish_reason"):
            reason = choice["finish_reason"]
    else:
        if reason is None:
            yield error_line("the answer broke off before it was finished")
            return
    if calls:
        try:
            tool_calls = _ollama_tool_calls(calls[i] for i in sorted(calls))
        except BadAnswer as exc:
            yield error_line(str(exc))
            return
        if timing.first is None:
            timing.first = clock.mono_ns()
        yield _line(_piece(plan, model, clock.wall(), "", tool_calls=tool_calls))
    yield _line(_final(plan, model, usage, reason, timing, clock.mono_ns(), clock.wall()))


def chat_answer(
    data: Mapping[str, Any], plan: Plan, model: str, timing: Timing, clock: Clock
) -> dict[str, Any]:
    """A worker's non-streamed chat or text completion as Ollama's one answer object."""
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise BadAnswer("the worker's answer has no choices")
    choice = choices[0]
    extra: dict[str, Any] = {}
    if plan.source == "chat":
        message = choice.get("message") or {}
        text = message.get("content") or ""
        if message.get("tool_calls"):
            extra["tool_calls"] = _ollama_tool_calls(message["tool_calls"])
    else:
        text = choice.get("text") or ""
    end, at = clock.mono_ns(), clock.wall()
    answer = _final(plan, model, data.get("usage"), choice.get("finish_reason"), timing, end, at)
    if plan.kind == "chat":
        answer["message"] = {"role": "assistant", "content": text, **extra}
    else:
        answer["response"] = text
    return answer


def embed_answer(
    data: Mapping[str, Any], model: str, timing: Timing, clock: Clock
) -> dict[str, Any]:
    """A worker's ``/v1/embeddings`` answer as Ollama's ``/api/embed`` answer."""
    items = data.get("data")
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise BadAnswer("the worker's embeddings answer has no data list")
    ordered = sorted(items, key=lambda item: int(item.get("index") or 0))
    answer: dict[str, Any] = {
        "model": model,
        "embeddings": [item.get("embedding") for item in ordered],
        "total_duration": clock.mono_ns() - timing.started,
        "load_duration": timing.loaded - timing.started,
    }
    usage = data.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("prompt_tokens"), int):
        answer["prompt_eval_count"] = usage["prompt_tokens"]
    return answer


def load_answer(plan: Plan, model: str, at: float, unloaded: bool) -> dict[str, Any]:
    """The answer to a request without a prompt: the model was loaded (or unloaded)."""
    if plan.kind == "embed":
        return {"model": model, "embeddings": []}
    answer = _piece(plan, model, at, "")
    answer.update(done=True, done_reason="unload" if unloaded else "load")
    return answer


def error_text(answer: Any, fallback: str = "") -> str:
    """The message of an error answer in OpenAI's shape, Ollama's, or plain text."""
    error = answer.get("error") if isinstance(answer, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    if isinstance(error, str):
        return error
    return fallback or "the worker answered with an error"


# --- model listings ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFacts:
    """What the pool knows about a registered model, for Ollama's listings."""

    model_id: str
    backend: str
    model_type: str
    state: str
    memory_mb: float
    modified_at: float
    expires_at: float | None = None  # wall clock; None: never (loaded models only)
    ttl_minutes: float = 0.0
    tags: tuple[str, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)


def details(facts: ModelFacts) -> dict[str, Any]:
    """Ollama's ``details``, from what the model's name says (family, parameter size)."""
    last = facts.model_id.rsplit("/", 1)[-1].lower()
    base, _, tag = last.partition(":")
    family = re.match(r"[a-z]+\d*", base)
    size = re.match(r"(\d+(?:\.\d+)?)([bm])\b", tag)
    name = family.group(0) if family else ""
    return {
        "parent_model": "",
        "format": "" if facts.backend == "openai" else "gguf",
        "family": name,
        "families": [name] if name else None,
        "parameter_size": size.group(0).upper() if size else "",
        "quantization_level": "",
    }


def tags_entry(facts: ModelFacts) -> dict[str, Any]:
    """One model of ``GET /api/tags``: every registered model, loaded or not."""
    return {
        "name": facts.model_id,
        "model": facts.model_id,
        "modified_at": iso(facts.modified_at),
        "size": int(facts.memory_mb * MIB),
        "digest": hashlib.sha256(facts.model_id.encode()).hexdigest(),
        "details": details(facts),
    }


def ps_entry(facts: ModelFacts, now: float) -> dict[str, Any]:
    """One model of ``GET /api/ps``: its TTL deadline as ``expires_at``, its memory as sizes."""
    at = facts.expires_at
    expires = iso(at) if at is not None else iso(now + FOREVER.total_seconds())
    entry = tags_entry(facts)
    del entry["modified_at"]
    entry.update(expires_at=expires, size_vram=entry["size"])
    return entry


def show_answer(facts: ModelFacts) -> dict[str, Any]:
    """``POST /api/show``: details, the registry entry's options as ``parameters``, and
    capabilities (tools are passed to every backend; the entry's tags add vision and such)."""
    if facts.model_type == "embedding":
        capabilities = ["embedding"]
    else:
        capabilities = ["completion", "tools"]
        capabilities += [t for t in facts.tags if t in ("vision", "thinking", "insert")]
    parameters = "\n".join(f"{k} {json.dumps(v)}" for k, v in sorted(facts.options.items()))
    return {
        "license": "",
        "modelfile": f"# served by modelpool ({facts.backend} backend)\nFROM {facts.model_id}\n",
        "parameters": parameters,
        "template": "",
        "details": details(facts),
        "model_info": {
            "modelpool.backend": facts.backend,
            "modelpool.state": facts.state,
            "modelpool.ttl_minutes": facts.ttl_minutes,
        },
        "capabilities": capabilities,
        "modified_at": iso(facts.modified_at),
    }
