"""The OpenAI front door on the control plane: routing, loading on demand, streaming, in flight."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import requests

from tests.ollama_standin import OllamaStandin
from tests.stack import Stack, wait_until

MODELS: list[dict[str, Any]] = [
    {"model_id": "qwen2.5-coder:7b"},
    {"model_id": "llama3.1:8b", "ttl_minutes": 0.02},  # 1.2 s TTL
    {"model_id": "tiny:1b"},
    {"model_id": "crowd", "upstream_model": "tiny:1b"},
]


@pytest.fixture(scope="module")
def stack(make_stack: Any) -> Stack:
    return make_stack(MODELS, {"grace_period_minutes": 0.01})  # type: ignore[no-any-return]


@pytest.fixture
def slow_tokens(standin: OllamaStandin) -> Iterator[OllamaStandin]:
    reply = standin.reply
    standin.token_delay = 0.15
    standin.reply = " ".join(f"word{i}" for i in range(40))
    yield standin
    standin.token_delay = 0.0
    standin.reply = reply


def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0)


MSG = [{"role": "user", "content": "write a function"}]


def test_openai_client_chats_with_a_cold_model_streams_and_lists(stack: Stack) -> None:
    assert stack.state("qwen2.5-coder:7b") == "COLD"
    c = client(stack)
    answer = c.chat.completions.create(model="qwen2.5-coder:7b", messages=MSG)  # type: ignore[arg-type]
    assert answer.choices[0].message.content
    assert answer.usage is not None and answer.usage.completion_tokens > 0
    assert stack.state("qwen2.5-coder:7b") == "HOT"
    pieces = [
        ch.choices[0].delta.content or ""
        for ch in c.chat.completions.create(model="qwen2.5-coder:7b", messages=MSG, stream=True)  # type: ignore[arg-type]
        if ch.choices
    ]
    assert len(pieces) > 3 and "".join(pieces) == answer.choices[0].message.content
    text = c.completions.create(model="qwen2.5-coder:7b", prompt="def f(", max_tokens=2)
    assert text.choices[0].text
    listed = {m.id: m for m in c.models.list()}
    assert set(listed) == {m["model_id"] for m in MODELS}
    assert listed["qwen2.5-coder:7b"].model_extra is not None
    assert listed["qwen2.5-coder:7b"].model_extra["state"] == "HOT"


def test_requests_library_as_the_seed_does(stack: Stack) -> None:
    r = requests.post(
        stack.url + "/v1/chat/completions",
        json={"model": "qwen2.5-coder:7b", "messages": MSG, "temperature": 0.7, "max_tokens": 5},
        timeout=30,
    )
    assert r.status_code == 200
    assert r.json()["usage"]["completion_tokens"] == 5


def test_stream_chunks_arrive_as_produced(stack: Stack, slow_tokens: OllamaStandin) -> None:
    stack.load("qwen2.5-coder:7b")
    started = time.monotonic()
    r = requests.post(
        stack.url + "/v1/chat/completions",
        json={"model": "qwen2.5-coder:7b", "messages": MSG, "stream": True, "max_tokens": 10},
        stream=True,
        timeout=30,
    )
    lines = r.iter_lines()
    first = next(line for line in lines if line)
    first_at = time.monotonic() - started
    rest = [line for line in lines if line]
    total = time.monotonic() - started
    assert first.startswith(b"data: ") and rest[-1] == b"data: [DONE]"
    # 10 tokens at 0.15 s: the first chunk is relayed long before the answer is complete.
    assert total >= 1.3 and first_at < total / 2


def test_unknown_and_bad_requests(stack: Stack) -> None:
    c = client(stack)
    with pytest.raises(openai.NotFoundError) as info:
        c.chat.completions.create(model="nope:1b", messages=MSG)  # type: ignore[arg-type]
    assert info.value.status_code == 404
    r = requests.post(stack.url + "/v1/chat/completions", json={"messages": MSG}, timeout=5)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("model:")
    r = requests.post(stack.url + "/v1/chat/completions", data=b"{oops", timeout=5)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = requests.post(
        stack.url + "/v1/chat/completions", json={"model": "tiny:1b", "messages": []}, timeout=30
    )
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]


def test_concurrent_first_requests_share_one_load(stack: Stack) -> None:
    program = stack.model("crowd")["program"]
    assert stack.state("crowd") == "COLD"
    codes: list[int] = []

    def ask() -> None:
        r = requests.post(
            stack.url + "/v1/chat/completions",
            json={"model": "crowd", "messages": MSG},
            timeout=60,
        )
        codes.append(r.status_code)

    threads = [threading.Thread(target=ask) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert codes == [200] * 20
    assert stack.spawn_count(program) == 1
    wait_until(lambda: stack.model("crowd")["requests"] >= 20, timeout=3)


def test_a_long_stream_keeps_its_model_past_the_ttl(
    stack: Stack, slow_tokens: OllamaStandin
) -> None:
    stack.load("llama3.1:8b")
    r = requests.post(
        stack.url + "/v1/chat/completions",
        json={"model": "llama3.1:8b", "messages": MSG, "stream": True, "max_tokens": 20},
        stream=True,
        timeout=30,
    )
    started = time.monotonic()
    seen: list[tuple[float, str, int]] = []
    for line in r.iter_lines():
        if line:
            m = stack.model("llama3.1:8b")
            seen.append((time.monotonic() - started, m["state"], m["in_flight"]))
    assert seen[-1][0] > 2.5  # 20 tokens at 0.15 s: longer than TTL (1.2 s) + grace (0.6 s)
    assert {state for _, state, _ in seen} == {"HOT"} and len(seen) > 20
    # Past TTL + grace the stream was still counted in flight (the last lines may be read from
    # the client's buffer after the server finished).
    assert any(at > 2.0 and in_flight == 1 for at, _, in_flight in seen)
    # Once the stream is over, the TTL runs from its end and the model unloads.
    stack.wait_state("llama3.1:8b", "COLD", timeout=10)


def test_client_disconnect_frees_the_slot(
    stack: Stack, standin: OllamaStandin, slow_tokens: OllamaStandin
) -> None:
    stack.load("qwen2.5-coder:7b")
    r = requests.post(
        stack.url + "/v1/chat/completions",
        json={"model": "qwen2.5-coder:7b", "messages": MSG, "stream": True, "max_tokens": 30},
        stream=True,
        timeout=30,
    )
    next(line for line in r.iter_lines() if line)
    assert stack.model("qwen2.5-coder:7b")["in_flight"] == 1
    r.close()  # the client goes away mid-stream
    wait_until(lambda: stack.model("qwen2.5-coder:7b")["in_flight"] == 0, timeout=5)
    wait_until(lambda: standin.in_flight == 0, timeout=5)  # the backend stopped generating


def test_request_racing_an_unload_is_served_after_a_reload(stack: Stack) -> None:
    first = stack.load("tiny:1b")
    assert stack.post("/models/tiny:1b/unload").status_code == 202
    r = requests.post(
        stack.url + "/v1/chat/completions",
        json={"model": "tiny:1b", "messages": MSG},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    after = stack.model("tiny:1b")
    assert after["state"] == "HOT" and after["pid"] != first["pid"]


def test_no_capacity_is_a_503_with_retry_after(make_stack: Any, slow_tokens: OllamaStandin) -> None:
    s: Stack = make_stack(
        [{"model_id": "tiny:1b"}, {"model_id": "qwen2.5-coder:7b"}],
        {"max_concurrent_models": 1},
    )
    s.load("tiny:1b")
    stream = requests.post(
        s.url + "/v1/chat/completions",
        json={"model": "tiny:1b", "messages": MSG, "stream": True, "max_tokens": 20},
        stream=True,
        timeout=30,
    )
    next(line for line in stream.iter_lines() if line)
    r = requests.post(
        s.url + "/v1/chat/completions",
        json={"model": "qwen2.5-coder:7b", "messages": MSG},
        timeout=30,
    )
    stream.close()
    assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
    assert "max_concurrent_models 1" in r.json()["error"]["message"]
    # Once the busy model is idle, it can be evicted for the other one.
    wait_until(lambda: s.model("tiny:1b")["in_flight"] == 0, timeout=5)
    r = requests.post(
        s.url + "/v1/chat/completions",
        json={"model": "qwen2.5-coder:7b", "messages": MSG},
        timeout=60,
    )
    assert r.status_code == 200 and s.state("tiny:1b") == "COLD"


def _ask_twice(host: str, port: int, path: str, pause: float) -> list[bytes]:
    """Two GETs on one kept-alive connection, ``pause`` seconds apart: each answer's status
    line (b"" when the server closed the connection meanwhile)."""
    lines = []
    with socket.create_connection((host, port), timeout=10) as sock:
        reader = sock.makefile("rb")
        for i in range(2):
            if i:
                time.sleep(pause)
            try:
                sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                status = reader.readline()
            except OSError:
                status = b""
            lines.append(status)
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            reader.read(length)
    return lines


def test_a_connection_idle_past_a_retry_after_is_still_served(stack: Stack) -> None:
    """A client that sleeps a 503's Retry-After (5 s, the most given) and asks again on the same
    connection finds it open: the control plane and the workers keep idle connections longer,
    so the retry does not race gunicorn closing it."""
    port = stack.load("tiny:1b")["port"]
    for p, path in ((stack.control_port, "/health"), (port, "/health")):
        first, second = _ask_twice("127.0.0.1", p, path, 6.0)
        assert first.startswith(b"HTTP/1.1 200"), first
        assert second.startswith(b"HTTP/1.1 200"), (p, second)
