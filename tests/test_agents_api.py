"""What agents send, through every backend: tools, JSON output, images, embeddings, and the
parameters a backend cannot honour. The openai SDK is the client; the Ollama stand-in is the
backend (natively for ``ollama`` models, through its /v1 for ``openai`` models)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest
from openai import OpenAI

from model_service.demo_model import write_demo_model
from tests.ollama_standin import OllamaStandin
from tests.stack import Stack

ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}
ASK = [{"role": "user", "content": "What is 2 + 3? Use the tool."}]


@pytest.fixture(scope="module")
def gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_model(tmp_path_factory.mktemp("gguf") / "demo.gguf", seed=1)


@pytest.fixture(scope="module")
def stack(make_stack: Any, standin: OllamaStandin, gguf: Path) -> Stack:
    return make_stack(  # type: ignore[no-any-return]
        [
            {"model_id": "tiny:1b"},
            {"model_id": "relay", "backend": "openai", "upstream_url": standin.url,
             "upstream_model": "tiny:1b"},
            {"model_id": "demo-tools", "backend": "llamacpp", "model_path": str(gguf),
             "options": {"n_ctx": 1024, "chat_format": "chatml-function-calling"}},
            {"model_id": "demo-embed", "backend": "llamacpp", "model_path": str(gguf),
             "model_type": "embedding", "options": {"n_ctx": 512}},
        ]
    )  # fmt: skip


def clients(stack: Stack, model: str) -> list[OpenAI]:
    """A client on the front door and one on the model's own worker port."""
    port = stack.load(model)["port"]
    return [
        OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for url in (stack.url, f"http://127.0.0.1:{port}")
    ]


def round_trip(client: OpenAI, model: str, stream: bool) -> str:
    """Ask, get a tool call, send its result, get the answer; return the answer text."""
    if stream:
        calls: dict[int, dict[str, Any]] = {}
        finish = None
        with client.chat.completions.stream(model=model, messages=ASK, tools=[ADD]) as s:
            for event in s:
                if event.type == "chunk" and event.chunk.choices:
                    finish = event.chunk.choices[0].finish_reason or finish
            message = s.get_final_completion().choices[0].message
        assert finish == "tool_calls"
        tool_calls = message.tool_calls or []
        del calls
    else:
        first = client.chat.completions.create(model=model, messages=ASK, tools=[ADD])
        assert first.choices[0].finish_reason == "tool_calls"
        tool_calls = first.choices[0].message.tool_calls or []
    assert len(tool_calls) == 1
    call = tool_calls[0]
    assert call.type == "function" and call.function.name == "add" and call.id
    args = json.loads(call.function.arguments)
    assert set(args) == {"a", "b"}
    result = str(args["a"] + args["b"])
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": result},
    ]
    answer = client.chat.completions.create(model=model, messages=history, tools=[ADD])
    assert answer.choices[0].finish_reason == "stop"
    return answer.choices[0].message.content or ""


@pytest.mark.parametrize("model", ["tiny:1b", "relay"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_tool_round_trip(stack: Stack, model: str, stream: bool) -> None:
    """Regression: tools were dropped before they reached Ollama (plain text came back)."""
    for client in clients(stack, model):
        assert round_trip(client, model, stream) == "The tool said 5"


def test_tool_call_reaches_ollama_natively_both_ways(stack: Stack, standin: OllamaStandin) -> None:
    front = clients(stack, "tiny:1b")[0]
    before = len(standin.calls_to("/api/chat"))
    round_trip(front, "tiny:1b", stream=False)
    sent = [c.body for c in standin.calls_to("/api/chat")[before:]]
    assert sent[0]["tools"] == [ADD]
    # The tool call went back with its arguments as an object, the result named by function.
    assistant, tool = sent[1]["messages"][1:3]
    assert assistant["tool_calls"] == [{"function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]
    assert tool == {"role": "tool", "content": "5", "tool_name": "add"}


def test_llamacpp_calls_a_tool_through_its_grammar(stack: Stack) -> None:
    """A random-weight model still produces a well-formed call: the chat format's grammar."""
    choice = {"type": "function", "function": {"name": "add"}}
    for client in clients(stack, "demo-tools"):
        r = client.chat.completions.create(
            model="demo-tools", messages=ASK, tools=[ADD], tool_choice=choice, max_tokens=40
        )
        call = (r.choices[0].message.tool_calls or [])[0]
        assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "add"
        assert set(json.loads(call.function.arguments)) == {"a", "b"}
        with client.chat.completions.stream(
            model="demo-tools", messages=ASK, tools=[ADD], tool_choice=choice, max_tokens=40
        ) as s:
            final = s.get_final_completion()
        call = (final.choices[0].message.tool_calls or [])[0]
        assert call.function.name == "add" and set(json.loads(call.function.arguments)) == {
            "a",
            "b",
        }


def test_every_documented_parameter_reaches_ollama(stack: Stack, standin: OllamaStandin) -> None:
    """A parameter dropped on the way would be missing from what the stand-in received."""
    front = clients(stack, "tiny:1b")[0]
    before = len(standin.calls_to("/api/chat"))
    r = front.chat.completions.create(
        model="tiny:1b",
        messages=[{"role": "user", "content": "hi"}],
        temperature=0.2,
        top_p=0.9,
        seed=7,
        presence_penalty=0.1,
        frequency_penalty=0.3,
        max_completion_tokens=50,
        stop=["zebra"],
        response_format={"type": "json_object"},
        user="agent-7",
    )
    body = standin.calls_to("/api/chat")[before].body
    assert body["options"] == {
        "temperature": 0.2,
        "top_p": 0.9,
        "seed": 7,
        "presence_penalty": 0.1,
        "frequency_penalty": 0.3,
        "num_predict": 50,
        "stop": ["zebra"],
    }
    assert body["format"] == "json" and body["keep_alive"] == -1
    assert json.loads(r.choices[0].message.content or "")["reply"].startswith("The quick")
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    r = front.chat.completions.create(
        model="tiny:1b",
        messages=[{"role": "user", "content": "where?"}],
        response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": schema}},
    )
    assert standin.calls_to("/api/chat")[-1].body["format"] == schema
    assert json.loads(r.choices[0].message.content or "") == {"city": "x"}


def test_images_reach_ollama(stack: Stack, standin: OllamaStandin) -> None:
    front = clients(stack, "tiny:1b")[0]
    png = "iVBORw0KGgo="
    r = front.chat.completions.create(
        model="tiny:1b",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}},
                ],
            }
        ],
    )
    assert (r.choices[0].message.content or "").startswith("I see 1 image.")
    assert standin.calls_to("/api/chat")[-1].body["messages"][0]["images"] == [png]


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"n": 3}, "n: 3"),
        ({"logprobs": True}, "logprobs"),
        ({"tool_choice": "required", "tools": [ADD]}, "tool_choice"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"frobnicate": 1}, "frobnicate: unknown parameter"),
    ],
)
def test_a_parameter_the_backend_cannot_honour_is_a_400(
    stack: Stack, extra: dict[str, Any], named: str
) -> None:
    for client in clients(stack, "tiny:1b"):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(
                model="tiny:1b",
                messages=[{"role": "user", "content": "hi"}],
                extra_body=extra,
            )
        assert named in str(info.value)
    # Neutral values ask for nothing and pass.
    front = clients(stack, "tiny:1b")[0]
    r = front.chat.completions.create(
        model="tiny:1b", messages=[{"role": "user", "content": "hi"}], n=1, logprobs=False
    )
    assert r.choices[0].message.content


def test_tools_on_a_llamacpp_model_without_a_tool_format_is_a_400(stack: Stack) -> None:
    front = clients(stack, "demo-embed")[0]
    with pytest.raises(openai.BadRequestError, match="embedding model"):
        front.chat.completions.create(model="demo-embed", messages=ASK, tools=[ADD])


@pytest.mark.parametrize("model", ["tiny:1b", "relay", "demo-embed"])
def test_embeddings(stack: Stack, model: str) -> None:
    """Regression: /v1/embeddings answered 404 on the ollama and llamacpp backends."""
    for client in clients(stack, model):
        # The SDK asks for base64 by default and decodes it.
        r = client.embeddings.create(model=model, input=["hello world", "second text"])
        assert [d.index for d in r.data] == [0, 1]
        dims = {len(d.embedding) for d in r.data}
        assert len(dims) == 1 and dims.pop() > 1
        assert r.usage.prompt_tokens > 0
        one = client.embeddings.create(model=model, input="hello world", encoding_format="float")
        assert one.data[0].embedding == pytest.approx(r.data[0].embedding, rel=1e-5)
    if model == "tiny:1b":
        r = clients(stack, model)[0].embeddings.create(model=model, input="x", dimensions=4)
        assert len(r.data[0].embedding) == 4


def test_a_chat_model_does_not_embed(stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError, match="does not embed"):
        clients(stack, "demo-tools")[0].embeddings.create(model="demo-tools", input="x")


def test_usage_is_the_last_chunk_when_asked(stack: Stack) -> None:
    for client in clients(stack, "tiny:1b"):
        chunks = list(
            client.chat.completions.create(
                model="tiny:1b",
                messages=[{"role": "user", "content": "hi"}],
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens > 0


def test_a_list_of_prompts_gets_a_choice_each(stack: Stack) -> None:
    """OpenAI takes a list prompt; the ollama backend answers each in order (not streamed)."""
    for client in clients(stack, "tiny:1b"):
        r = client.completions.create(model="tiny:1b", prompt=["one", "two three"], max_tokens=3)
        assert [c.index for c in r.choices] == [0, 1]
        assert all(c.text == "The quick brown" for c in r.choices)
        assert r.usage is not None and r.usage.prompt_tokens == 3
        with pytest.raises(openai.BadRequestError, match="one prompt per request when streaming"):
            client.completions.create(model="tiny:1b", prompt=["a", "b"], stream=True)
