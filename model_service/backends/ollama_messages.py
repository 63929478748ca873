"""OpenAI chat requests and answers as Ollama's native API takes and gives them: messages
(images, tool calls, tool results), tools, response formats, and tool calls streamed back as
OpenAI's deltas. Pure functions: the HTTP side is ``model_service.backends.ollama``."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

from model_service.backends import sse_event
from model_service.backends.base import BackendError


def invalid(message: str) -> BackendError:
    return BackendError(message, status=400, type="invalid_request_error", code="invalid_request")


def native_tool_calls(calls: Any, where: str) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """An assistant message's OpenAI ``tool_calls`` as Ollama's (arguments as an object), and
    the function name of each call id (Ollama names a tool result by its function)."""
    if not isinstance(calls, list):
        raise invalid(f"{where}: must be a list of tool calls")
    out: list[dict[str, Any]] = []
    names: dict[str, str] = {}
    for k, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise invalid(f"{where}[{k}].function: must be an object with a name")
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError:
                raise invalid(f"{where}[{k}].function.arguments: not valid JSON") from None
        if not isinstance(args, dict):
            raise invalid(f"{where}[{k}].function.arguments: must be a JSON object")
        out.append({"function": {"name": fn["name"], "arguments": args}})
        if isinstance(call.get("id"), str):
            names[call["id"]] = fn["name"]
    return out, names


def chat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """OpenAI chat messages as Ollama takes them: text content, images as base64, tool calls
    with arguments as objects, tool results named by their function."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages: must be a non-empty list of message objects")
    out: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid(f"messages[{i}]: must be an object, got {type(message).__name__}")
        content = message.get("content")
        translated: dict[str, Any] = {"role": message.get("role"), "content": ""}
        if message.get("tool_calls") is not None:
            calls, names = native_tool_calls(message["tool_calls"], f"messages[{i}].tool_calls")
            translated["tool_calls"] = calls
            call_names.update(names)
        if message.get("role") == "tool":
            call_id = message.get("tool_call_id")
            name = message.get("name") or call_names.get(
                call_id if isinstance(call_id, str) else ""
            )
            if isinstance(name, str):
                translated["tool_name"] = name
        if isinstance(content, str):
            translated["content"] = content
        elif isinstance(content, list):
            texts: list[str] = []
            images: list[str] = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    texts.append(str(part.get("text") or ""))
                elif kind == "image_url":
                    image = part.get("image_url")
                    url = image.get("url") if isinstance(image, dict) else image
                    if not isinstance(url, str) or not url.startswith("data:") or "," not in url:
                        raise invalid(
                            f"messages[{i}].content[{j}]: Ollama takes images as data: URLs only"
                        )
                    images.append(url.split(",", 1)[1])
                else:
                    raise invalid(f"messages[{i}].content[{j}]: unsupported part type {kind!r}")
            translated["content"] = "\n".join(texts)
            if images:
                translated["images"] = images
        elif content is not None:
            raise invalid(f"messages[{i}].content: must be a string or a list of parts")
        out.append(translated)
    return out


def openai_tool_calls(calls: Any) -> list[dict[str, Any]]:
    """Ollama's ``message.tool_calls`` in the OpenAI shape (arguments as a JSON string)."""
    out: list[dict[str, Any]] = []
    for call in calls if isinstance(calls, list) else []:
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            continue
        args = fn.get("arguments")
        out.append(
            {
                "id": call.get("id") or "call_" + uuid.uuid4().hex[:24],
                "type": "function",
                "function": {
                    "name": str(fn.get("name") or ""),
                    "arguments": args if isinstance(args, str) else json.dumps(args or {}),
                },
            }
        )
    return out


def offered_tools(body: dict[str, Any]) -> list[Any] | None:
    """The tools to offer Ollama: none for ``tool_choice: "none"``; Ollama cannot be made to
    call one (``required``, a named function), so those are a 400 rather than a hope."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(
        isinstance(t, dict) and t.get("type") == "function" for t in tools
    ):
        raise invalid("tools: must be a list of {type: function, function: {...}} objects")
    if choice == "none":
        return None
    if choice not in (None, "auto"):
        raise invalid(
            f"tool_choice: {choice!r} is not supported by the ollama backend (Ollama cannot be "
            'made to call a tool; use "auto" or "none")'
        )
    return tools


def response_format(body: dict[str, Any]) -> Any:
    """OpenAI ``response_format`` as Ollama's ``format`` ("json" or a JSON schema), or None."""
    spec = body.get("response_format")
    if not isinstance(spec, dict):
        return None
    if spec.get("type") == "json_object":
        return "json"
    if spec.get("type") == "json_schema":
        schema = spec.get("json_schema")
        return schema.get("schema") if isinstance(schema, dict) else None
    return None


def tool_call_deltas(head: dict[str, Any], index: int, call: dict[str, Any]) -> Iterator[bytes]:
    """One tool call as OpenAI streams it: its id and name, then its arguments."""

    def event(delta: dict[str, Any]) -> bytes:
        choice = {"index": 0, "delta": {"tool_calls": [delta]}, "finish_reason": None}
        return sse_event({**head, "choices": [choice]})

    fn = call["function"]
    yield event(
        {
            "index": index,
            "id": call["id"],
            "type": "function",
            "function": {"name": fn["name"], "arguments": ""},
        }
    )
    yield event({"index": index, "function": {"arguments": fn["arguments"]}})
