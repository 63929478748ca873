"""Ollama's API on the front door, end to end: the real ``ollama`` client against a real stack
(supervisord, gunicorn, workers) whose models run on the Ollama stand-in."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import ollama
import pytest
import requests

from tests.ollama_standin import DEFAULT_REPLY, OllamaStandin
from tests.stack import Stack, wait_until

MODELS: list[dict[str, Any]] = [
    {"model_id": "qwen2.5-coder:7b", "memory_mb": 4700, "options": {"num_ctx": 4096}},
    {"model_id": "tiny:1b"},
    {"model_id": "llama3.1:8b"},
    # Registered without a tag: Ollama clients call it "tiny:latest".
    {"model_id": "tiny", "upstream_model": "tiny:1b"},
    {"model_id": "vanish:1b"},  # the stand-in has it only while it loads
]
MSG = [{"role": "user", "content": "write a function"}]


@pytest.fixture(scope="module")
def stack(make_stack: Any, standin: OllamaStandin) -> Stack:
    # "relay": the openai backend on the stand-in's own /v1 (OpenAI's stream, tool-call deltas).
    relay = {"model_id": "relay", "backend": "openai", "upstream_url": standin.url}
    return make_stack([*MODELS, {**relay, "upstream_model": "tiny:1b"}])  # type: ignore[no-any-return]


@pytest.fixture
def client(stack: Stack) -> Iterator[ollama.Client]:
    with ollama.Client(host=stack.url, timeout=60) as c:
        yield c


@pytest.fixture
def slow_tokens(standin: OllamaStandin) -> Iterator[OllamaStandin]:
    standin.token_delay = 0.15  # the default reply then streams for about 2.5 s
    yield standin
    standin.token_delay = 0.0


def test_probes_and_version(stack: Stack) -> None:
    root = requests.get(stack.url + "/", timeout=10)
    assert root.status_code == 200 and root.text == "Ollama is running"
    assert requests.head(stack.url + "/", timeout=10).status_code == 200
    browser = requests.get(
        stack.url + "/", headers={"Accept": "text/html,*/*;q=0.8"}, allow_redirects=False
    )
    assert browser.status_code == 302 and browser.headers["Location"].endswith("/ui")
    version = requests.get(stack.url + "/api/version", timeout=10).json()
    assert isinstance(version["version"], str) and version["version"][0].isdigit()


def test_chat_loads_a_cold_model_streamed_and_not(
    stack: Stack, client: ollama.Client, standin: OllamaStandin
) -> None:
    assert stack.state("qwen2.5-coder:7b") == "COLD"
    answer = client.chat(model="qwen2.5-coder:7b", messages=MSG, stream=False)
    assert answer.message.role == "assistant" and answer.message.content == DEFAULT_REPLY
    assert answer.done and answer.done_reason == "stop"
    assert answer.eval_count == len(DEFAULT_REPLY.split()) and answer.prompt_eval_count == 3
    assert answer.load_duration and answer.total_duration and answer.total_duration > 0
    assert stack.state("qwen2.5-coder:7b") == "HOT"
    parts = list(client.chat(model="qwen2.5-coder:7b", messages=MSG, stream=True))
    assert len(parts) > 3 and all(not p.done for p in parts[:-1])
    assert "".join(p.message.content or "" for p in parts) == DEFAULT_REPLY
    final = parts[-1]
    assert final.done and final.done_reason == "stop" and final.eval_count == answer.eval_count
    assert final.eval_duration is not None and final.prompt_eval_duration is not None
    wait_until(lambda: stack.model("qwen2.5-coder:7b")["in_flight"] == 0, timeout=5)
    # The registry entry's options reach Ollama; the request went through the worker's /v1.
    sent = standin.calls_to("/api/chat")[-1].body
    assert sent["options"]["num_ctx"] == 4096 and sent["stream"] is True


def test_stream_is_ndjson_by_default_and_counted_until_relayed(
    stack: Stack, slow_tokens: OllamaStandin
) -> None:
    r = requests.post(
        stack.url + "/api/chat",
        json={"model": "tiny:1b", "messages": MSG},  # no "stream": Ollama streams
        stream=True,
        timeout=30,
    )
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/x-ndjson"
    lines = r.iter_lines()
    first = json.loads(next(line for line in lines if line))
    assert first["done"] is False and first["message"]["content"] == "The"
    assert stack.model("tiny:1b")["in_flight"] == 1
    r.close()  # the client goes away mid-stream
    wait_until(lambda: stack.model("tiny:1b")["in_flight"] == 0, timeout=5)
    wait_until(lambda: slow_tokens.in_flight == 0, timeout=5)


def test_generate_prompt_system_raw_and_options(
    stack: Stack, client: ollama.Client, standin: OllamaStandin
) -> None:
    out = client.generate(model="tiny:1b", prompt="hello there", system="be brief")
    assert out.response == DEFAULT_REPLY and out.done
    chat = standin.calls_to("/api/chat")[-1].body  # through the model's chat template
    assert [m["role"] for m in chat["messages"]] == ["system", "user"]
    assert chat["messages"][1]["content"] == "hello there"
    pieces = list(
        client.generate(
            model="tiny:1b", prompt="count", stream=True, options={"num_predict": 3, "seed": 1}
        )
    )
    assert "".join(p.response or "" for p in pieces) == " ".join(DEFAULT_REPLY.split()[:3])
    assert pieces[-1].done_reason == "length" and pieces[-1].eval_count == 3
    assert standin.calls_to("/api/chat")[-1].body["options"]["seed"] == 1
    raw = client.generate(model="tiny:1b", prompt="[INST] hi [/INST]", raw=True)
    assert raw.response == DEFAULT_REPLY
    assert standin.calls_to("/api/generate")[-1].body["prompt"] == "[INST] hi [/INST]"


def test_list_ps_and_show(stack: Stack, client: ollama.Client) -> None:
    client.chat(model="qwen2.5-coder:7b", messages=MSG)
    listed = {m.model: m for m in client.list().models}
    assert set(listed) == {m["model_id"] for m in MODELS} | {"relay"}
    assert listed["qwen2.5-coder:7b"].details is not None
    assert listed["qwen2.5-coder:7b"].details.parameter_size == "7B"
    loaded = {m.model: m for m in client.ps().models}
    assert "qwen2.5-coder:7b" in loaded and "llama3.1:8b" not in loaded
    entry = loaded["qwen2.5-coder:7b"]
    view = stack.model("qwen2.5-coder:7b")
    assert entry.expires_at is not None
    assert abs(entry.expires_at.timestamp() - view["deadline"]) < 1
    assert entry.size == entry.size_vram == 4_700_000_000  # as Ollama (the stand-in) reports it
    assert abs(entry.size / 1024 / 1024 - view["memory_mb"]) < 0.1
    shown = client.show("qwen2.5-coder:7b")
    assert shown.capabilities is not None and "completion" in shown.capabilities
    assert shown.parameters == "num_ctx 4096"
    legacy = requests.post(stack.url + "/api/show", json={"name": "tiny:latest"}, timeout=10)
    assert legacy.status_code == 200 and legacy.json()["model_info"]["modelpool.backend"]


def test_keep_alive_moves_the_pool_ttl_and_never_reaches_ollama(
    stack: Stack, client: ollama.Client, standin: OllamaStandin
) -> None:
    standin.clear_calls()
    client.chat(model="tiny:1b", messages=MSG)
    base = stack.model("tiny:1b")["ttl_remaining_minutes"]
    assert 4.5 < base <= 5.0  # the stack's default TTL: 5 minutes
    client.chat(model="tiny:1b", messages=MSG, keep_alive="30m")
    assert 34 < stack.model("tiny:1b")["ttl_remaining_minutes"] <= 35  # extended by 30
    client.generate(model="tiny:1b", prompt="hi", keep_alive=-1)
    assert 59 < stack.model("tiny:1b")["ttl_remaining_minutes"] <= 60  # the max TTL
    assert stack.state("tiny:1b") == "HOT"
    for call in standin.calls:  # the worker pins models itself; ours never went on
        if isinstance(call.body, dict):
            assert call.body.get("keep_alive") in (None, -1, 0), call


def test_keep_alive_zero_unloads_after_the_answer(stack: Stack, client: ollama.Client) -> None:
    answer = client.chat(model="llama3.1:8b", messages=MSG, keep_alive=0)
    assert answer.message.content == DEFAULT_REPLY  # answered first
    stack.wait_state("llama3.1:8b", "COLD", timeout=20)
    # A request without a prompt only loads (or with keep_alive 0, unloads), as Ollama's does.
    loaded = client.generate(model="llama3.1:8b")
    assert loaded.done_reason == "load" and stack.state("llama3.1:8b") == "HOT"
    unloaded = client.generate(model="llama3.1:8b", keep_alive=0)
    assert unloaded.done_reason == "unload"
    stack.wait_state("llama3.1:8b", "COLD", timeout=20)
    chat_load = client.chat(model="tiny", messages=[])
    assert chat_load.done_reason == "load" and stack.state("tiny") == "HOT"


def test_errors_in_ollamas_shape(stack: Stack, client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as missing:
        client.chat(model="nope:1b", messages=MSG)
    assert missing.value.status_code == 404 and "nope:1b" in missing.value.error
    with pytest.raises(ollama.ResponseError) as bad:
        client.chat(model="tiny:1b", messages=MSG, options={"mirostat": 2})
    assert bad.value.status_code == 400 and bad.value.error.startswith("options.mirostat:")
    r = requests.post(stack.url + "/api/generate", data=b"{not json", timeout=10)
    assert r.status_code == 400 and r.json()["error"].startswith("body:")
    r = requests.post(stack.url + "/api/show", json={"model": "nope"}, timeout=10)
    assert r.status_code == 404 and set(r.json()) == {"error"}
    odd_tool = {"type": "retrieval", "function": {"name": "f"}}
    r = requests.post(
        stack.url + "/api/chat",
        json={"model": "tiny:1b", "messages": MSG, "tools": [odd_tool]},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"].startswith("tools[0].type:"), r.text


def test_a_worker_error_is_relayed_in_ollamas_shape(stack: Stack, standin: OllamaStandin) -> None:
    standin.models["vanish:1b"] = 1_000_000
    try:
        stack.load("vanish:1b")
    finally:
        del standin.models["vanish:1b"]  # Ollama lost the model under the loaded worker
    # The worker answers 404 before any stream began (a stream was asked for, by default).
    r = requests.post(stack.url + "/api/chat", json={"model": "vanish:1b", "messages": MSG})
    assert r.status_code == 404 and list(r.json()) == ["error"], r.text
    assert "vanish:1b" in r.json()["error"]
    assert stack.model("vanish:1b")["in_flight"] == 0


def test_runner_options_are_ignored_and_said_so(stack: Stack, standin: OllamaStandin) -> None:
    r = requests.post(
        stack.url + "/api/chat",
        json={
            "model": "tiny:1b",
            "messages": MSG,
            "stream": False,
            "options": {"num_ctx": 32768, "temperature": 0.1},
        },
        timeout=30,
    )
    assert r.status_code == 200 and r.headers["X-Modelpool-Ignored-Options"] == "num_ctx"
    sent = standin.calls_to("/api/chat")[-1].body
    assert "num_ctx" not in sent["options"] and sent["options"]["temperature"] == 0.1


def test_no_capacity_is_a_503_with_retry_after(make_stack: Any, slow_tokens: OllamaStandin) -> None:
    s: Stack = make_stack(
        [{"model_id": "tiny:1b"}, {"model_id": "qwen2.5-coder:7b"}],
        {"max_concurrent_models": 1},
    )
    with ollama.Client(host=s.url, timeout=60) as c:
        stream = c.chat(model="tiny:1b", messages=MSG, stream=True)
        next(stream)  # tiny:1b is busy
        started = time.monotonic()
        r = requests.post(
            s.url + "/api/chat", json={"model": "qwen2.5-coder:7b", "messages": MSG}, timeout=60
        )
        stream.close()
    assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1, r.text
    assert set(r.json()) == {"error"} and "max_concurrent_models" in r.json()["error"]
    assert time.monotonic() - started < 30


def test_embed(stack: Stack, client: ollama.Client, standin: OllamaStandin) -> None:
    one = client.embed(model="tiny:1b", input="hello")
    assert len(one.embeddings) == 1 and len(one.embeddings[0]) > 0
    two = client.embed(model="tiny:1b", input=["hello", "world"], dimensions=4)
    assert [len(e) for e in two.embeddings] == [4, 4] and two.prompt_eval_count == 2
    assert (
        two.embeddings[0]
        == client.embed(model="tiny:1b", input="hello", dimensions=4).embeddings[0]
    )
    assert standin.calls_to("/api/embed")[-1].body.get("keep_alive") in (None, -1)


def test_embed_errors_keep_ollamas_shape(stack: Stack) -> None:
    r = requests.post(stack.url + "/api/embed", json={"model": "tiny:1b", "truncate": False})
    assert r.status_code == 400 and r.json() == {
        "error": "truncate: false is not supported (the backend's truncation applies)"
    }
    assert requests.post(stack.url + "/api/embed", json={"model": "tiny:1b"}).json() == {
        "model": "tiny:1b",
        "embeddings": [],
    }


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "the weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]


@pytest.mark.parametrize("model", ["tiny:1b", "relay"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_tool_round_trip(client: ollama.Client, model: str, stream: bool) -> None:
    """Call, tool result (named by tool, as Ollama clients send it), answer: on the ollama
    backend (native tool calls) and the openai one (the stand-in's /v1, OpenAI's deltas)."""

    def chat(messages: list[Any]) -> ollama.ChatResponse:
        if not stream:
            return client.chat(model=model, messages=messages, tools=TOOLS, stream=False)
        parts = list(client.chat(model=model, messages=messages, tools=TOOLS, stream=True))
        assert parts[-1].done and all(not p.done for p in parts[:-1])
        calls = [c for p in parts for c in p.message.tool_calls or ()]
        text = "".join(p.message.content or "" for p in parts)
        return ollama.ChatResponse(
            message=ollama.Message(role="assistant", content=text, tool_calls=calls or None),
            done=True,
            done_reason=parts[-1].done_reason,
        )

    asked: list[Any] = [{"role": "user", "content": "weather in Paris?"}]
    first = chat(asked)
    assert first.message.tool_calls is not None and first.done_reason == "stop"
    (call,) = first.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "x"}
    result = {"role": "tool", "tool_name": "get_weather", "content": "18 C and sunny"}
    second = chat([*asked, first.message, result])
    assert second.message.content == "The tool said 18 C and sunny"
    assert not second.message.tool_calls


def test_format_and_images(client: ollama.Client, standin: OllamaStandin) -> None:
    as_json = client.chat(model="tiny:1b", messages=MSG, format="json")
    assert json.loads(as_json.message.content or "") == {"reply": DEFAULT_REPLY}
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "s": {"type": "string"}}}
    shaped = client.generate(model="tiny:1b", prompt="give me n and s", format=schema)
    assert json.loads(shaped.response or "") == {"n": 2, "s": "x"}
    gif = "R0lGODlhAQABAIAAAP///wAAACH5BAEAAAAALAAAAAABAAEAAAICRAEAOw=="
    seen = client.chat(
        model="tiny:1b", messages=[{"role": "user", "content": "what is it?", "images": [gif]}]
    )
    assert (seen.message.content or "").startswith("I see 1 image.")
    assert standin.calls_to("/api/chat")[-1].body["messages"][0]["images"] == [gif]
