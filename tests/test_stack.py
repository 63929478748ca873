"""End to end: real supervisord, gunicorn control plane and workers, the Ollama stand-in.

Times are seconds (TTL minutes are floats), and waits poll; nothing here sleeps to a fixed clock.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

import openai
import pytest
import requests
import yaml

from tests.ollama_standin import OllamaStandin
from tests.stack import Stack, processes_mentioning, wait_until

MODELS: list[dict[str, Any]] = [
    {"model_id": "qwen2.5-coder:7b", "memory_mb": 4700},
    {"model_id": "llama3.1:8b", "ttl_minutes": 0.05},  # 3 s TTL
    {"model_id": "tiny:1b", "ttl_minutes": 0.05},
    {"model_id": "library/llama3.1:8b", "upstream_model": "llama3.1:8b", "memory_mb": 100},
]


@pytest.fixture(scope="module")
def stack(make_stack: Any) -> Stack:
    return make_stack(MODELS)  # type: ignore[no-any-return]


def chat(port: int, model: str, content: str = "hello there", **extra: Any) -> requests.Response:
    return requests.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": content}], **extra},
        timeout=30,
    )


def test_health_and_supervisorctl(stack: Stack) -> None:
    health = stack.get("/health").json()
    assert health["status"] == "healthy" and health["supervisord"] == "ok"
    assert health["total_models"] == len(MODELS)
    assert health["available_ports"] == stack.port_end - stack.port_start + 1
    for key in ("active_models", "total_memory_mb"):
        assert key in health
    out = wait_until(lambda: (o := stack.supervisorctl("status").stdout) and "RUNNING" in o and o)
    assert out.split()[:2] == ["controlplane", "RUNNING"]


def test_load_serve_and_count_direct_requests(stack: Stack, standin: OllamaStandin) -> None:
    m = stack.load("qwen2.5-coder:7b")
    assert m["state"] == "HOT" and stack.port_start <= m["port"] <= stack.port_end
    assert m["endpoint"] == f"http://127.0.0.1:{m['port']}"
    # The worker pinned the model in Ollama through the native API.
    loads = [c for c in standin.calls_to("/api/generate") if c.body.get("keep_alive") == -1]
    assert loads and loads[-1].body["model"].startswith("qwen2.5-coder:7b")
    assert m["program"] in stack.supervisorctl("status").stdout
    health = requests.get(f"http://127.0.0.1:{m['port']}/health", timeout=5).json()
    assert health["status"] == "ready" and health["model"] == "qwen2.5-coder:7b"
    assert health["port"] == m["port"]

    before = stack.model("qwen2.5-coder:7b")
    resp = chat(m["port"], "qwen2.5-coder:7b")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] > 0
    # A request straight to the worker's port counts and resets the TTL within about a second.
    after = wait_until(
        lambda: (x := stack.model("qwen2.5-coder:7b"))["requests"] == before["requests"] + 1 and x,
        timeout=3,
    )
    assert after["deadline"] > before["deadline"]
    # Memory comes from Ollama's own report (/api/ps), not the registry estimate.
    assert after["memory_source"] == "measured" and after["memory_mb"] > 0


def test_openai_client_chats_and_streams_through_a_worker_port(stack: Stack) -> None:
    m = stack.load("qwen2.5-coder:7b")
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{m['port']}/v1", api_key="unused")
    answer = client.chat.completions.create(
        model="qwen2.5-coder:7b", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert answer.choices[0].message.content and answer.usage is not None
    assert answer.usage.completion_tokens == 3
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="qwen2.5-coder:7b", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        if c.choices
    ]
    assert len(pieces) > 2 and "".join(pieces).strip()
    done = client.completions.create(model="qwen2.5-coder:7b", prompt="def f(", max_tokens=2)
    assert done.choices[0].text
    assert [x.id for x in client.models.list()] == ["qwen2.5-coder:7b"]
    # In flight is back to zero once the stream is closed.
    wait_until(lambda: stack.model("qwen2.5-coder:7b")["in_flight"] == 0, timeout=3)


def test_full_lifecycle_with_short_ttl(stack: Stack, standin: OllamaStandin) -> None:
    m = stack.load("llama3.1:8b")
    program, port = m["program"], m["port"]
    seen: list[str] = []

    def watch() -> bool:
        st = stack.state("llama3.1:8b")
        if not seen or seen[-1] != st:
            seen.append(st)
        return st == "COLD"

    wait_until(watch, timeout=20)
    assert seen == ["HOT", "COOLING", "UNLOADING", "COLD"] or seen == ["HOT", "COOLING", "COLD"]
    cold = stack.model("llama3.1:8b")
    assert cold["port"] is None and cold["endpoint"] is None
    # The worker is gone, supervisord forgot it, the port is free, Ollama was told to unload.
    assert program not in stack.supervisorctl("status").stdout
    assert not processes_mentioning(str(stack.run_dir / "specs" / f"{program}.json"))
    with socket.socket() as s:  # free for a new server (which, like gunicorn, reuses addresses)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
    unloads = [c for c in standin.calls_to("/api/generate") if c.body.get("keep_alive") == 0]
    assert any(c.body["model"].startswith("llama3.1:8b") for c in unloads)
    history = stack.get("/models/llama3.1:8b/health").json()["history"]
    assert [h["to"] for h in history][-4:] == ["HOT", "COOLING", "UNLOADING", "COLD"]
    assert history[-1]["reason"] == "ttl"


def test_request_in_grace_period_brings_model_back_to_hot(stack: Stack) -> None:
    m = stack.load("tiny:1b")
    cooling = stack.wait_state("tiny:1b", "COOLING", timeout=10)
    assert cooling["ttl_remaining_minutes"] == 0
    assert chat(m["port"], "tiny:1b").status_code == 200
    back = stack.wait_state("tiny:1b", "HOT", timeout=3)
    assert back["port"] == m["port"]
    history = stack.get("/models/tiny:1b/health").json()["history"]
    assert [h["to"] for h in history][-2:] == ["COOLING", "HOT"]
    stack.post("/models/tiny:1b/unload", {"wait": True})


def test_concurrent_first_loads_start_one_worker(stack: Stack) -> None:
    model = "library/llama3.1:8b"
    program = stack.model(model)["program"]
    results: list[int] = []

    def load() -> None:
        r = stack.post(f"/models/{model}/load", {"wait": True})
        results.append(r.status_code)

    threads = [threading.Thread(target=load) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [200] * 20
    assert stack.spawn_count(program) == 1
    assert stack.state(model) == "HOT"
    # Model ids with '/' work URL-encoded too.
    assert stack.get("/models/library%2Fllama3.1%3A8b").json()["state"] == "HOT"
    assert (
        stack.post("/models/library%2Fllama3.1%3A8b/unload", {"wait": True}).json()["state"]
        == "COLD"
    )


def test_extend_ttl_clamps_to_max(stack: Stack) -> None:
    stack.load("qwen2.5-coder:7b")
    r = stack.post("/models/qwen2.5-coder:7b/extend-ttl", {"minutes": 10})
    assert r.status_code == 200 and not r.json()["clamped"]
    r = stack.post("/models/qwen2.5-coder:7b/extend-ttl", {"minutes": 1000})
    body = r.json()
    assert body["clamped"] and 59.9 <= body["ttl_remaining_minutes"] <= 60
    for bad in ({"minutes": -1}, {"minutes": "x"}, {}):
        r = stack.post("/models/qwen2.5-coder:7b/extend-ttl", bad)
        assert r.status_code == 400 and "minutes" in r.json()["error"]["message"]
    r = stack.post("/models/tiny:1b/extend-ttl", {"minutes": 1})
    assert r.status_code == 409


def test_sigkilled_worker_is_noticed(stack: Stack) -> None:
    m = stack.load("qwen2.5-coder:7b")
    pid = m["pid"]
    assert pid and pid > 1
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    failed = stack.wait_state("qwen2.5-coder:7b", "FAILED", "WARMING", timeout=5)
    assert time.monotonic() - killed < 2.5
    assert failed["state"] != "HOT"
    assert "exit" in (failed["last_error"] or "") or failed["state"] == "WARMING"
    # The killed master's gunicorn child does not linger holding the port or the model.
    wait_until(
        lambda: not processes_mentioning(str(stack.run_dir / "specs" / f"{m['program']}.json")),
        timeout=10,
    )
    # It loads again on the next call.
    again = stack.load("qwen2.5-coder:7b")
    assert again["state"] == "HOT" and again["pid"] != pid


def test_errors_in_the_openai_shape(stack: Stack) -> None:
    r = stack.post("/models/nope:1b/load")
    assert r.status_code == 404
    err = r.json()["error"]
    assert set(err) == {"message", "type", "code"} and "nope:1b" in err["message"]
    r = stack.request("POST", "/models/qwen2.5-coder:7b/load", json=None)
    assert r.status_code in (200, 202)
    r = requests.post(
        stack.url + "/models/register",
        data="{not json",
        timeout=5,
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_register_and_delete_are_persisted(stack: Stack) -> None:
    r = stack.post(
        "/models/register",
        {"model_id": "new:1b", "upstream_model": "tiny:1b", "tags": ["x"], "ttl_minutes": 1},
    )
    assert r.status_code == 201, r.text
    assert stack.post("/models/register", {"model_id": "new:1b"}).status_code == 409
    bad = stack.post("/models/register", {"model_id": "bad\nid"})
    assert bad.status_code == 400 and "model_id" in bad.json()["error"]["message"]
    saved = yaml.safe_load((stack.config_dir / "model_pool_registry.yaml").read_text())
    assert "new:1b" in [m["model_id"] for m in saved["models"]]
    stack.load("new:1b")
    r = stack.request("DELETE", "/models/new:1b")
    assert r.status_code == 200
    assert stack.get("/models/new:1b").status_code == 404
    saved = yaml.safe_load((stack.config_dir / "model_pool_registry.yaml").read_text())
    assert "new:1b" not in [m["model_id"] for m in saved["models"]]


def test_patch_config_validates_and_applies_live(stack: Stack) -> None:
    before = stack.get("/config").json()
    file_before = (stack.config_dir / "model_pool_config.yaml").read_text()
    r = stack.request("PATCH", "/config", json={"max_concurrent_models": 0})
    assert r.status_code == 400
    assert "max_concurrent_models: 0 is below the minimum 1" in r.json()["error"]["message"]
    r = stack.request("PATCH", "/config", json={"port_range": {"start": 10, "end": 5}})
    assert r.status_code == 400 and "port_range.end" in r.json()["error"]["message"]
    r = stack.request("PATCH", "/config", json={"bogus": 1})
    assert r.status_code == 400 and "bogus: unknown key" in r.json()["error"]["message"]
    assert stack.get("/config").json() == before
    assert (stack.config_dir / "model_pool_config.yaml").read_text() == file_before
    r = stack.request("PATCH", "/config", json={"default_ttl_minutes": 7.5})
    assert r.status_code == 200 and r.json()["config"]["default_ttl_minutes"] == 7.5
    assert stack.get("/config").json()["default_ttl_minutes"] == 7.5
    assert (
        yaml.safe_load((stack.config_dir / "model_pool_config.yaml").read_text())[
            "default_ttl_minutes"
        ]
        == 7.5
    )


def test_metrics(stack: Stack) -> None:
    text = stack.get("/metrics").text
    assert 'modelpool_models{state="HOT"}' in text
    assert 'modelpool_model_state{model="qwen2.5-coder:7b",state=' in text
    assert "modelpool_ports_available" in text


def test_cli_against_a_running_stack(stack: Stack) -> None:
    out = stack.cli("load", "tiny:1b", check=True).stdout
    assert "HOT on port" in out
    out = stack.cli("status", check=True).stdout
    assert out.splitlines()[0].split()[:3] == ["MODEL", "STATE", "PORT"]
    assert any(line.startswith("tiny:1b") and "HOT" in line for line in out.splitlines())
    js = stack.cli("status", "--json", check=True).stdout
    assert '"model_id": "tiny:1b"' in js
    out = stack.cli("extend-ttl", "tiny:1b", "2", check=True).stdout
    assert out.startswith("tiny:1b:")
    out = stack.cli("logs", "tiny:1b", "-n", "5", check=True).stdout
    assert out.strip()
    out = stack.cli("unload", "tiny:1b", check=True).stdout
    assert "COLD" in out
    bad = stack.cli("load", "nope:1b")
    assert bad.returncode == 1 and "nope:1b" in bad.stderr
    down = stack.cli("--url", "http://127.0.0.1:9", "status")
    assert down.returncode == 3 and "not reachable" in down.stderr


def test_control_plane_restart_adopts_running_workers(stack: Stack) -> None:
    m = stack.load("qwen2.5-coder:7b")
    stack.post("/models/qwen2.5-coder:7b/extend-ttl", {"minutes": 20})
    m = stack.model("qwen2.5-coder:7b")
    old_pid = stack.get("/health").json()["pid"]
    cp_pid = int(stack.supervisorctl("pid", "controlplane").stdout.strip())
    os.kill(cp_pid, signal.SIGKILL)

    def adopted() -> dict[str, Any] | None:
        # Until the orphaned old worker notices its master is gone it may still answer.
        try:
            if stack.get("/health", timeout=2).json()["pid"] == old_pid:
                return None
            x = stack.model("qwen2.5-coder:7b")
        except (requests.RequestException, ValueError):
            return None
        return x if x["state"] == "HOT" else None

    after = wait_until(adopted, timeout=20)
    assert after["pid"] == m["pid"] and after["port"] == m["port"]
    assert after["deadline"] == pytest.approx(m["deadline"], abs=1.0)
    assert stack.spawn_count(m["program"]) >= 1
    history = stack.get("/models/qwen2.5-coder:7b/health").json()["history"]
    assert history[-1]["reason"] == "adopted"


def test_supervisorctl_stop_is_an_unload(stack: Stack) -> None:
    m = stack.load("tiny:1b")
    out = stack.supervisorctl("stop", m["program"]).stdout
    assert "stopped" in out
    cold = stack.wait_state("tiny:1b", "COLD", timeout=10)
    assert cold["last_error"] is None
    history = stack.get("/models/tiny:1b/health").json()["history"]
    assert history[-1]["reason"] == "operator"
    assert m["program"] not in stack.supervisorctl("status").stdout


def test_orphaned_worker_is_removed(stack: Stack) -> None:
    """A model program that no model owns (left by hand, or by a crash) is swept away."""
    orphan = "model-orphan-00000000"
    spec = stack.run_dir / "specs" / f"{orphan}.json"
    port = stack.port_end - 1
    spec.write_text(
        json.dumps(
            {
                "model_id": "tiny:1b",
                "port": port,
                "backend": "ollama",
                "ollama_base_url": "http://127.0.0.1:9",
            }
        )
    )
    conf = stack.run_dir / "conf.d" / f"{orphan}.conf"
    conf.write_text(
        f"[program:{orphan}]\ncommand={sys.executable} -m http.server {port} --bind 127.0.0.1\n"
        "autostart=false\nautorestart=false\nstartsecs=0\n"
    )
    assert stack.supervisorctl("update").returncode == 0
    assert "started" in stack.supervisorctl("start", orphan).stdout
    wait_until(lambda: orphan not in stack.supervisorctl("status").stdout, timeout=10)
    assert not conf.exists() and not spec.exists()


def test_the_seeds_curl_examples_need_no_content_type(stack: Stack) -> None:
    """curl -d sends application/x-www-form-urlencoded; the seed's examples rely on JSON anyway."""
    m = stack.load("qwen2.5-coder:7b")
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    body = json.dumps({"model": "qwen2.5-coder:7b", "messages": [{"role": "user", "content": "x"}]})
    for url in (f"http://127.0.0.1:{m['port']}", stack.url):
        r = requests.post(url + "/v1/chat/completions", data=body, headers=form, timeout=30)
        assert r.status_code == 200, r.text
    r = requests.post(
        stack.url + "/models/qwen2.5-coder:7b/extend-ttl",
        data='{"minutes": 30}',
        headers=form,
        timeout=10,
    )
    assert r.status_code == 200 and r.json()["ttl_remaining_minutes"] > 29
