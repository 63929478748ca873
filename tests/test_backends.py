"""The Ollama and OpenAI backends against the Ollama stand-in, and the backend factory."""

from __future__ import annotations

import base64
import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest

from model_service.backends import ClosingStream, make_backend
from model_service.backends.base import BackendError, BackendUnavailable, Result
from model_service.backends.ollama import OllamaBackend
from model_service.backends.openai import OpenAIBackend, upstream_root
from model_service.spec import WorkerSpec
from tests.ollama_standin import DEFAULT_REPLY, THREAD_PREFIX, OllamaStandin

MODEL = "qwen2.5-coder:7b"
WORDS = DEFAULT_REPLY.split()
OPTIONS = {"num_ctx": 2048, "num_gpu": 1}
USER = [{"role": "user", "content": "write a haiku about pools"}]


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.01)


def free_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def standin() -> Iterator[OllamaStandin]:
    with OllamaStandin() as server:
        yield server
    assert not [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


def ollama_spec(standin: OllamaStandin, **overrides: Any) -> WorkerSpec:
    fields: dict[str, Any] = {
        "model_id": "coder",
        "upstream_model": MODEL,
        "port": 8051,
        "ollama_base_url": standin.url,
        "options": dict(OPTIONS),
        **overrides,
    }
    return WorkerSpec(**fields)


def openai_spec(url: str, **overrides: Any) -> WorkerSpec:
    fields: dict[str, Any] = {
        "model_id": "coder",
        "upstream_model": MODEL,
        "port": 8052,
        "backend": "openai",
        "upstream_url": url,
        "memory_mb": 1234.0,
        "load_timeout_seconds": 2.0,
        **overrides,
    }
    return WorkerSpec(**fields)


def sse_data(chunks: Iterable[bytes]) -> list[Any]:
    """The data of each SSE event in a byte stream: parsed JSON, or the literal ``[DONE]``."""
    events: list[Any] = []
    for block in b"".join(chunks).split(b"\n\n"):
        for line in block.splitlines():
            if line.startswith(b"data: "):
                data = line[len(b"data: ") :]
                events.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return events


def streamed(result: Result) -> list[Any]:
    assert result.json is None and result.stream is not None
    return sse_data(result.stream)


# -- OllamaBackend: lifecycle -----------------------------------------------------------------


def test_load_pins_the_model_with_keep_alive_forever(standin: OllamaStandin) -> None:
    OllamaBackend(ollama_spec(standin)).load()
    assert standin.loaded == {MODEL: None}
    (call,) = standin.calls_to("/api/generate")
    assert call.body["keep_alive"] == -1
    assert call.body["options"] == OPTIONS
    assert "prompt" not in call.body


def test_load_of_a_model_ollama_lacks_names_model_url_and_fix(standin: OllamaStandin) -> None:
    backend = OllamaBackend(ollama_spec(standin, upstream_model="missing:3b"))
    with pytest.raises(BackendError) as caught:
        backend.load()
    error = caught.value
    assert error.status == 404 and error.code == "model_not_found"
    assert "'missing:3b'" in error.message
    assert standin.url in error.message
    assert "model 'missing:3b' not found" in error.message  # Ollama's own words
    assert "ollama pull missing:3b" in error.message


def test_a_model_ollama_lacks_is_pulled_when_the_entry_says_pull() -> None:
    with OllamaStandin(models={}, library={"new:7b": 7 * 2**30}, pull_seconds=1.0) as server:
        backend = OllamaBackend(ollama_spec(server, upstream_model="new:7b", pull=True))
        assert backend.load_progress() is None  # nothing pulled yet
        seen: list[float] = []
        loading = threading.Thread(target=backend.load)
        loading.start()
        while loading.is_alive():
            progress = backend.load_progress()
            if progress is not None:
                seen.append(progress)
            time.sleep(0.02)
        loading.join()
        assert "new:7b" in server.models  # pulled, then loaded and pinned
        assert server.loaded == {"new:7b": None}
        (pull,) = server.calls_to("/api/pull")
        assert pull.body == {"model": "new:7b", "stream": True}
        assert any(0 < p < 1 for p in seen), seen  # progress moved through the download
        assert seen == sorted(seen) and backend.load_progress() == 1.0


def test_without_pull_or_outside_the_library_a_missing_model_is_a_permanent_failure() -> None:
    with OllamaStandin(models={}, library={"new:7b": 2**30}, pull_seconds=0.1) as server:
        with pytest.raises(BackendError) as caught:
            OllamaBackend(ollama_spec(server, upstream_model="new:7b")).load()
        assert caught.value.code == "model_not_found" and caught.value.permanent
        assert server.calls_to("/api/pull") == []  # no pull unless asked for
        backend = OllamaBackend(ollama_spec(server, upstream_model="nowhere:1b", pull=True))
        with pytest.raises(BackendError) as caught:
            backend.load()
        assert caught.value.code == "pull_failed" and caught.value.permanent
        assert "file does not exist" in caught.value.message  # Ollama's own words
        assert "'nowhere:1b'" in caught.value.message


def test_load_when_ollama_is_down_is_unavailable() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    backend = OllamaBackend(WorkerSpec(model_id=MODEL, port=8051, ollama_base_url=url))
    with pytest.raises(BackendUnavailable) as caught:
        backend.load()
    assert caught.value.status == 503
    assert f"Ollama is not reachable at {url}" in caught.value.message


def test_load_failure_inside_ollama_is_reported(standin: OllamaStandin) -> None:
    standin.fail_next_load = "llama runner process has terminated: exit status 2"
    with pytest.raises(BackendError) as caught:
        OllamaBackend(ollama_spec(standin)).load()
    assert caught.value.status == 502
    assert "exit status 2" in caught.value.message
    assert "HTTP 500" in caught.value.message


def test_load_slower_than_the_load_timeout_is_504(standin: OllamaStandin) -> None:
    standin.load_delay = 2.0
    backend = OllamaBackend(ollama_spec(standin, load_timeout_seconds=0.2))
    with pytest.raises(BackendError) as caught:
        backend.load()
    assert caught.value.status == 504 and caught.value.code == "load_timeout"


def test_unload_releases_the_model_and_never_raises(standin: OllamaStandin) -> None:
    backend = OllamaBackend(ollama_spec(standin))
    backend.load()
    backend.unload()
    assert standin.loaded == {}
    assert standin.calls_to("/api/generate")[-1].body == {"model": MODEL, "keep_alive": 0}
    standin.stop()
    backend.unload()  # Ollama gone: nothing to do, nothing raised


def test_memory_mb_reads_api_ps(standin: OllamaStandin) -> None:
    backend = OllamaBackend(ollama_spec(standin))
    assert backend.memory_mb() is None
    backend.load()
    assert backend.memory_mb() == pytest.approx(4_700_000_000 / (1024 * 1024))
    standin.stop()
    assert backend.memory_mb() is None


def test_memory_mb_matches_an_untagged_name_to_latest() -> None:
    with OllamaStandin(models={"tiny:latest": 500 * 1024 * 1024}) as standin:
        backend = OllamaBackend(ollama_spec(standin, upstream_model="tiny"))
        backend.load()
        assert backend.memory_mb() == 500.0


def test_base_url_with_v1_suffix_still_uses_the_native_api(standin: OllamaStandin) -> None:
    backend = OllamaBackend(ollama_spec(standin, ollama_base_url=standin.url + "/v1/"))
    backend.load()
    assert standin.loaded == {MODEL: None}


# -- OllamaBackend: requests ------------------------------------------------------------------


def test_chat_answers_in_openai_shape(standin: OllamaStandin) -> None:
    result = OllamaBackend(ollama_spec(standin)).chat_completions(
        {"model": "coder", "messages": USER}
    )
    assert result.status == 200 and result.stream is None and result.json is not None
    answer = result.json
    assert answer["object"] == "chat.completion"
    assert answer["id"].startswith("chatcmpl-")
    assert answer["model"] == "coder"
    (choice,) = answer["choices"]
    assert choice["message"] == {"role": "assistant", "content": DEFAULT_REPLY}
    assert choice["finish_reason"] == "stop"
    assert answer["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": len(WORDS),
        "total_tokens": 5 + len(WORDS),
    }
    (call,) = standin.calls_to("/api/chat")
    assert call.body["model"] == MODEL
    assert call.body["keep_alive"] == -1
    assert call.body["stream"] is False
    assert call.body["messages"] == USER


def test_chat_stream_translates_to_sse_chunks(standin: OllamaStandin) -> None:
    backend = OllamaBackend(ollama_spec(standin))
    body = {"messages": USER, "stream": True, "stream_options": {"include_usage": True}}
    events = streamed(backend.chat_completions(body))
    assert events[-1] == "[DONE]"
    usage_chunk, chunks = events[-2], events[:-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == len(WORDS)
    assert usage_chunk["usage"]["prompt_tokens"] == 5
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "coder" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    content = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert content == DEFAULT_REPLY
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_chat_stream_without_include_usage_has_no_usage_chunk(standin: OllamaStandin) -> None:
    events = streamed(
        OllamaBackend(ollama_spec(standin)).chat_completions({"messages": USER, "stream": True})
    )
    assert events[-1] == "[DONE]"
    assert all(e == "[DONE]" or e["choices"] for e in events)


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_and_stop_are_honoured(standin: OllamaStandin, stream: bool) -> None:
    backend = OllamaBackend(ollama_spec(standin))

    def ask(**extra: Any) -> tuple[str, str]:
        result = backend.chat_completions({"messages": USER, "stream": stream, **extra})
        if not stream:
            assert result.json is not None
            choice = result.json["choices"][0]
            return choice["message"]["content"], choice["finish_reason"]
        chunks = [e for e in streamed(result) if e != "[DONE]"]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        return text, chunks[-1]["choices"][0]["finish_reason"]

    assert ask(max_tokens=3) == (" ".join(WORDS[:3]), "length")
    assert ask(max_completion_tokens=2) == (" ".join(WORDS[:2]), "length")
    assert ask(stop="fox") == (DEFAULT_REPLY[: DEFAULT_REPLY.index("fox")], "stop")
    assert ask(stop=["lazy", "brown"]) == (DEFAULT_REPLY[: DEFAULT_REPLY.index("brown")], "stop")


def test_sampling_parameters_become_options(standin: OllamaStandin) -> None:
    body = {
        "messages": USER,
        "temperature": 0.2,
        "top_p": 0.9,
        "seed": 7,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
        "max_tokens": 5,
        "stop": "END",
    }
    OllamaBackend(ollama_spec(standin)).chat_completions(body)
    assert standin.calls_to("/api/chat")[0].body["options"] == {
        **OPTIONS,
        "temperature": 0.2,
        "top_p": 0.9,
        "seed": 7,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
        "num_predict": 5,
        "stop": ["END"],
    }


def test_the_same_options_go_with_every_call(standin: OllamaStandin) -> None:
    backend = OllamaBackend(ollama_spec(standin))
    backend.load()
    backend.chat_completions({"messages": USER, "temperature": 0.7})
    streamed(backend.chat_completions({"messages": USER, "stream": True}))
    backend.completions({"prompt": "def add(a, b):", "max_tokens": 4})
    streamed(backend.completions({"prompt": "x", "stream": True}))
    calls = standin.calls_to("/api/generate") + standin.calls_to("/api/chat")
    assert len(calls) == 5
    for call in calls:
        assert call.body["keep_alive"] == -1
        assert {k: call.body["options"][k] for k in OPTIONS} == OPTIONS
    # Identical runner options: Ollama loaded the model once and never reloaded it.
    assert standin.load_counts == {MODEL: 1}
    assert standin.loaded == {MODEL: None}


def test_completions_non_stream_and_stream(standin: OllamaStandin) -> None:
    backend = OllamaBackend(ollama_spec(standin))
    result = backend.completions({"prompt": ["def add(a, b):"], "max_tokens": 4})
    assert result.json is not None
    assert result.json["object"] == "text_completion"
    assert result.json["model"] == "coder"
    assert result.json["choices"][0]["text"] == " ".join(WORDS[:4])
    assert result.json["choices"][0]["finish_reason"] == "length"
    assert result.json["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert standin.calls_to("/api/generate")[0].body["prompt"] == "def add(a, b):"

    body = {"prompt": "x", "stream": True, "stream_options": {"include_usage": True}}
    events = streamed(backend.completions(body))
    assert events[-1] == "[DONE]"
    assert events[-2]["usage"]["completion_tokens"] == len(WORDS)
    chunks = events[:-2]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == DEFAULT_REPLY
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_bad_requests_are_400_before_ollama_is_called(standin: OllamaStandin) -> None:
    backend = OllamaBackend(ollama_spec(standin))
    bad: list[tuple[Callable[[dict[str, Any]], Result], dict[str, Any], str]] = [
        (backend.chat_completions, {"messages": []}, "messages"),
        (backend.chat_completions, {"messages": ["hi"]}, "messages[0]"),
        (backend.chat_completions, {"messages": USER, "stop": 3}, "stop"),
        (backend.chat_completions, {"messages": USER, "max_tokens": "9"}, "max_tokens"),
        (backend.chat_completions, {"messages": USER, "temperature": "hot"}, "temperature"),
        (backend.completions, {"prompt": ["a", "b"], "stream": True}, "prompt"),
    ]
    for call, body, key in bad:
        with pytest.raises(BackendError) as caught:
            call(body)
        assert caught.value.status == 400
        assert caught.value.message.startswith(key + ":")
    assert standin.calls == []


def test_requests_for_a_missing_model_are_404(standin: OllamaStandin) -> None:
    backend = OllamaBackend(ollama_spec(standin, upstream_model="missing:3b"))
    for stream in (False, True):
        with pytest.raises(BackendError) as caught:
            backend.chat_completions({"messages": USER, "stream": stream})
        assert caught.value.status == 404 and caught.value.code == "model_not_found"


def test_requests_when_ollama_is_down_are_unavailable() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    backend = OllamaBackend(WorkerSpec(model_id=MODEL, port=8051, ollama_base_url=url))
    with pytest.raises(BackendUnavailable):
        backend.chat_completions({"messages": USER})
    with pytest.raises(BackendUnavailable):
        backend.completions({"prompt": "x", "stream": True})


def test_chat_stream_is_relayed_as_it_is_generated(standin: OllamaStandin) -> None:
    standin.token_delay = 0.1
    standin.reply = "one two three four five six seven eight"  # 0.8 s in all
    result = OllamaBackend(ollama_spec(standin)).chat_completions(
        {"messages": USER, "stream": True}
    )
    assert result.stream is not None
    started = time.monotonic()
    arrivals: list[float] = []
    for chunk in result.stream:
        event = sse_data([chunk])
        if event and event[0] != "[DONE]" and event[0]["choices"][0]["delta"].get("content"):
            arrivals.append(time.monotonic() - started)
    assert len(arrivals) == 8
    assert arrivals[0] < 0.4, f"first token after {arrivals[0]:.2f} s: the answer was buffered"
    assert arrivals[-1] >= 0.6


def test_closing_a_stream_early_releases_ollama(standin: OllamaStandin) -> None:
    standin.token_delay = 0.02
    standin.reply = " ".join(["word"] * 500)  # ten seconds of tokens if nobody hung up
    backend = OllamaBackend(ollama_spec(standin))
    result = backend.chat_completions({"messages": USER, "stream": True})
    assert isinstance(result.stream, ClosingStream)
    next(result.stream)  # the role chunk
    assert b"word" in next(result.stream)
    result.stream.close()
    wait_until(lambda: standin.in_flight == 0, timeout=2)

    # Closed before a single chunk was read: the upstream answer is released all the same.
    unread = backend.chat_completions({"messages": USER, "stream": True})
    assert unread.stream is not None
    wait_until(lambda: standin.in_flight == 1, timeout=2)
    unread.stream.close()  # type: ignore[attr-defined]
    wait_until(lambda: standin.in_flight == 0, timeout=2)

    standin.reply, standin.token_delay = DEFAULT_REPLY, 0.0
    answer = backend.chat_completions({"messages": USER})
    assert answer.json is not None
    assert answer.json["choices"][0]["message"]["content"] == DEFAULT_REPLY


def test_ollama_dying_mid_stream_ends_with_an_error_event(standin: OllamaStandin) -> None:
    standin.token_delay = 0.05
    result = OllamaBackend(ollama_spec(standin)).chat_completions(
        {"messages": USER, "stream": True}
    )
    assert result.stream is not None
    chunks = [next(result.stream), next(result.stream)]
    standin.stop()
    chunks.extend(result.stream)
    events = sse_data(chunks)
    assert events[-1] == "[DONE]"
    assert "error" in events[-2]
    assert standin.url in events[-2]["error"]["message"]


# -- OpenAIBackend ----------------------------------------------------------------------------


def test_upstream_root_strips_v1_and_slashes() -> None:
    assert upstream_root("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000"
    assert upstream_root("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    assert upstream_root("http://h:1/api/v1") == "http://h:1/api"


def test_openai_backend_without_upstream_url_is_rejected() -> None:
    with pytest.raises(BackendError) as caught:
        OpenAIBackend(openai_spec(""))
    assert "upstream_url" in caught.value.message


def test_openai_load_unload_memory(standin: OllamaStandin) -> None:
    backend = OpenAIBackend(openai_spec(standin.url + "/v1"))
    backend.load()
    assert [(c.method, c.path) for c in standin.calls] == [("GET", "/v1/models")]
    backend.unload()
    assert backend.memory_mb() == 1234.0
    assert len(standin.calls) == 1


def test_openai_load_gives_up_on_an_unreachable_upstream() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    backend = OpenAIBackend(openai_spec(url, load_timeout_seconds=0.3))
    with pytest.raises(BackendError) as caught:
        backend.load()
    assert caught.value.code == "load_timeout"
    assert url in caught.value.message


def test_openai_load_waits_for_a_late_upstream() -> None:
    port = free_port()
    backend = OpenAIBackend(openai_spec(f"http://127.0.0.1:{port}", load_timeout_seconds=10))
    late = OllamaStandin(port=port)
    timer = threading.Timer(0.3, late.start)
    timer.start()
    try:
        started = time.monotonic()
        backend.load()
        assert time.monotonic() - started >= 0.2
    finally:
        timer.join()
        late.stop()


def test_openai_chat_passes_through_with_the_model_renamed(standin: OllamaStandin) -> None:
    backend = OpenAIBackend(openai_spec(standin.url))
    result = backend.chat_completions({"model": "coder", "messages": USER, "max_tokens": 3})
    assert result.status == 200 and result.json is not None
    assert result.json["model"] == "coder"
    assert result.json["choices"][0]["message"]["content"] == " ".join(WORDS[:3])
    (call,) = standin.calls_to("/v1/chat/completions")
    assert call.body == {"model": MODEL, "messages": USER, "max_tokens": 3}


def test_openai_stream_is_passed_through(standin: OllamaStandin) -> None:
    backend = OpenAIBackend(openai_spec(standin.url))
    body = {
        "model": "coder",
        "messages": USER,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = streamed(backend.chat_completions(body))
    assert events[-1] == "[DONE]"
    assert events[-2]["usage"]["completion_tokens"] == len(WORDS)
    content = "".join(e["choices"][0]["delta"]["content"] for e in events[:-2])
    assert content == DEFAULT_REPLY


def test_openai_stream_arrives_incrementally(standin: OllamaStandin) -> None:
    standin.token_delay = 0.1
    standin.reply = "one two three four five six seven eight"
    result = OpenAIBackend(openai_spec(standin.url)).completions({"prompt": "x", "stream": True})
    assert result.stream is not None
    started = time.monotonic()
    first = next(result.stream)
    assert time.monotonic() - started < 0.4
    assert b"one" in first
    result.stream.close()  # type: ignore[attr-defined]
    wait_until(lambda: standin.in_flight == 0, timeout=2)


def test_openai_completions_pass_through(standin: OllamaStandin) -> None:
    result = OpenAIBackend(openai_spec(standin.url)).completions({"prompt": "say", "stop": "brown"})
    assert result.json is not None
    assert result.json["choices"][0]["text"] == "The quick "
    assert result.json["model"] == "coder"


def test_openai_upstream_errors_pass_through(standin: OllamaStandin) -> None:
    backend = OpenAIBackend(openai_spec(standin.url, upstream_model="missing:3b"))
    for stream in (False, True):
        result = backend.chat_completions({"messages": USER, "stream": stream})
        assert result.status == 404 and result.stream is None and result.json is not None
        assert result.json["error"]["message"] == "model 'missing:3b' not found"


def test_openai_non_json_errors_are_wrapped(standin: OllamaStandin) -> None:
    backend = OpenAIBackend(openai_spec(standin.url + "/elsewhere"))
    result = backend.chat_completions({"messages": USER})
    assert result.status == 404 and result.json is not None
    error = result.json["error"]
    assert "404 page not found" in error["message"]
    assert standin.url + "/elsewhere" in error["message"]
    assert error["type"] == "upstream_error"


def test_openai_unreachable_upstream_is_unavailable() -> None:
    backend = OpenAIBackend(openai_spec(f"http://127.0.0.1:{free_port()}"))
    with pytest.raises(BackendUnavailable):
        backend.chat_completions({"messages": USER})


# -- make_backend -----------------------------------------------------------------------------


def test_make_backend_picks_by_name(standin: OllamaStandin) -> None:
    assert isinstance(make_backend(ollama_spec(standin)), OllamaBackend)
    assert isinstance(make_backend(openai_spec(standin.url)), OpenAIBackend)


def test_make_backend_explains_a_missing_llamacpp(monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes the import fail, installed or not: the test is deterministic.
    monkeypatch.setitem(sys.modules, "model_service.backends.llamacpp", None)
    spec = WorkerSpec(model_id="m", port=8051, backend="llamacpp", model_path="/m.gguf")
    with pytest.raises(BackendError) as caught:
        make_backend(spec)
    assert caught.value.code == "backend_not_installed"
    assert "pip install 'modelpool[llamacpp]'" in caught.value.message


def test_make_backend_rejects_an_unknown_backend() -> None:
    with pytest.raises(BackendError) as caught:
        make_backend(WorkerSpec(model_id="m", port=8051, backend="vllm"))
    assert "'vllm'" in caught.value.message
    assert "ollama, llamacpp, openai" in caught.value.message


def test_a_spec_names_pull_only_when_set() -> None:
    """A worker that predates ``pull`` rejects keys it does not know: a spec without a pull
    must still start on a node that has not been upgraded."""
    plain = WorkerSpec(model_id="m", port=8051)
    assert "pull" not in json.loads(plain.to_json())
    assert "pull" not in json.loads(base64.b64decode(plain.encode()))
    assert WorkerSpec.decode(plain.encode()) == plain
    pulling = WorkerSpec(model_id="m", port=8051, pull=True)
    assert json.loads(pulling.to_json())["pull"] is True
    assert WorkerSpec.decode(pulling.encode()) == pulling


def test_a_pull_cut_off_midway_fails_the_load_and_says_so() -> None:
    errors: list[BackendError] = []

    def load() -> None:
        try:
            backend.load()
        except BackendError as exc:
            errors.append(exc)

    with OllamaStandin(models={}, library={"new:7b": 2**30}, pull_seconds=5.0) as server:
        backend = OllamaBackend(ollama_spec(server, upstream_model="new:7b", pull=True))
        loading = threading.Thread(target=load)
        loading.start()
        wait_until(lambda: (backend.load_progress() or 0) > 0, 5)
    # The stand-in stopped mid-pull: the load ends with an error, nothing was pulled.
    loading.join(10)
    assert not loading.is_alive()
    (error,) = errors
    assert "pull" in error.message and "'new:7b'" in error.message, error.message
    assert not error.permanent  # worth another try
    assert "new:7b" not in server.models


def test_pull_progress_is_the_share_of_bytes_and_never_goes_back() -> None:
    from model_service.backends.ollama_pull import PullProgress

    pull = PullProgress("Ollama", "m")
    seen: list[float | None] = []
    lines = [
        {"status": "pulling manifest"},
        {"status": "pulling aaa", "digest": "sha256:a", "total": 100, "completed": 50},
        # A second layer appears: 50 of 300 would be less than the 0.5 shown already.
        {"status": "pulling bbb", "digest": "sha256:b", "total": 200, "completed": 0},
        {"status": "pulling aaa", "digest": "sha256:a", "total": 100, "completed": 100},
        {"status": "pulling bbb", "digest": "sha256:b", "total": 200, "completed": 200},
        {"status": "verifying sha256 digest"},
        {"status": "success"},
    ]

    def stream() -> Iterator[bytes]:
        for line in lines:
            yield json.dumps(line).encode()
            seen.append(pull.share)

    pull.follow(stream())
    assert seen == [0.0, 0.5, 0.5, 0.5, 1.0, 1.0]  # read after each line but "success"
    with pytest.raises(BackendError, match="ended before it succeeded"):
        PullProgress("Ollama", "m").follow([json.dumps(lines[1]).encode()])
    with pytest.raises(BackendError, match="not JSON") as caught:
        PullProgress("Ollama", "m").follow([b"{oops"])
    assert not caught.value.permanent
