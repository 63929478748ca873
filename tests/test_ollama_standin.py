"""The Ollama stand-in answers as Ollama does, for the parts modelpool relies on."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from tests.ollama_standin import DEFAULT_REPLY, THREAD_PREFIX, OllamaStandin, plan_reply

REPO = Path(__file__).resolve().parent.parent
MODEL = "tiny:1b"
WORDS = DEFAULT_REPLY.split()


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.01)


def standin_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


@pytest.fixture
def standin() -> Iterator[OllamaStandin]:
    with OllamaStandin() as server:
        yield server
    assert not standin_threads(), "the stand-in left threads behind"


def sse_data(lines: Iterable[bytes]) -> list[Any]:
    """The data of each SSE event: parsed JSON, or the literal ``[DONE]``."""
    events: list[Any] = []
    for line in lines:
        if line.startswith(b"data: "):
            data = line[len(b"data: ") :]
            events.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return events


def post(standin: OllamaStandin, path: str, body: dict[str, Any], **kw: Any) -> requests.Response:
    return requests.post(standin.url + path, json=body, timeout=10, **kw)


def test_tags_and_version(standin: OllamaStandin) -> None:
    tags = requests.get(standin.url + "/api/tags", timeout=5).json()["models"]
    by_name = {m["name"]: m for m in tags}
    assert set(by_name) == {"qwen2.5-coder:7b", "llama3.1:8b", "tiny:1b"}
    assert by_name["llama3.1:8b"]["size"] == 4_900_000_000
    assert by_name["llama3.1:8b"]["model"] == "llama3.1:8b"
    assert by_name["llama3.1:8b"]["details"]["parameter_size"] == "8B"
    assert requests.get(standin.url + "/api/version", timeout=5).json()["version"]
    assert requests.get(standin.url + "/", timeout=5).text == "Ollama is running"


def test_load_and_unload_follow_keep_alive(standin: OllamaStandin) -> None:
    assert requests.get(standin.url + "/api/ps", timeout=5).json() == {"models": []}

    loaded = post(standin, "/api/generate", {"model": MODEL, "keep_alive": -1}).json()
    assert loaded["done"] is True and loaded["done_reason"] == "load"
    assert loaded["response"] == ""
    (entry,) = requests.get(standin.url + "/api/ps", timeout=5).json()["models"]
    assert entry["name"] == entry["model"] == MODEL
    assert entry["size"] == entry["size_vram"] == 800_000_000
    # keep_alive -1 means for ever: Ollama shows an expiry centuries away.
    assert datetime.fromisoformat(entry["expires_at"]).year > 2200
    assert standin.loaded == {MODEL: None}

    unloaded = post(standin, "/api/generate", {"model": MODEL, "keep_alive": 0}).json()
    assert unloaded["done_reason"] == "unload"
    assert requests.get(standin.url + "/api/ps", timeout=5).json() == {"models": []}
    assert standin.loaded == {}


def test_chat_without_messages_loads_and_unloads(standin: OllamaStandin) -> None:
    loaded = post(standin, "/api/chat", {"model": MODEL, "messages": []}).json()
    assert loaded["done_reason"] == "load"
    assert loaded["message"] == {"role": "assistant", "content": ""}
    assert MODEL in standin.loaded
    unloaded = post(standin, "/api/chat", {"model": MODEL, "messages": [], "keep_alive": "0"})
    assert unloaded.json()["done_reason"] == "unload"
    assert standin.loaded == {}


def test_default_keep_alive_expires_the_model() -> None:
    with OllamaStandin(default_keep_alive=0.2) as standin:
        post(standin, "/api/generate", {"model": MODEL})
        expires_at = standin.loaded[MODEL]
        assert expires_at is not None and expires_at > time.time()
        wait_until(lambda: MODEL not in standin.loaded, timeout=3)
        # A duration string works as in Ollama.
        post(standin, "/api/generate", {"model": MODEL, "keep_alive": "100ms"})
        wait_until(lambda: MODEL not in standin.loaded, timeout=3)


def test_v1_endpoints_ignore_keep_alive(standin: OllamaStandin) -> None:
    post(standin, "/api/generate", {"model": MODEL, "keep_alive": -1})
    assert standin.loaded[MODEL] is None
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "keep_alive": -1}
    assert post(standin, "/v1/chat/completions", body).status_code == 200
    # This is the trap the Ollama backend avoids: the pin is gone, Ollama's default applies.
    # (The stand-in releases the model just after the answer is sent: poll for it.)
    deadline = time.monotonic() + 2
    while standin.loaded[MODEL] is None and time.monotonic() < deadline:
        time.sleep(0.01)
    expires_at = standin.loaded[MODEL]
    assert expires_at is not None
    assert expires_at == pytest.approx(time.time() + standin.default_keep_alive, abs=5)


def test_load_delay_applies_to_the_first_load_only(standin: OllamaStandin) -> None:
    standin.load_delay = 0.3
    started = time.monotonic()
    first = post(standin, "/api/generate", {"model": MODEL, "keep_alive": -1})
    assert first.status_code == 200
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    post(standin, "/api/generate", {"model": MODEL, "keep_alive": -1})
    assert time.monotonic() - started < 0.3
    assert standin.load_counts == {MODEL: 1}


def test_changing_runner_options_reloads_the_model(standin: OllamaStandin) -> None:
    def chat(options: dict[str, Any]) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": False}
        assert post(standin, "/api/chat", {**body, "options": options}).status_code == 200

    chat({"num_ctx": 2048})
    chat({"num_ctx": 2048, "temperature": 0.1})  # sampling options do not reload
    assert standin.load_counts == {MODEL: 1}
    chat({"num_ctx": 4096})
    assert standin.load_counts == {MODEL: 2}


def test_fail_next_load_fails_once(standin: OllamaStandin) -> None:
    standin.fail_next_load = "llama runner process has terminated"
    failed = post(standin, "/api/generate", {"model": MODEL})
    assert failed.status_code == 500
    assert failed.json() == {"error": "llama runner process has terminated"}
    assert post(standin, "/api/generate", {"model": MODEL}).status_code == 200


def test_unknown_model_is_404_in_both_shapes(standin: OllamaStandin) -> None:
    native = post(standin, "/api/generate", {"model": "nope:1b", "prompt": "hi"})
    assert native.status_code == 404
    assert native.json() == {"error": "model 'nope:1b' not found"}
    chat = post(standin, "/api/chat", {"model": "nope:1b", "messages": []})
    assert chat.status_code == 404
    body = {"model": "nope:1b", "messages": [{"role": "user", "content": "hi"}]}
    v1 = post(standin, "/v1/chat/completions", body)
    assert v1.status_code == 404
    assert v1.json()["error"]["message"] == "model 'nope:1b' not found"
    assert v1.json()["error"]["type"] == "not_found_error"


def test_bad_requests_are_400(standin: OllamaStandin) -> None:
    assert post(standin, "/api/generate", {"prompt": "hi"}).json() == {"error": "model is required"}
    bad_json = requests.post(standin.url + "/api/chat", data=b"{nope", timeout=5)
    assert bad_json.status_code == 400
    assert post(standin, "/api/generate", {"model": MODEL, "keep_alive": "soon"}).status_code == 400
    assert requests.get(standin.url + "/api/nothing", timeout=5).status_code == 404


def test_generate_streams_ndjson(standin: OllamaStandin) -> None:
    response = post(
        standin, "/api/generate", {"model": MODEL, "prompt": "why is the sky blue"}, stream=True
    )
    assert response.headers["Content-Type"] == "application/x-ndjson"
    assert response.headers["Transfer-Encoding"] == "chunked"
    objects = [json.loads(line) for line in response.iter_lines() if line]
    *pieces, final = objects
    assert all(not p["done"] for p in pieces)
    assert "".join(p["response"] for p in pieces) == DEFAULT_REPLY
    assert final["done"] is True and final["done_reason"] == "stop"
    assert final["prompt_eval_count"] == 5
    assert final["eval_count"] == len(WORDS)
    for key in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(final[key], int)


def test_chat_honours_num_predict_and_stop(standin: OllamaStandin) -> None:
    base = {"model": MODEL, "messages": [{"role": "user", "content": "a b c"}], "stream": False}
    short = post(standin, "/api/chat", {**base, "options": {"num_predict": 3}}).json()
    assert short["message"]["content"] == " ".join(WORDS[:3])
    assert short["done_reason"] == "length"
    assert short["eval_count"] == 3
    assert short["prompt_eval_count"] == 3

    stopped = post(standin, "/api/chat", {**base, "options": {"stop": ["fox"]}}).json()
    assert stopped["message"]["content"] == DEFAULT_REPLY[: DEFAULT_REPLY.index("fox")]
    assert stopped["done_reason"] == "stop"


def test_plan_reply_cuts_inside_a_token() -> None:
    assert plan_reply("one two three", None, "wo t") == (["one", " t"], "stop")
    assert plan_reply("one two three", 2, "three") == (["one", " two"], "length")
    assert plan_reply("one two three", -1, None) == (["one", " two", " three"], "stop")


def test_v1_chat_streams_sse_with_usage(standin: OllamaStandin) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hello there"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 4,
    }
    response = post(standin, "/v1/chat/completions", body, stream=True)
    assert response.headers["Content-Type"] == "text/event-stream"
    events = sse_data(response.iter_lines())
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}
    chunks = events[:-2]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == " ".join(WORDS[:4])
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_v1_completions_and_models(standin: OllamaStandin) -> None:
    answer = post(standin, "/v1/completions", {"model": MODEL, "prompt": "say", "stop": "brown"})
    data = answer.json()
    assert data["object"] == "text_completion"
    assert data["choices"][0]["text"] == "The quick "
    assert data["usage"]["prompt_tokens"] == 1
    models = requests.get(standin.url + "/v1/models", timeout=5).json()
    assert models["object"] == "list"
    assert {m["id"] for m in models["data"]} == {"qwen2.5-coder:7b", "llama3.1:8b", "tiny:1b"}


def test_calls_are_recorded(standin: OllamaStandin) -> None:
    post(standin, "/api/generate", {"model": MODEL, "keep_alive": -1})
    requests.get(standin.url + "/api/ps", timeout=5)
    assert [(c.method, c.path) for c in standin.calls] == [
        ("POST", "/api/generate"),
        ("GET", "/api/ps"),
    ]
    assert standin.calls_to("/api/generate")[0].body == {"model": MODEL, "keep_alive": -1}
    standin.clear_calls()
    assert standin.calls == []


def test_client_leaving_mid_stream_does_not_break_the_server(standin: OllamaStandin) -> None:
    standin.token_delay = 0.02
    standin.reply = " ".join(["word"] * 500)  # ten seconds of tokens if nobody hung up
    response = post(
        standin,
        "/api/chat",
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
        stream=True,
    )
    first = next(response.iter_lines())
    assert json.loads(first)["message"]["content"] == "word"
    response.close()
    wait_until(lambda: standin.in_flight == 0, timeout=2)
    standin.token_delay = 0.0
    again = post(standin, "/api/generate", {"model": MODEL, "prompt": "x", "stream": False})
    assert again.status_code == 200


def test_stop_ends_open_connections_and_streams() -> None:
    standin = OllamaStandin(token_delay=0.05).start()
    session = requests.Session()
    try:
        session.get(standin.url + "/api/tags", timeout=5)  # leaves a keep-alive connection
        response = session.post(
            standin.url + "/api/generate",
            json={"model": MODEL, "prompt": "x"},
            stream=True,
            timeout=5,
        )
        next(response.iter_lines())
    finally:
        standin.stop()
        session.close()
    assert not standin_threads()


def test_openai_client_chats_and_streams(standin: OllamaStandin) -> None:
    client = openai.OpenAI(base_url=standin.url + "/v1", api_key="x", max_retries=0)
    try:
        messages: Any = [{"role": "user", "content": "hello there"}]
        answer = client.chat.completions.create(model=MODEL, messages=messages)
        assert answer.choices[0].message.content == DEFAULT_REPLY
        assert answer.choices[0].finish_reason == "stop"
        assert answer.usage is not None and answer.usage.completion_tokens == len(WORDS)

        stream = client.chat.completions.create(
            model=MODEL,
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces, usage = [], None
        for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
            usage = chunk.usage or usage
        assert "".join(pieces) == DEFAULT_REPLY
        assert usage is not None and usage.prompt_tokens == 2

        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="nope:1b", messages=messages)
    finally:
        client.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_runs_standalone_and_stops_on_signal(signum: int) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.ollama_standin", "--port", "0", "--load-delay", "0.1"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 10)
        assert ready, "the stand-in printed no URL"
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        loaded = requests.post(url + "/api/generate", json={"model": MODEL}, timeout=5).json()
        assert loaded["done_reason"] == "load"
        proc.send_signal(signum)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def test_num_parallel_works_on_that_many_requests_at_once_and_queues_the_rest() -> None:
    """As Ollama with OLLAMA_NUM_PARALLEL: one server is a real bottleneck for a busy model."""
    with OllamaStandin(token_delay=0.05, num_parallel=2) as server:
        body = {"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 4}}
        answers: list[int] = []
        started = time.monotonic()
        threads = [
            threading.Thread(
                target=lambda: answers.append(post(server, "/api/generate", body).status_code)
            )
            for _ in range(6)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        took = time.monotonic() - started
        assert answers == [200] * 6
        assert server.peak_running[MODEL] == 2
        # 6 answers of 4 tokens at 0.05 s, 2 at a time: three rounds of 0.2 s at least.
        assert took >= 0.6, took
    with OllamaStandin(token_delay=0.05) as server:  # no limit: more than two at once
        threads = [
            threading.Thread(target=lambda: post(server, "/api/generate", body)) for _ in range(6)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert server.peak_running[MODEL] > 2
