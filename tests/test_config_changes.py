"""Changes to a running stack's config reach its workers: key rotation, changed entries."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import yaml

from tests.ollama_standin import OllamaStandin
from tests.stack import Stack, wait_until
from tests.test_faults import chat, kill_control_plane


def test_api_key_rotation_reaches_running_workers(make_stack: Any) -> None:
    """Regression: a worker kept the key it was started with, so after a PATCH of api_key the
    front door's requests with the new key got 401 from it.

    Deterministic: the rotation is one PATCH; every check after it is a plain request.
    """
    s: Stack = make_stack([{"model_id": "tiny:1b", "warmup": True}], {"api_key": "k1"})
    k1, k2 = {"Authorization": "Bearer k1"}, {"Authorization": "Bearer k2"}
    m = wait_until(
        lambda: (
            (r := requests.get(s.url + "/models/tiny:1b", headers=k1, timeout=5).json())["state"]
            == "HOT"
            and r
        )
    )
    worker = f"http://127.0.0.1:{m['port']}"
    pid = requests.get(worker + "/health", timeout=5).json()["pid"]
    assert chat(s.url, "tiny:1b", "k1").status_code == 200
    r = requests.patch(s.url + "/config", json={"api_key": "k2"}, headers=k1, timeout=10)
    assert r.status_code == 200, r.text
    # The new key works everywhere, at once, without reloading the model.
    assert chat(s.url, "tiny:1b", "k2").status_code == 200
    assert chat(worker, "tiny:1b", "k2").status_code == 200
    assert requests.get(worker + "/health", timeout=5).json()["pid"] == pid
    # The old key works nowhere.
    assert chat(s.url, "tiny:1b", "k1").status_code == 401
    assert chat(worker, "tiny:1b", "k1").status_code == 401
    assert requests.get(s.url + "/models", headers=k1, timeout=5).status_code == 401
    # The key is not written into the worker's spec; its file is private.
    key_file = s.run_dir / "api_key"
    assert key_file.read_text() == "k2" and key_file.stat().st_mode & 0o077 == 0
    specs = [json.loads(p.read_text()) for p in (s.run_dir / "specs").glob("*.json")]
    assert specs and all(sp["api_key"] == "" for sp in specs)
    # Turning auth off opens the workers too.
    r = requests.patch(s.url + "/config", json={"api_key": ""}, headers=k2, timeout=10)
    assert r.status_code == 200
    assert chat(worker, "tiny:1b").status_code == 200


@pytest.fixture()
def second_ollama() -> Iterator[OllamaStandin]:
    server = OllamaStandin(reply="from the second ollama")
    server.start()
    yield server
    server.stop()


def test_a_changed_setting_drains_and_reloads_the_worker(
    make_stack: Any, second_ollama: OllamaStandin
) -> None:
    """Regression: after ollama_base_url changed, loaded workers kept the old one.

    Deterministic: the reload is waited for by polling the model's port and state.
    """
    s: Stack = make_stack([{"model_id": "tiny:1b", "ttl_minutes": 30}])
    before = s.load("tiny:1b")
    r = s.request("PATCH", "/config", {"ollama_base_url": second_ollama.url})
    assert r.status_code == 200, r.text
    after = wait_until(
        lambda: (m := s.model("tiny:1b"))["state"] == "HOT" and m["pid"] != before["pid"] and m,
        timeout=30,
    )
    reply = chat(s.url, "tiny:1b").json()["choices"][0]["message"]["content"]
    assert reply == "from the second ollama"
    assert after["state"] == "HOT"
    metrics = s.get("/metrics").text
    assert 'modelpool_unloads_total{model="tiny:1b",reason="config_changed"} 1.0' in metrics


def test_an_entry_edited_in_the_file_is_reloaded_after_a_restart(make_stack: Any) -> None:
    """Regression: adoption compared only the model id, so an edited entry's old worker kept
    serving after a control-plane restart.

    Deterministic: the restart is a SIGKILL of the control plane, waited for by polling.
    """
    s: Stack = make_stack([{"model_id": "tiny:1b", "ttl_minutes": 30}])
    before = s.load("tiny:1b")
    registry = s.config_dir / "model_pool_registry.yaml"
    data = yaml.safe_load(registry.read_text())
    data["models"][0]["options"] = {"num_ctx": 4096}
    registry.write_text(yaml.safe_dump(data))
    kill_control_plane(s)
    after = wait_until(
        lambda: (m := s.model("tiny:1b"))["state"] == "HOT" and m["pid"] != before["pid"] and m,
        timeout=30,
    )
    spec = json.loads(next((s.run_dir / "specs").glob("*.json")).read_text())
    assert spec["options"] == {"num_ctx": 4096} and spec["port"] == after["port"]
    health = requests.get(f"http://127.0.0.1:{after['port']}/health", timeout=5).json()
    assert health["fingerprint"] != ""
    # An unchanged entry is adopted as it is, not reloaded.
    kill_control_plane(s)
    again = s.wait_state("tiny:1b", "HOT", timeout=30)
    assert again["pid"] == after["pid"]


def test_an_entry_replaced_through_the_api_is_reloaded_only_when_it_must(make_stack: Any) -> None:
    s: Stack = make_stack([{"model_id": "tiny:1b", "ttl_minutes": 30}])
    before = s.load("tiny:1b")
    registry = s.config_dir / "model_pool_registry.yaml"
    # A TTL change applies without a reload.
    r = s.request("PUT", "/models/tiny:1b", {"model_id": "tiny:1b", "ttl_minutes": 20})
    assert r.status_code == 200, r.text
    assert r.json()["updated"] == "tiny:1b"
    assert yaml.safe_load(registry.read_text())["models"][0]["ttl_minutes"] == 20
    time.sleep(1.5)  # more than one reaper pass: nothing may happen
    assert s.model("tiny:1b")["pid"] == before["pid"]
    # Bad input changes nothing.
    text = registry.read_text()
    r = s.request("PUT", "/models/tiny:1b", {"model_id": "other:1b"})
    assert r.status_code == 400 and "differs from the path" in r.json()["error"]["message"]
    r = s.request("PUT", "/models/tiny:1b", {"options": "x"})
    assert r.status_code == 400 and "model.options" in r.json()["error"]["message"]
    assert s.request("PUT", "/models/nope:1b", {"ttl_minutes": 5}).status_code == 404
    assert registry.read_text() == text
    # A change of what the worker serves drains and reloads it.
    r = s.request("PUT", "/models/tiny:1b", {"options": {"num_ctx": 2048}, "ttl_minutes": 20})
    assert r.status_code == 200, r.text
    after = wait_until(
        lambda: (m := s.model("tiny:1b"))["state"] == "HOT" and m["pid"] != before["pid"] and m,
        timeout=30,
    )
    spec = json.loads(next((s.run_dir / "specs").glob("*.json")).read_text())
    assert spec["options"] == {"num_ctx": 2048} and after["port"] == spec["port"]


def test_a_worker_that_does_not_read_the_key_file_is_replaced_at_adoption(
    make_stack: Any,
) -> None:
    """A worker started by an earlier version (its key fixed in its spec) could not follow a
    key rotation: a restarted control plane replaces it instead of adopting it as it is."""
    s: Stack = make_stack([{"model_id": "tiny:1b", "ttl_minutes": 30}])
    before = s.load("tiny:1b")
    spec_path = next((s.run_dir / "specs").glob("*.json"))
    spec = json.loads(spec_path.read_text())
    spec.update(api_key="old-key", api_key_file="")
    spec_path.write_text(json.dumps(spec))
    kill_control_plane(s)
    after = wait_until(
        lambda: (m := s.model("tiny:1b"))["state"] == "HOT" and m["pid"] != before["pid"] and m,
        timeout=30,
    )
    assert json.loads(next((s.run_dir / "specs").glob("*.json")).read_text())["api_key_file"]
    assert after["port"] is not None
