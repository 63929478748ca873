"""A storm of requests for a model that loads slowly: the control API keeps answering."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import requests

from tests.ollama_standin import OllamaStandin
from tests.stack import Stack

STORM = 300
LOAD_SECONDS = 4.0


@pytest.fixture(scope="module")
def slow_ollama() -> Iterator[OllamaStandin]:
    server = OllamaStandin(load_delay=LOAD_SECONDS)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def storm_stack(slow_ollama: OllamaStandin) -> Iterator[Stack]:
    yield from Stack([{"model_id": "tiny:1b"}], ollama_url=slow_ollama.url).running()


def test_a_storm_of_waiters_never_starves_the_control_api(storm_stack: Stack) -> None:
    """Regression: 256 threads served streams, load waiters and the API alike; waiters for a
    slow load could take them all and /health, /unload stopped answering.

    Deterministic enough: the load takes 4 s by construction, and all 300 requests are sent
    within it (they are started before the load and the test waits for them to be queued).
    """
    s = storm_stack
    results: list[tuple[int, str | None]] = []
    lock = threading.Lock()
    body = {"model": "tiny:1b", "messages": [{"role": "user", "content": "hi"}]}

    def one() -> None:
        try:
            r = requests.post(s.url + "/v1/chat/completions", json=body, timeout=60)
            item = (r.status_code, r.headers.get("Retry-After"))
        except requests.RequestException as exc:
            item = (0, repr(exc))
        with lock:
            results.append(item)

    threads = [threading.Thread(target=one, daemon=True) for _ in range(STORM)]
    started = time.monotonic()
    for t in threads:
        t.start()
    worst = 0.0
    while time.monotonic() - started < LOAD_SECONDS + 1:
        t0 = time.monotonic()
        r = requests.get(s.url + "/health", timeout=5)
        worst = max(worst, time.monotonic() - t0)
        assert r.status_code == 200
        time.sleep(0.2)
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a request hung"
    assert worst < 1.0, f"/health took {worst:.2f} s during the storm"
    codes = sorted({c for c, _ in results})
    assert len(results) == STORM and set(codes) <= {200, 503}, codes
    ok = sum(1 for c, _ in results if c == 200)
    refused = [ra for c, ra in results if c == 503]
    assert ok >= 256, f"only {ok} served"  # max_queue_per_model waited and were served
    assert refused and all(ra is not None for ra in refused), "the rest got 503 + Retry-After"
    assert s.post("/models/tiny:1b/unload", {"wait": True}).status_code == 200
