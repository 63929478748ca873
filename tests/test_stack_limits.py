"""End to end: warmup models, port allocation, eviction at the limits, config errors, down."""

from __future__ import annotations

import socket
import subprocess
import sys
from typing import Any

import pytest

from tests.stack import ROOT, Stack, processes_mentioning, wait_until


def models(stack: Stack) -> list[dict[str, Any]]:
    tiny = {"upstream_model": "tiny:1b", "ttl_minutes": 30}
    return [
        {"model_id": "qwen2.5-coder:7b", "warmup": True, "memory_mb": 1000},
        {"model_id": "llama3.1:8b", "warmup": True, "ttl_minutes": 0.01},
        {"model_id": "short", "upstream_model": "tiny:1b", "ttl_minutes": 0.02},
        {"model_id": "a", **tiny},
        {"model_id": "b", **tiny},
        {"model_id": "pinned", **tiny, "port": stack.port_end},
    ]


@pytest.fixture(scope="module")
def stack(make_stack: Any) -> Stack:
    return make_stack(models, {"max_concurrent_models": 4, "grace_period_minutes": 0.01})  # type: ignore[no-any-return]


def test_warmup_models_load_at_start_on_the_first_ports(stack: Stack) -> None:
    w1 = stack.wait_state("qwen2.5-coder:7b", "HOT")
    w2 = stack.wait_state("llama3.1:8b", "HOT")
    assert (w1["port"], w2["port"]) == (stack.port_start, stack.port_start + 1)
    assert w1["warmup"] and w1["expires"] is False and w1["ttl_remaining_minutes"] == 0


def test_foreign_port_is_skipped_and_warmups_outlive_short_ttls(stack: Stack) -> None:
    foreign = stack.port_start + 2  # the lowest free port right now
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", foreign))
        holder.listen()
        m = stack.load("short")
        assert m["port"] == stack.port_start + 3
    # "short" expires (1.2 s TTL + 0.6 s grace) ...
    stack.wait_state("short", "COLD", timeout=15)
    # ... while the warmup models, one of them with an even shorter ttl_minutes, stay HOT.
    for w in ("qwen2.5-coder:7b", "llama3.1:8b"):
        m = stack.model(w)
        assert m["state"] == "HOT"
        history = stack.get(f"/models/{w}/health").json()["history"]
        assert "COOLING" not in [h["to"] for h in history]


def test_pinned_port(stack: Stack) -> None:
    assert stack.load("pinned")["port"] == stack.port_end
    stack.post("/models/pinned/unload", {"wait": True})


def test_eviction_of_the_lru_model_at_the_model_limit(stack: Stack) -> None:
    stack.load("a")
    stack.load("b")
    assert stack.get("/health").json()["active_models"] == 4
    # "a" is the least recently used idle non-warmup model: loading a fifth evicts it.
    m = stack.load("pinned")
    assert m["state"] == "HOT"
    assert stack.state("a") == "COLD" and stack.state("b") == "HOT"
    history = stack.get("/models/a/health").json()["history"]
    assert history[-2]["reason"] == "eviction"
    assert stack.get("/health").json()["active_models"] == 4


def test_memory_limit_refuses_what_cannot_fit(stack: Stack) -> None:
    r = stack.request("PATCH", "/config", json={"memory_limit_mb": 500})
    assert r.status_code == 200
    try:
        r = stack.post("/models/a/load", {"wait": True})
        # Warmup qwen (1000 MB estimate) alone is over the limit: nothing can be evicted.
        assert r.status_code == 503 and "Retry-After" in r.headers
        assert "memory" in r.json()["error"]["message"]
        assert stack.state("a") == "COLD"
    finally:
        stack.request("PATCH", "/config", json={"memory_limit_mb": 32000})


def test_bad_config_is_refused_at_start_naming_the_key(tmp_path: Any) -> None:
    (tmp_path / "model_pool_config.yaml").write_text("grace_period_minutes: -2\n")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "controlplane.cli",
            "--config-dir",
            str(tmp_path),
            "--run-dir",
            str(tmp_path / "run"),
            "up",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert run.returncode == 2
    assert "grace_period_minutes: -2 is below the minimum 0" in run.stderr
    assert not processes_mentioning(str(tmp_path))


def test_down_drains_and_leaves_no_process(make_stack: Any, standin: Any) -> None:
    s: Stack = make_stack([{"model_id": "tiny:1b"}])
    m = s.load("tiny:1b")
    assert processes_mentioning(str(s.root))
    out = s.cli("down", check=True).stdout
    assert "down" in out
    assert not processes_mentioning(str(s.root))
    with socket.socket() as sock:  # free for a new server (which reuses addresses)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", m["port"]))
    # The worker told Ollama to let the model go.
    calls = standin.calls_to("/api/generate")
    unloads = [c for c in calls if (c.body or {}).get("keep_alive") == 0]
    assert any(c.body["model"].startswith("tiny:1b") for c in unloads)


def test_a_forced_unload_still_lets_go_of_the_model_in_ollama(
    make_stack: Any, standin: Any
) -> None:
    """A forced stop sends the worker's master a QUIT and then supervisord's TERM: the worker
    lets go of its model in Ollama all the same (the second signal does not cut it short)."""
    s: Stack = make_stack([{"model_id": "forced", "upstream_model": "tiny:1b"}])
    for _ in range(3):
        s.load("forced")
        before = len(standin.calls_to("/api/generate"))

        def released(before: int = before) -> bool:
            return any(
                (c.body or {}).get("keep_alive") == 0
                for c in standin.calls_to("/api/generate")[before:]
            )

        resp = s.post("/models/forced/unload", {"force": True, "wait": True})
        assert resp.status_code == 200 and resp.json()["state"] == "COLD", resp.text
        wait_until(released, 5)
