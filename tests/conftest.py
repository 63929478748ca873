"""Shared fixtures: the Ollama stand-in and real modelpool stacks."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.browser import browser  # noqa: F401  (a fixture for the page's tests)
from tests.ollama_standin import OllamaStandin
from tests.stack import Stack


@pytest.fixture(scope="module")
def standin() -> Iterator[OllamaStandin]:
    """The stand-in for Ollama (the one external service), on a free loopback port."""
    server = OllamaStandin(load_delay=0.2)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def make_stack(standin: OllamaStandin) -> Iterator[Callable[..., Stack]]:
    """Start stacks for a test module; each is brought down and checked for leaks after it."""
    stacks: list[Stack] = []

    def make(models: list[dict[str, Any]], settings: dict[str, Any] | None = None) -> Stack:
        stack = Stack(models, settings, ollama_url=standin.url)
        stacks.append(stack)
        return stack.up()

    yield make
    leaks = []
    for stack in stacks:
        leaks += stack.down()
        stack.cleanup()
    assert not leaks, f"processes left running after modelpool down: {leaks}"


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """A test must not leave a non-daemon thread of its own running."""
    before = set(threading.enumerate())
    yield
    left = [t for t in threading.enumerate() if t not in before and t.is_alive() and not t.daemon]
    assert not left, f"threads left running: {left}"


@pytest.fixture(scope="module")
def live_metrics(make_stack: Callable[..., Stack]) -> dict[str, str]:
    """/metrics of a control plane and of a worker that have served real traffic."""
    import requests

    stack = make_stack(
        [{"model_id": "tiny:1b"}, {"model_id": "missing:1b"}, {"model_id": "qwen2.5-coder:7b"}]
    )
    m = stack.load("tiny:1b")
    msg = {"model": "tiny:1b", "messages": [{"role": "user", "content": "hi"}]}
    for url in (stack.url, f"http://127.0.0.1:{m['port']}"):
        assert requests.post(url + "/v1/chat/completions", json=msg, timeout=30).status_code == 200
        r = requests.post(url + "/v1/chat/completions", json={**msg, "stream": True}, timeout=30)
        assert r.status_code == 200
    stack.post("/models/missing:1b/load", {"wait": True})  # fails: the stand-in lacks it
    stack.load("qwen2.5-coder:7b")
    stack.post("/models/qwen2.5-coder:7b/unload", {"wait": True})
    return {
        "controlplane": stack.get("/metrics").text,
        "worker": requests.get(f"http://127.0.0.1:{m['port']}/metrics", timeout=10).text,
        "controlplane_url": stack.url,
        "worker_port": str(m["port"]),
    }
