"""The pure translation between Ollama's API and OpenAI's (controlplane.core.ollama_*).

Answers are checked on recorded OpenAI event sequences, byte for byte as workers send them, and
every line is parsed with the ``ollama`` client's own response types.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import ollama
import pytest

from controlplane.core import ollama_answers as answers
from controlplane.core import ollama_api as api
from tests.test_core_purity import FORBIDDEN

# --- recorded worker streams (SSE, as /v1/chat/completions and /v1/completions send them) ---

#: A chat answer of the ollama backend's worker: role first, pieces, finish, usage, [DONE].
TEXT_STREAM = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"tiny:1b",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"tiny:1b",'
    b'"choices":[{"index":0,"delta":{"content":"The"},"finish_reason":null}]}\n\n'
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"tiny:1b",'
    b'"choices":[{"index":0,"delta":{"content":" quick"},"finish_reason":null}]}\n\n'
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"tiny:1b",'
    b'"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}\n\n'
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"tiny:1b",'
    b'"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n'
    b"data: [DONE]\n\n"
)

#: Two tool calls as OpenAI streams them: index, id and name first, then argument fragments
#: split anywhere (inside a key, inside a string), then finish_reason tool_calls and the usage.
TOOL_STREAM = (
    b'data: {"id":"c2","choices":[{"index":0,"delta":{"role":"assistant","content":null},'
    b'"finish_reason":null}]}\n\n'
    b'data: {"id":"c2","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_a",'
    b'"type":"function","function":{"name":"get_weather","arguments":""}}]},'
    b'"finish_reason":null}]}\n\n'
    b'data: {"id":"c2","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,'
    b'"function":{"arguments":"{\\"ci"}}]},"finish_reason":null}]}\n\n'
    b'data: {"id":"c2","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,'
    b'"function":{"arguments":"ty\\": \\"Par"}}]},"finish_reason":null}]}\n\n'
    b'data: {"id":"c2","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,'
    b'"function":{"arguments":"is\\"}"}}]},"finish_reason":null}]}\n\n'
    b'data: {"id":"c2","choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"id":"call_b",'
    b'"type":"function","function":{"name":"get_time","arguments":"{}"}}]},'
    b'"finish_reason":null}]}\n\n'
    b'data: {"id":"c2","choices":[{"index":0,"delta":{},"finish_reason":"tool_calls"}]}\n\n'
    b'data: {"id":"c2","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":9,'
    b'"total_tokens":21}}\n\n'
    b"data: [DONE]\n\n"
)

#: A text completion (/v1/completions), with usage on the finishing chunk itself.
COMPLETION_STREAM = (
    b'data: {"id":"cmpl-1","object":"text_completion","choices":[{"index":0,"text":"def",'
    b'"logprobs":null,"finish_reason":null}]}\n\n'
    b'data: {"id":"cmpl-1","object":"text_completion","choices":[{"index":0,"text":" f",'
    b'"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":2,'
    b'"completion_tokens":2,"total_tokens":4}}\n\n'
    b"data: [DONE]\n\n"
)

#: A worker whose backend failed after the stream began.
ERROR_STREAM = (
    b'data: {"choices":[{"index":0,"delta":{"content":"The"},"finish_reason":null}]}\n\n'
    b'data: {"error":{"message":"Ollama failed mid-answer: out of memory",'
    b'"type":"backend_error","code":"backend_error"}}\n\n'
    b"data: [DONE]\n\n"
)


class FakeClock:
    """Monotonic time moves 1 ms per reading; wall time stands still."""

    def __init__(self) -> None:
        self.ns = 10_000_000

    def mono(self) -> int:
        self.ns += 1_000_000
        return self.ns

    def clock(self) -> answers.Clock:
        return answers.Clock(wall=lambda: 1_700_000_000.0, mono_ns=self.mono)


def chunked(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def run(stream: bytes, plan: api.Plan, size: int = 10_000) -> list[dict[str, Any]]:
    timing = answers.Timing(started=1_000_000, loaded=4_000_000, sent=5_000_000)
    payloads = answers.sse_data(chunked(stream, size))
    lines = list(answers.ndjson_stream(payloads, plan, "tiny:1b", timing, FakeClock().clock()))
    assert all(line.endswith(b"\n") and line.count(b"\n") == 1 for line in lines)
    return [json.loads(line) for line in lines]


CHAT = api.chat_plan({"model": "tiny:1b", "messages": [{"role": "user", "content": "hi"}]})
GENERATE = api.generate_plan({"model": "tiny:1b", "prompt": "hi"})
RAW = api.generate_plan({"model": "tiny:1b", "prompt": "def", "raw": True})


# --- purity -----------------------------------------------------------------------------------


def test_the_translation_modules_are_pure() -> None:
    code = (
        "import sys\n"
        "import controlplane.core.ollama_api, controlplane.core.ollama_answers\n"
        f"print(','.join(m for m in {FORBIDDEN!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# --- keep_alive and names ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (300, 300.0),
        (0, 0.0),
        (-1, -1.0),
        (2.5, 2.5),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("30s", 30.0),
        ("1h30m", 5400.0),
        ("1.5h", 5400.0),
        ("300ms", 0.3),
        ("-1m", -60.0),
        ("-1", -1.0),
        ("0", 0.0),
        ("45", 45.0),
    ],
)
def test_keep_alive_durations(value: Any, seconds: float) -> None:
    assert api.parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    ["5 minutes", "forever", "", "m", "5x", " 5m", "5m ", "1e5", "--1", "5m-", "٣", True, [], {}],
)
def test_bad_keep_alive_names_the_key(value: Any) -> None:
    with pytest.raises(api.BadRequest, match=r"^keep_alive: "):
        api.chat_plan({"model": "m", "keep_alive": value})


def test_keep_alive_maps_onto_the_ttl() -> None:
    assert api.KeepAlive(300).extend_minutes(60) == 5
    assert api.KeepAlive(-1).extend_minutes(60) == 60  # for ever: the pool's max TTL
    assert api.KeepAlive(0).extend_minutes(60) is None and api.KeepAlive(0).unload
    assert not api.KeepAlive(1).unload
    assert api.chat_plan({"model": "m", "keep_alive": "10m"}).keep_alive == api.KeepAlive(600)
    assert api.chat_plan({"model": "m"}).keep_alive is None
    assert "keep_alive" not in api.chat_plan({"model": "m", "keep_alive": -1}).body


def test_model_names_resolve_like_ollamas() -> None:
    ids = ["tiny:1b", "llama3:latest", "library/llama3.1:8b", "plain", "library/x:latest"]
    assert api.resolve_model("tiny:1b", ids) == "tiny:1b"
    assert api.resolve_model("llama3", ids) == "llama3:latest"
    assert api.resolve_model("plain:latest", ids) == "plain"
    assert api.resolve_model("library/x", ids) == "library/x:latest"
    assert api.resolve_model("tiny", ids) is None  # no guessing beyond :latest
    assert api.resolve_model("llama3.1:8b", ids) is None
    assert api.model_name({"name": "x"}, legacy_name=True) == "x"
    assert api.model_name({"model": "y", "name": "x"}, legacy_name=True) == "y"
    with pytest.raises(api.BadRequest, match=r"^model: "):  # model given wins, even if wrong
        api.model_name({"model": "", "name": "x"}, legacy_name=True)
    with pytest.raises(api.BadRequest, match=r"^model: missing"):
        api.model_name({"name": "x"})


# --- requests ---------------------------------------------------------------------------------


def test_chat_request_becomes_openai_with_usage_asked_for() -> None:
    plan = api.chat_plan(
        {
            "model": "tiny:1b",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "hi"},
            ],
            "options": {
                "temperature": 0.2,
                "top_p": 0.9,
                "seed": 7,
                "stop": ["\n"],
                "num_predict": 16,
                "presence_penalty": 0.1,
                "frequency_penalty": 0.3,
                "num_ctx": 8192,
                "num_gpu": None,
            },
            "format": "json",
        }
    )
    assert plan.path == "/v1/chat/completions" and plan.stream and not plan.load_only
    assert plan.body == {
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        "temperature": 0.2,
        "top_p": 0.9,
        "seed": 7,
        "stop": ["\n"],
        "max_tokens": 16,
        "presence_penalty": 0.1,
        "frequency_penalty": 0.3,
        "response_format": {"type": "json_object"},
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert plan.ignored == ("num_ctx",)  # a runner option: the registry entry's to decide
    quiet = api.chat_plan({"model": "m", "messages": [], "stream": False})
    assert quiet.load_only and quiet.body == {"messages": [], "stream": False}


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ({"stream": "yes"}, "stream"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"content": "no role"}]}, "messages[0]"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "images": "abc"}]}, "messages[0].images"),
        ({"messages": [{"role": "user", "images": ["not base64!"]}]}, "messages[0].images[0]"),
        ({"options": {"mirostat": 2}}, "options.mirostat"),
        ({"options": {"top_k": 40}}, "options.top_k"),
        ({"options": {"temperature": "hot"}}, "options.temperature"),
        ({"options": {"seed": 1.5}}, "options.seed"),
        ({"options": {"num_predict": 1.5}}, "options.num_predict"),
        ({"model": ""}, "model"),
        ({"model": 7}, "model"),
        ({"messages": [{"role": "tool", "tool_name": 1}]}, "messages[0].tool_name"),
        ({"messages": [{"role": "tool", "tool_call_id": 1}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "user", "tool_calls": {}}]}, "messages[0].tool_calls"),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": 1}}]}]},
            "messages[0].tool_calls[0].function.name",
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [{"function": {"name": "f", "arguments": 5}}],
                    }
                ]
            },
            "messages[0].tool_calls[0].function.arguments",
        ),
        (
            {
                "messages": [
                    {"role": "assistant", "tool_calls": [{"id": 5, "function": {"name": "f"}}]}
                ]
            },
            "messages[0].tool_calls[0].id",
        ),
        ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools[0].type"),
        ({"tools": [{"function": {"description": "no name"}}]}, "tools[0].function.name"),
        (
            {"tools": [{"function": {"name": "f", "parameters": []}}]},
            "tools[0].function.parameters",
        ),
        ({"tools": {"function": {}}}, "tools"),
        ({"options": {"stop": [1]}}, "options.stop"),
        ({"options": []}, "options"),
        ({"format": "xml"}, "format"),
        ({"tools": [{"type": "function"}]}, "tools[0].function"),
        ({"think": True}, "think"),
        ({"logprobs": True}, "logprobs"),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{"function": {}}]}]},
            "messages[0].tool_calls[0].function.name",
        ),
        (
            {"messages": [{"role": "assistant", "tool_calls": [7]}]},
            "messages[0].tool_calls[0].function",
        ),
    ],
)
def test_bad_chat_requests_name_the_key(body: dict[str, Any], key: str) -> None:
    with pytest.raises(api.BadRequest) as caught:
        api.chat_plan({"model": "m", **body})
    assert str(caught.value).startswith(f"{key}: ")


def test_format_schema_and_no_limit() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    plan = api.chat_plan({"model": "m", "format": schema, "options": {"num_predict": -1}})
    assert plan.body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "response", "schema": schema},
    }
    assert "max_tokens" not in plan.body
    assert "response_format" not in api.chat_plan({"model": "m", "format": ""}).body
    for no_limit in (0, -1, -2):  # as Ollama's runner takes them
        assert (
            "max_tokens"
            not in api.chat_plan({"model": "m", "options": {"num_predict": no_limit}}).body
        )


def test_images_become_data_url_parts() -> None:
    png = base64.b64encode(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR").decode()
    jpeg = base64.b64encode(b"\xff\xd8\xff\xe0\x00\x10JFIF").decode()
    plan = api.chat_plan(
        {"model": "m", "messages": [{"role": "user", "content": "what?", "images": [png, jpeg]}]}
    )
    assert plan.body["messages"][0]["content"] == [
        {"type": "text", "text": "what?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
        {"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{jpeg}"}},
    ]


def test_tools_and_tool_results_round_trip_into_openai() -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    untyped = {"function": {"name": "get_time", "parameters": {"type": "object"}}}
    plan = api.chat_plan(
        {
            "model": "m",
            "tools": [tool, untyped],
            "messages": [
                {"role": "user", "content": "weather and time in Paris?"},
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                        {"id": "t-9", "function": {"name": "get_time", "arguments": {}}},
                    ],
                },
                # Ollama's tool results name the tool; newer clients also give the call's id.
                {"role": "tool", "tool_name": "get_weather", "content": "18 C"},
                {"role": "tool", "tool_call_id": "t-9", "content": "noon"},
                {"role": "tool", "tool_name": "get_moon", "content": "full"},
            ],
        }
    )
    assert plan.body["tools"] == [tool, {"type": "function", **untyped}]
    messages = plan.body["messages"]
    assert messages[1]["tool_calls"] == [
        {
            "id": "call_1_0",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        },
        {"id": "t-9", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]
    assert messages[2] == {"role": "tool", "content": "18 C", "tool_call_id": "call_1_0"}
    assert messages[3] == {"role": "tool", "content": "noon", "tool_call_id": "t-9"}
    # A result for a call that is not in the conversation still says which tool it was.
    assert messages[4]["name"] == "get_moon" and messages[4]["tool_call_id"] == "call_get_moon"


def test_generate_goes_through_the_chat_template_unless_raw_or_suffix() -> None:
    plan = api.generate_plan(
        {
            "model": "m",
            "prompt": "hi",
            "system": "be brief",
            "stream": False,
            "images": ["R0lGODlh"],
        }
    )
    assert plan.path == "/v1/chat/completions" and plan.kind == "generate"
    assert plan.body["messages"] == [
        {"role": "system", "content": "be brief"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "hi"},
                {"type": "image_url", "image_url": {"url": "data:image/gif;base64,R0lGODlh"}},
            ],
        },
    ]
    raw = api.generate_plan({"model": "m", "prompt": "[INST]hi[/INST]", "raw": True})
    assert raw.path == "/v1/completions" and raw.body["prompt"] == "[INST]hi[/INST]"
    fim = api.generate_plan({"model": "m", "prompt": "def f(", "suffix": "    return x"})
    assert fim.path == "/v1/completions" and fim.body["suffix"] == "    return x"
    assert api.generate_plan({"model": "m"}).load_only
    assert api.generate_plan({"model": "m", "prompt": "", "keep_alive": 0}).keep_alive == (
        api.KeepAlive(0)
    )


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ({"prompt": "x", "raw": True, "system": "s"}, "system"),
        ({"prompt": "x", "suffix": "y", "images": ["R0lGODlh"]}, "images"),
        ({"prompt": "x", "template": "{{ .Prompt }}"}, "template"),
        ({"prompt": "x", "raw": True, "format": "json"}, "format"),
        ({"prompt": "x", "context": [1, 2, 3]}, "context"),
        ({"prompt": ["x"]}, "prompt"),
        ({"prompt": "x", "raw": "yes"}, "raw"),
        ({"prompt": "x", "system": 1}, "system"),
    ],
)
def test_bad_generate_requests_name_the_key(body: dict[str, Any], key: str) -> None:
    with pytest.raises(api.BadRequest, match=rf"^{key}: "):
        api.generate_plan({"model": "m", **body})


def test_embed_requests() -> None:
    plan = api.embed_plan({"model": "m", "input": "hello", "dimensions": 8, "truncate": True})
    assert plan.path == "/v1/embeddings" and not plan.stream
    assert plan.body == {"input": ["hello"], "dimensions": 8}
    listed = api.embed_plan({"model": "m", "input": ["a", "b"], "options": {"num_ctx": 512}})
    assert listed.body == {"input": ["a", "b"]} and listed.ignored == ("num_ctx",)
    assert api.embed_plan({"model": "m", "input": []}).load_only
    with pytest.raises(api.BadRequest, match=r"^truncate: "):
        api.embed_plan({"model": "m", "input": "x", "truncate": False})
    for body, key in [
        ({"input": [1]}, "input"),
        ({"truncate": "yes"}, "truncate"),
        ({"dimensions": 0}, "dimensions"),
        ({"dimensions": 2.5}, "dimensions"),
        ({"options": "x"}, "options"),
    ]:
        with pytest.raises(api.BadRequest, match=rf"^{key}: "):
            api.embed_plan({"model": "m", **body})


# --- streamed answers -------------------------------------------------------------------------


def test_sse_framing_survives_any_chunking() -> None:
    stream = (
        b': comment\n\ndata: {"a":1}\r\n\r\nevent: x\ndata: {"b":\ndata: 2}\n\ndata: [DONE]\n\n'
    )
    expected = [b'{"a":1}', b'{"b":\n2}', b"[DONE]"]
    for size in (1, 2, 3, 7, 1000):
        assert list(answers.sse_data(chunked(stream, size))) == expected


@pytest.mark.parametrize("size", [1, 5, 64, 10_000])
def test_text_stream_becomes_ndjson(size: int) -> None:
    lines = run(TEXT_STREAM, CHAT, size)
    assert [line["message"]["content"] for line in lines] == ["The", " quick", ""]
    assert all(not line["done"] for line in lines[:-1])
    final = lines[-1]
    assert final["done"] is True and final["done_reason"] == "length"
    assert final["prompt_eval_count"] == 3 and final["eval_count"] == 2
    # Timing: arrived at 1 ms, loaded at 4 ms, sent at 5 ms; the clock reads 11, 12, 13 ms.
    assert final["load_duration"] == 3_000_000
    assert final["prompt_eval_duration"] == 6_000_000  # first piece at 11 ms
    assert final["eval_duration"] == 1_000_000 and final["total_duration"] == 11_000_000
    assert final["created_at"] == "2023-11-14T22:13:20Z"
    for line in lines:
        ollama.ChatResponse(**line)


@pytest.mark.parametrize("size", [1, 13, 10_000])
def test_tool_call_deltas_are_assembled(size: int) -> None:
    lines = run(TOOL_STREAM, CHAT, size)
    assert len(lines) == 2
    calls = lines[0]["message"]["tool_calls"]
    assert calls == [
        {
            "function": {"index": 0, "name": "get_weather", "arguments": {"city": "Paris"}},
            "id": "call_a",
        },
        {"function": {"index": 1, "name": "get_time", "arguments": {}}, "id": "call_b"},
    ]
    assert lines[0]["done"] is False
    assert lines[1]["done_reason"] == "stop" and lines[1]["eval_count"] == 9
    parsed = ollama.ChatResponse(**lines[0])
    assert parsed.message.tool_calls is not None
    assert parsed.message.tool_calls[0].function.arguments == {"city": "Paris"}


def test_tool_arguments_that_are_not_an_object_end_in_an_error_line() -> None:
    bad = TOOL_STREAM.replace(b'is\\"}', b"is")
    lines = run(bad, CHAT)
    assert list(lines[-1]) == ["error"] and "get_weather" in lines[-1]["error"]


def test_generate_streams_answer_with_response() -> None:
    lines = run(TEXT_STREAM, GENERATE)
    assert [line["response"] for line in lines] == ["The", " quick", ""]
    assert "message" not in lines[-1] and lines[-1]["done"]
    for line in lines:
        ollama.GenerateResponse(**line)
    raw = run(COMPLETION_STREAM, RAW)
    assert [line["response"] for line in raw] == ["def", " f", ""]
    assert raw[-1]["done_reason"] == "stop" and raw[-1]["eval_count"] == 2


def test_an_error_event_ends_the_stream_with_ollamas_error_line() -> None:
    lines = run(ERROR_STREAM, CHAT)
    assert lines[0]["message"]["content"] == "The"
    assert lines[-1] == {"error": "Ollama failed mid-answer: out of memory"}


def test_a_stream_that_breaks_off_ends_with_an_error_line() -> None:
    cut = TEXT_STREAM[: TEXT_STREAM.index(b'"delta":{},"finish_reason":"length"') - 120]
    lines = run(cut, CHAT)
    assert "error" in lines[-1] and not any(line.get("done") for line in lines)
    # Finished but without [DONE] (or the usage): still a complete answer.
    lines = run(TEXT_STREAM.replace(b"data: [DONE]\n\n", b""), CHAT)
    assert lines[-1]["done"] is True
    assert "error" in run(b"data: {not json}\n\n", CHAT)[-1]


# --- answers in one piece ---------------------------------------------------------------------


def test_non_streamed_chat_with_tool_calls() -> None:
    data = {
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_x",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                        }
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
    }
    timing = answers.Timing(started=0, loaded=2_000_000, sent=3_000_000)
    answer = answers.chat_answer(data, CHAT, "tiny:1b", timing, FakeClock().clock())
    assert answer["message"] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "function": {"index": 0, "name": "get_weather", "arguments": {"city": "Oslo"}},
                "id": "call_x",
            }
        ],
    }
    assert answer["done"] and answer["done_reason"] == "stop"
    assert answer["prompt_eval_count"] == 5 and answer["eval_count"] == 7
    assert answer["load_duration"] == 2_000_000 and answer["eval_duration"] == 8_000_000
    ollama.ChatResponse(**answer)
    text = {"choices": [{"index": 0, "text": "x = 1", "finish_reason": "length"}]}
    generated = answers.chat_answer(text, RAW, "tiny:1b", timing, FakeClock().clock())
    assert generated["response"] == "x = 1" and generated["done_reason"] == "length"
    ollama.GenerateResponse(**generated)
    with pytest.raises(answers.BadAnswer):
        answers.chat_answer({"choices": []}, CHAT, "m", timing, FakeClock().clock())


def test_embeddings_and_errors() -> None:
    data = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": 1, "embedding": [0.3, 0.4]},
            {"object": "embedding", "index": 0, "embedding": [0.1, 0.2]},
        ],
        "usage": {"prompt_tokens": 4, "total_tokens": 4},
    }
    timing = answers.Timing(started=0, loaded=1_000_000, sent=1_000_000)
    answer = answers.embed_answer(data, "e:1b", timing, FakeClock().clock())
    assert answer["embeddings"] == [[0.1, 0.2], [0.3, 0.4]] and answer["prompt_eval_count"] == 4
    ollama.EmbedResponse(**answer)
    assert answers.error_text({"error": {"message": "m", "type": "t"}}) == "m"
    assert answers.error_text({"error": "plain"}) == "plain"
    assert answers.error_text(None, "fallback") == "fallback"
    loaded = answers.load_answer(CHAT, "m", 0.0, unloaded=False)
    assert loaded["done_reason"] == "load" and loaded["message"]["content"] == ""
    assert answers.load_answer(GENERATE, "m", 0.0, unloaded=True)["done_reason"] == "unload"
    embed = api.embed_plan({"model": "m"})
    assert answers.load_answer(embed, "m", 0.0, unloaded=False) == {"model": "m", "embeddings": []}


# --- listings ---------------------------------------------------------------------------------


def facts(**kw: Any) -> answers.ModelFacts:
    base: dict[str, Any] = {
        "model_id": "library/qwen2.5-coder:7b",
        "backend": "ollama",
        "model_type": "code",
        "state": "HOT",
        "memory_mb": 4500.0,
        "modified_at": 1_700_000_000.0,
        "expires_at": 1_700_000_600.0,
        "ttl_minutes": 15.0,
        "tags": ("vision",),
        "options": {"num_ctx": 8192},
    }
    return answers.ModelFacts(**{**base, **kw})


def test_tags_ps_and_show_in_ollamas_shapes() -> None:
    entry = answers.tags_entry(facts())
    assert entry["name"] == entry["model"] == "library/qwen2.5-coder:7b"
    assert entry["size"] == 4500 * 1024 * 1024
    assert entry["details"]["family"] == "qwen2" and entry["details"]["parameter_size"] == "7B"
    ollama.ListResponse(models=[entry])
    ps = answers.ps_entry(facts(), now=1_700_000_000.0)
    assert ps["expires_at"] == "2023-11-14T22:23:20Z" and ps["size_vram"] == ps["size"]
    forever = answers.ps_entry(facts(expires_at=None), now=1_700_000_000.0)
    assert forever["expires_at"].startswith("2315-")
    ollama.ProcessResponse(models=[ps, forever])
    shown = answers.show_answer(facts())
    assert shown["capabilities"] == ["completion", "tools", "vision"]
    assert shown["parameters"] == "num_ctx 8192"
    assert shown["model_info"]["modelpool.backend"] == "ollama"
    ollama.ShowResponse(**shown)
    assert answers.show_answer(facts(model_type="embedding"))["capabilities"] == ["embedding"]
