"""How the Ollama stand-in's "model" behaves: tool calls, JSON output, images, embeddings.

Pure functions, so the stand-in's HTTP code stays about the protocol. The behaviour is that of a
small, obedient model, and deterministic:

- offered ``tools`` and last spoken to by the user, it calls the first tool, with arguments
  made from the tool's JSON schema (numbers 2, 3, 4, ... in property order; strings "x");
- given a tool's result (last message from role ``tool``), it answers in text that quotes it;
- asked for JSON (``format: "json"`` or a schema), it answers a JSON object;
- shown images, it says how many it saw;
- asked to embed, it returns a unit vector derived from a hash of the text.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

EMBEDDING_DIMENSIONS = 8


def tool_call(tools: Any, messages: Any) -> tuple[str, dict[str, Any]] | None:
    """The (name, arguments) the model calls, or None if it answers in text."""
    if not isinstance(tools, list) or not tools or not isinstance(messages, list) or not messages:
        return None
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "user":
        return None
    function = tools[0].get("function") if isinstance(tools[0], dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        return None
    return function["name"], arguments_for(function.get("parameters"))


def arguments_for(schema: Any) -> dict[str, Any]:
    props = schema.get("properties") if isinstance(schema, dict) else None
    args: dict[str, Any] = {}
    for i, (name, prop) in enumerate((props or {}).items()):
        kind = prop.get("type") if isinstance(prop, dict) else None
        args[name] = i + 2 if kind in ("integer", "number") else "x"
    return args


def tool_result_reply(messages: Any) -> str | None:
    """The text answer to a tool's result, or None if the last message is not one."""
    if not isinstance(messages, list) or not messages:
        return None
    last = messages[-1]
    if isinstance(last, dict) and last.get("role") == "tool":
        return f"The tool said {last.get('content')}"
    return None


def images_seen(messages: Any) -> int:
    """Images in native messages (``images``) or OpenAI content parts (``image_url``)."""
    count = 0
    for m in messages if isinstance(messages, list) else []:
        if not isinstance(m, dict):
            continue
        count += len(m.get("images") or [])
        content = m.get("content")
        if isinstance(content, list):
            count += sum(1 for p in content if isinstance(p, dict) and p.get("type") == "image_url")
    return count


def json_reply(fmt: Any, text: str) -> str:
    """The answer as JSON: ``{"reply": text}``, or an object with the schema's properties."""
    if isinstance(fmt, dict):
        return json.dumps(arguments_for(fmt))
    return json.dumps({"reply": text})


def embedding(text: str, dimensions: int | None = None) -> list[float]:
    """A deterministic unit vector for ``text``."""
    n = dimensions or EMBEDDING_DIMENSIONS
    digest = b""
    counter = 0
    while len(digest) < n:
        digest += hashlib.sha256(f"{counter}:{text}".encode()).digest()
        counter += 1
    raw = [(b - 127.5) / 127.5 for b in digest[:n]]
    norm = math.sqrt(sum(v * v for v in raw)) or 1.0
    return [v / norm for v in raw]
