"""The llama.cpp backend with generated demo models: in-process, then in a real stack."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import requests

from model_service.backends import llamacpp, make_backend
from model_service.backends.base import BackendError
from model_service.backends.llamacpp import LlamaCppBackend, read_ahead
from model_service.demo_model import DemoShape, write_demo_model
from model_service.spec import WorkerSpec
from tests.stack import Stack, wait_until

MSG = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    return {
        "small": write_demo_model(root / "small.gguf", seed=1),
        "large": write_demo_model(
            root / "large.gguf", seed=2, shape=DemoShape(layers=4, embd=512, ff=1024)
        ),
    }


def backend(path: Path, **options: Any) -> LlamaCppBackend:
    spec = WorkerSpec(
        model_id="demo",
        port=1,
        backend="llamacpp",
        model_path=str(path),
        options={"n_ctx": 512, **options},
    )
    b = make_backend(spec)
    assert isinstance(b, LlamaCppBackend)
    b.load()
    return b


def sse(stream: Any) -> list[dict[str, Any]]:
    events = []
    for raw in stream:
        for line in raw.decode().split("\n\n"):
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    return events


def test_demo_model_is_deterministic(models: dict[str, Path], tmp_path: Path) -> None:
    again = write_demo_model(tmp_path / "again.gguf", seed=1)
    assert again.read_bytes() == models["small"].read_bytes()
    other = write_demo_model(tmp_path / "other.gguf", seed=7)
    assert other.read_bytes() != again.read_bytes()
    assert models["large"].stat().st_size > 10 * models["small"].stat().st_size


def test_chat_usage_max_tokens_seed_and_stream(models: dict[str, Path]) -> None:
    b = backend(models["small"])
    body = {"messages": MSG, "max_tokens": 8, "seed": 42, "temperature": 0.9}
    first = b.chat_completions(dict(body)).json
    assert first is not None
    usage = first["usage"]
    choice = first["choices"][0]
    assert 0 < usage["completion_tokens"] <= 8 and usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if choice["finish_reason"] == "length":
        assert usage["completion_tokens"] == 8
    assert first["model"] == "demo"
    # Same seed, same answer; streamed, the same text and (with include_usage) the same usage.
    assert b.chat_completions(dict(body)).json["choices"][0] == choice  # type: ignore[index]
    result = b.chat_completions({**body, "stream": True, "stream_options": {"include_usage": True}})
    assert result.stream is not None
    events = sse(result.stream)
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text == choice["message"]["content"]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == usage
    finals = [e["choices"][0]["finish_reason"] for e in events if e["choices"]]
    assert finals[-1] == choice["finish_reason"]
    b.unload()


def test_max_tokens_is_a_hard_limit(models: dict[str, Path]) -> None:
    b = backend(models["small"])
    for n in (1, 3, 8, 16):
        out = b.chat_completions({"messages": MSG, "max_tokens": n, "temperature": 0}).json
        assert out is not None and out["usage"]["completion_tokens"] <= n
    b.unload()


def test_completions_and_stop(models: dict[str, Path]) -> None:
    b = backend(models["small"])
    base = {"prompt": "def f(", "max_tokens": 12, "temperature": 0}
    full = b.completions(dict(base)).json
    assert full is not None
    text = full["choices"][0]["text"]
    assert full["usage"]["completion_tokens"] > 0
    stop = text[2:4]
    assert stop, text
    cut = b.completions({**base, "stop": [stop]}).json
    assert cut is not None
    assert cut["choices"][0]["text"] == text[: text.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    with pytest.raises(BackendError) as info:
        b.completions({**base, "prompt": ["a", "b"], "stream": True})
    assert info.value.status == 400
    b.unload()


def test_a_full_queue_answers_503_and_recovers(models: dict[str, Path]) -> None:
    b = backend(models["small"], max_queue=0)
    busy = b.chat_completions({"messages": MSG, "max_tokens": 50, "stream": True})
    assert busy.stream is not None
    next(busy.stream)  # the model is generating for this request
    with pytest.raises(BackendError) as info:
        b.chat_completions({"messages": MSG, "max_tokens": 2})
    assert info.value.status == 503 and info.value.retry_after
    busy.stream.close()  # e.g. the client went away: the slot is free again
    out = b.chat_completions({"messages": MSG, "max_tokens": 2}).json
    assert out is not None and out["usage"]["completion_tokens"] > 0
    b.unload()


def test_requests_queue_up_to_the_limit(models: dict[str, Path]) -> None:
    b = backend(models["small"], max_queue=4)
    results: list[int] = []

    def ask() -> None:
        try:
            out = b.chat_completions({"messages": MSG, "max_tokens": 4}).json
            results.append(out["usage"]["completion_tokens"] if out else -1)
        except BackendError as exc:
            results.append(-exc.status)

    threads = [threading.Thread(target=ask) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 5 and all(r > 0 for r in results)
    b.unload()


def test_read_ahead_counts_every_byte_in_chunks(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(range(256)) * 1000)  # 256,000 bytes
    counts: list[int] = []
    assert read_ahead(path, 100_000, counts.append) == 256_000
    assert counts == [100_000, 100_000, 56_000]


def test_load_progress_is_the_share_of_the_file_read(
    models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = WorkerSpec(model_id="demo", port=1, backend="llamacpp", model_path=str(models["small"]))
    b = make_backend(spec)
    assert isinstance(b, LlamaCppBackend)
    assert b.load_progress() is None  # not started: nothing to say
    seen: list[float | None] = []
    original = llamacpp.read_ahead

    def watched(path: Path, chunk: int, on_read: Any) -> int:
        def count(n: int) -> None:
            on_read(n)
            seen.append(b.load_progress())

        return original(path, models["small"].stat().st_size // 3 + 1, count)

    monkeypatch.setattr(llamacpp, "read_ahead", watched)
    b.load()
    assert len(seen) == 3 and all(x is not None for x in seen)
    assert seen == sorted(seen) and 0.3 < seen[0] < 0.4 and seen[-1] == 1.0
    assert b.load_progress() == 1.0
    b.unload()


def test_load_errors(
    models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = WorkerSpec(
        model_id="m", port=1, backend="llamacpp", model_path=str(tmp_path / "no.gguf")
    )
    with pytest.raises(BackendError, match=r"model file not found: .*no\.gguf"):
        make_backend(missing).load()
    bad = WorkerSpec(
        model_id="m",
        port=1,
        backend="llamacpp",
        model_path=str(models["small"]),
        options={"n_ctxx": 5},
    )
    with pytest.raises(BackendError, match=r"options\.n_ctxx: unknown llamacpp option"):
        make_backend(bad)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file")
    spec = WorkerSpec(model_id="m", port=1, backend="llamacpp", model_path=str(garbage))
    with pytest.raises(BackendError, match="could not load"):
        make_backend(spec).load()
    # Without llama-cpp-python the error says how to install it.
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    monkeypatch.delitem(sys.modules, "model_service.backends.llamacpp")
    with pytest.raises(BackendError, match=r"pip install 'modelpool\[llamacpp\]'"):
        make_backend(spec)


# --- in a real stack -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(make_stack: Any, models: dict[str, Path]) -> Stack:
    entries = [
        {
            "model_id": "demo-small",
            "backend": "llamacpp",
            "model_path": str(models["small"]),
            "memory_mb": 100,
            "options": {"n_ctx": 512},
        },
        {
            "model_id": "demo-large",
            "backend": "llamacpp",
            "model_path": str(models["large"]),
            "memory_mb": 140,
            "options": {"n_ctx": 512},
        },
        {"model_id": "demo-missing", "backend": "llamacpp", "model_path": "/nonexistent/x.gguf"},
        {"model_id": "tiny:1b"},
    ]
    return make_stack(entries)  # type: ignore[no-any-return]


def test_stack_serves_the_demo_model(stack: Stack) -> None:
    m = stack.load("demo-small")
    assert m["memory_source"] == "measured" and m["memory_mb"] > 20
    for url in (f"http://127.0.0.1:{m['port']}", stack.url):
        r = requests.post(
            url + "/v1/chat/completions",
            json={"model": "demo-small", "messages": MSG, "max_tokens": 5},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert 0 < r.json()["usage"]["completion_tokens"] <= 5
    health = stack.get("/health").json()
    assert health["total_memory_mb"] >= m["memory_mb"]


def test_missing_model_file_fails_with_the_path(stack: Stack) -> None:
    r = stack.post("/models/demo-missing/load", {"wait": True})
    assert r.status_code == 503
    m = stack.model("demo-missing")
    assert m["state"] == "FAILED"
    assert "/nonexistent/x.gguf" in m["last_error"]
    # The rest of the pool keeps working.
    assert stack.load("tiny:1b")["state"] == "HOT"
    stack.post("/models/tiny:1b/unload", {"wait": True})


def test_memory_limit_evicts_the_lru_model(stack: Stack) -> None:
    small = stack.load("demo-small")["memory_mb"]
    stack.post("/models/demo-small/unload", {"wait": True})
    large = stack.load("demo-large")["memory_mb"]
    stack.post("/models/demo-large/unload", {"wait": True})
    assert large > small  # measured: the larger weights are resident
    limit = max(large, 140) + 10  # fits either model, not both
    assert small + 140 > limit
    assert stack.request("PATCH", "/config", json={"memory_limit_mb": limit}).status_code == 200
    try:
        stack.load("demo-small")
        m = stack.load("demo-large")
        assert m["state"] == "HOT"
        assert stack.state("demo-small") == "COLD"
        history = stack.get("/models/demo-small/health").json()["history"]
        assert history[-2]["reason"] == "eviction"
        wait_until(lambda: stack.get("/health").json()["total_memory_mb"] <= limit, timeout=5)
    finally:
        stack.request("PATCH", "/config", json={"memory_limit_mb": 32000})


def test_a_list_of_prompts_gets_a_choice_each(models: dict[str, Path]) -> None:
    b = backend(models["small"])
    out = b.completions({"prompt": ["hello", "there you"], "max_tokens": 3}).json or {}
    assert [c["index"] for c in out["choices"]] == [0, 1]
    assert 0 < out["usage"]["completion_tokens"] <= 6  # at most 3 for each prompt
    assert out["usage"]["total_tokens"] > out["usage"]["completion_tokens"] > 0
    with pytest.raises(BackendError, match="one prompt per request when streaming"):
        b.completions({"prompt": ["a", "b"], "stream": True})


def test_logprobs_with_logits_all_streamed_and_not(models: dict[str, Path]) -> None:
    b = backend(models["small"], logits_all=True)
    msgs = [{"role": "user", "content": "hi"}]
    body = {"messages": msgs, "max_tokens": 3, "logprobs": True, "top_logprobs": 2}
    out = b.chat_completions(body).json
    assert out is not None
    content = out["choices"][0]["logprobs"]["content"]
    assert len(content) == out["usage"]["completion_tokens"]
    assert isinstance(content[0]["logprob"], float) and content[0]["logprob"] <= 0
    assert len(content[0]["top_logprobs"]) == 2
    json.dumps(out)  # plain JSON: no numpy scalar left
    stream = b.chat_completions({**body, "stream": True}).stream
    assert stream is not None
    events = sse(stream)
    stream.close()  # (the worker closes it when the answer ends)
    with_lp = [e for e in events if e["choices"] and e["choices"][0].get("logprobs")]
    assert with_lp and isinstance(
        with_lp[0]["choices"][0]["logprobs"]["content"][0]["logprob"], float
    )
    done = b.completions({"prompt": "a", "max_tokens": 2, "logprobs": 2}).json
    assert done is not None
    lp = done["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == done["usage"]["completion_tokens"] and lp["top_logprobs"][0]


def test_logprobs_without_logits_all_or_out_of_range_is_a_400(models: dict[str, Path]) -> None:
    plain = backend(models["small"])
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(BackendError, match=r"options\.logits_all: true") as info:
        plain.chat_completions({"messages": msgs, "logprobs": True})
    assert info.value.status == 400 and info.value.message.startswith("logprobs: ")
    assert plain.chat_completions({"messages": msgs, "max_tokens": 1, "logprobs": False}).json
    full = backend(models["small"], logits_all=True)
    for bad, name in (
        ({"logprobs": "yes"}, "logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
    ):
        with pytest.raises(BackendError, match=f"^{name}: "):
            full.chat_completions({"messages": msgs, **bad})
    with pytest.raises(BackendError, match=r"^logprobs: "):
        full.completions({"prompt": "a", "logprobs": 6})


def test_a_missing_smollm2_file_says_how_to_fetch_it(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="modelpool fetch-model") as info:
        backend(tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert info.value.message.startswith("model file not found: ")
