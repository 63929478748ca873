"""End to end: who is evicted when the pool is full (priority, residency), on a real stack with
the Ollama stand-in and one model slot."""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import pytest
import requests

from tests.ollama_standin import OllamaStandin
from tests.stack import Stack, wait_until

RESIDENT = 3.0
TINY = {"upstream_model": "tiny:1b", "ttl_minutes": 30}


@pytest.fixture(scope="module")
def stack(make_stack: Any) -> Stack:
    models = [
        {"model_id": "boss", "priority": "high", **TINY},
        {"model_id": "intern", "priority": "low", **TINY},
        {"model_id": "a", **TINY},
        {"model_id": "b", **TINY},
        {"model_id": "c", **TINY},
        {"model_id": "d", **TINY},
    ]
    # A fixed residency (not a multiple of the stand-in's quick loads): what the tests count on.
    settings = {
        "max_concurrent_models": 1,
        "min_resident_seconds": RESIDENT,
        "resident_load_multiple": 0,
    }
    return make_stack(models, settings)  # type: ignore[no-any-return]


def chat(stack: Stack, model: str) -> Any:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return stack.post("/v1/chat/completions", body)


def unload_all(stack: Stack) -> None:
    for m in stack.get("/models").json()["models"]:
        if m["state"] in ("HOT", "COOLING"):
            stack.post(f"/models/{m['model_id']}/unload", {"wait": True})


def test_a_high_priority_model_is_not_evicted_for_a_low_one(stack: Stack) -> None:
    unload_all(stack)
    assert chat(stack, "boss").status_code == 200
    time.sleep(RESIDENT + 0.5)  # past its residency: only its priority protects it
    refused = chat(stack, "intern")
    assert refused.status_code == 503, refused.text
    assert "of higher priority" in refused.json()["error"]["message"]
    assert stack.state("boss") == "HOT" and stack.state("intern") == "COLD"
    # The other way round is allowed: high evicts low.
    unload_all(stack)
    assert chat(stack, "intern").status_code == 200
    time.sleep(RESIDENT + 0.5)
    assert chat(stack, "boss").status_code == 200
    assert stack.state("boss") == "HOT" and stack.state("intern") == "COLD"


def loads(stack: Stack) -> int:
    """Loads of a and b so far (the pool's own counter)."""
    text = stack.get("/metrics").text
    found = re.findall(r'^modelpool_loads_total\{model="([ab])"\} ([0-9.]+)$', text, re.M)
    assert len(found) == 2, found
    return int(sum(float(v) for _, v in found))


def test_two_models_taking_turns_over_one_slot_respect_the_residency(stack: Stack) -> None:
    unload_all(stack)
    before = loads(stack)
    began = time.monotonic()
    served, refused = 0, 0
    waits: list[float] = []
    # Agents asking for a, b, a, b, ... as fast as they can, for three residencies and more.
    i = 0
    while time.monotonic() - began < 3 * RESIDENT + 1:
        resp = chat(stack, "ab"[i % 2])
        i += 1
        if resp.status_code == 200:
            served += 1
        else:
            assert resp.status_code == 503, resp.text
            assert "min_resident_seconds" in resp.json()["error"]["message"]
            waits.append(float(resp.headers["Retry-After"]))
            refused += 1
        time.sleep(0.05)
    elapsed = time.monotonic() - began
    switches = loads(stack) - before
    # Each switch needs the model in the slot to have been resident for RESIDENT seconds:
    # without residency, each of the 40 requests would have evicted the other model.
    assert 2 <= switches <= elapsed / RESIDENT + 1, (switches, elapsed, i)
    assert served >= i // 3 and refused > i // 3, (served, refused, i)
    assert all(0 < w <= RESIDENT + 1 for w in waits), waits


def test_requests_that_find_no_room_wait_and_are_served_in_arrival_order(stack: Stack) -> None:
    unload_all(stack)
    patched = stack.request("PATCH", "/config", {"capacity_wait_seconds": 30})
    assert patched.status_code == 200, patched.text
    try:
        lease = stack.post("/models/a/leases", {"seconds": 120, "holder": "test"})
        assert lease.status_code == 201, lease.text
        stack.wait_state("a", "HOT")
        done: dict[str, float] = {}
        codes: dict[str, int] = {}

        def ask(model: str) -> None:
            codes[model] = chat(stack, model).status_code
            done[model] = time.monotonic()

        threads = []
        for model in ("b", "c", "d"):  # no room: a is leased
            t = threading.Thread(target=ask, args=(model,))
            t.start()
            threads.append(t)
            time.sleep(0.3)
        assert not done  # all three wait
        ended = stack.request("DELETE", f"/models/a/leases/{lease.json()['lease_id']}")
        assert ended.status_code == 204
        for t in threads:
            t.join(60)
        assert codes == {"b": 200, "c": 200, "d": 200}
        # Served in arrival order, each after the one before had been resident long enough.
        assert done["b"] < done["c"] < done["d"]
        assert done["d"] - done["c"] >= RESIDENT - 0.5
    finally:
        stack.request("PATCH", "/config", {"capacity_wait_seconds": 0})


def drift_count(stack: Stack, model: str) -> float:
    text = stack.get("/metrics").text
    found = re.findall(rf'^modelpool_backend_drift_total{{model="{model}"}} ([0-9.]+)$', text, re.M)
    assert len(found) == 1, found
    return float(found[0])


def test_a_model_ollama_dropped_behind_the_pools_back_is_pinned_again(
    stack: Stack, standin: OllamaStandin
) -> None:
    unload_all(stack)
    assert chat(stack, "a").status_code == 200
    assert "tiny:1b" in standin.loaded
    before = drift_count(stack, "a")
    # Another client of the same Ollama unloads the model (keep_alive 0).
    requests.post(
        standin.url + "/api/generate", json={"model": "tiny:1b", "keep_alive": 0}, timeout=10
    ).raise_for_status()
    assert "tiny:1b" not in standin.loaded
    # Within a reaper pass (a second) the pool notices and pins it again, forever.
    wait_until(lambda: "tiny:1b" in standin.loaded, 5)
    assert standin.loaded["tiny:1b"] is None  # keep_alive -1: no expiry
    assert drift_count(stack, "a") == before + 1
    assert stack.state("a") == "HOT"
    assert chat(stack, "a").status_code == 200
