"""The client library (``modelpool``) against a live stack, and leases end to end."""

from __future__ import annotations

import time
from typing import Any

import openai
import pytest
import requests

from modelpool import (
    LoadFailed,
    ModelNotFound,
    ModelPoolClient,
    ModelPoolError,
    NoCapacity,
    PoolUnavailable,
)
from tests.ollama_standin import OllamaStandin
from tests.stack import Stack, wait_until

SHORT = "llama3.1:8b"  # a TTL of 1.2 s and a grace of 0.6 s
MODELS: list[dict[str, Any]] = [
    {"model_id": "tiny:1b"},
    {"model_id": "qwen2.5-coder:7b"},
    {"model_id": SHORT, "ttl_minutes": 0.02},
    {"model_id": "ghost:1b"},  # not known to the stand-in: its load fails
]


@pytest.fixture(scope="module")
def stack(make_stack: Any) -> Stack:
    return make_stack(  # type: ignore[no-any-return]
        MODELS, {"grace_period_minutes": 0.01, "max_concurrent_models": 2}
    )


@pytest.fixture
def client(stack: Stack) -> ModelPoolClient:
    return ModelPoolClient(stack.url)


@pytest.fixture(autouse=True)
def nothing_loaded(stack: Stack) -> None:
    """Each test starts with no lease and nothing loaded."""

    def settled() -> bool:
        models = stack.get("/models").json()["models"]
        for m in models:
            for lease in m["leases"]:
                stack.request("DELETE", f"/models/{m['model_id']}/leases/{lease['lease_id']}")
            if m["state"] in ("HOT", "COOLING"):  # (a WARMING one is unloaded once HOT)
                stack.post(f"/models/{m['model_id']}/unload", {"force": True})
        return all(m["state"] in ("COLD", "FAILED") for m in models)

    wait_until(settled, timeout=30, interval=0.2)


def test_every_method_against_a_live_stack(stack: Stack, client: ModelPoolClient) -> None:
    assert {m["model_id"] for m in client.models()} >= {"tiny:1b", SHORT}
    assert client.model("tiny:1b")["state"] == "COLD"
    hot = client.load("tiny:1b")
    assert hot["state"] == "HOT"
    extended = client.extend_ttl("tiny:1b", 30)
    assert extended["deadline"] > time.time() + 29 * 60
    endpoint = client.endpoint_for("tiny:1b")
    assert endpoint == f"http://127.0.0.1:{hot['port']}/v1"
    assert client.unload("tiny:1b")["state"] in ("UNLOADING", "COLD")
    stack.wait_state("tiny:1b", "COLD")
    # endpoint_for loads a COLD model first
    assert (
        client.endpoint_for("tiny:1b") == f"http://127.0.0.1:{client.model('tiny:1b')['port']}/v1"
    )
    entry = client.register({"model_id": "client-registered", "upstream_model": "tiny:1b"})
    assert entry["model_id"] == "client-registered"
    assert client.model("client-registered")["backend"] == "ollama"
    stack.request("DELETE", "/models/client-registered")


def test_openai_clients_on_the_front_door_and_on_a_worker(client: ModelPoolClient) -> None:
    msg = [{"role": "user", "content": "hi"}]
    front = client.openai()
    assert str(front.base_url).rstrip("/").endswith(":" + client.url.rsplit(":", 1)[1] + "/v1")
    answer = front.chat.completions.create(model="tiny:1b", messages=msg)  # type: ignore[arg-type]
    assert answer.choices[0].message.content
    worker = client.openai("tiny:1b")
    assert isinstance(worker, openai.OpenAI)
    assert str(worker.base_url).rstrip("/") == client.endpoint_for("tiny:1b")
    answer = worker.chat.completions.create(model="tiny:1b", messages=msg)  # type: ignore[arg-type]
    assert answer.choices[0].message.content


def test_typed_errors(stack: Stack, client: ModelPoolClient) -> None:
    with pytest.raises(ModelNotFound, match="no-such"):
        client.model("no-such")
    with pytest.raises(LoadFailed) as failed:
        client.load("ghost:1b", timeout=20)
    assert failed.value.status in (503, 504)
    with pytest.raises(PoolUnavailable):
        ModelPoolClient("http://127.0.0.1:1", timeout=2).models()
    # Two leased models take both slots: a third cannot evict them.
    client.create_lease("tiny:1b", 60, "a")
    client.create_lease("qwen2.5-coder:7b", 60, "b")
    stack.wait_state("tiny:1b", "HOT")
    stack.wait_state("qwen2.5-coder:7b", "HOT")
    with pytest.raises(NoCapacity) as full:
        client.load(SHORT, timeout=5)
    assert full.value.retry_after is not None and full.value.retry_after > 0
    assert isinstance(full.value, ModelPoolError) and full.value.status == 503


def test_a_lease_keeps_a_model_past_its_ttl_and_grace(stack: Stack) -> None:
    r = stack.post(f"/models/{SHORT}/leases", {"seconds": 60, "holder": "architect-1"})
    assert r.status_code == 201, r.text
    lease = r.json()
    assert lease["holder"] == "architect-1"
    assert lease["expires_at"] == pytest.approx(time.time() + 60, abs=5)
    stack.wait_state(SHORT, "HOT")
    time.sleep(3.0)  # TTL 1.2 s + grace 0.6 s, twice over
    m = stack.model(SHORT)
    assert m["state"] == "HOT"
    assert [x["lease_id"] for x in m["leases"]] == [lease["lease_id"]]
    metrics = stack.get("/metrics").text
    assert f'modelpool_leases{{model="{SHORT}"}} 1.0' in metrics
    # Unloading a leased model by hand needs force.
    refused = stack.post(f"/models/{SHORT}/unload")
    assert refused.status_code == 409 and "architect-1" in refused.json()["error"]["message"]
    ended = stack.request("DELETE", f"/models/{SHORT}/leases/{lease['lease_id']}")
    assert ended.status_code == 204
    # The TTL runs from the end of the lease: HOT a moment more, then gone.
    assert stack.state(SHORT) in ("HOT", "COOLING")
    stack.wait_state(SHORT, "COLD", timeout=15)


def test_a_lapsed_lease_lets_the_model_go(stack: Stack) -> None:
    lease = stack.post(f"/models/{SHORT}/leases", {"seconds": 5, "holder": "crashed"}).json()
    stack.wait_state(SHORT, "HOT")
    stack.wait_state(SHORT, "COLD", timeout=25)  # lapsed at 5 s (the shortest), then TTL, grace
    assert stack.model(SHORT)["leases"] == []
    late = stack.post(f"/models/{SHORT}/leases/{lease['lease_id']}/renew", {"seconds": 60})
    assert late.status_code == 404 and late.json()["error"]["code"] == "lease_not_found"


def test_renewing_moves_the_end(stack: Stack) -> None:
    lease = stack.post("/models/tiny:1b/leases", {"seconds": 5}).json()
    renewed = stack.post(f"/models/tiny:1b/leases/{lease['lease_id']}/renew", {"seconds": 600})
    assert renewed.status_code == 200
    assert renewed.json()["expires_at"] == pytest.approx(time.time() + 600, abs=5)
    assert renewed.json()["lease_id"] == lease["lease_id"]


@pytest.mark.parametrize(
    ("body", "names"),
    [
        ({"seconds": -1}, "seconds"),
        ({"seconds": "ten"}, "seconds"),
        ({"seconds": 10**9}, "seconds"),
        ({"seconds": 10, "holder": 5}, "holder"),
    ],
)
def test_bad_lease_input_is_a_400_that_names_it(
    stack: Stack, body: dict[str, Any], names: str
) -> None:
    r = stack.post("/models/tiny:1b/leases", body)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith(names + ":")
    assert stack.model("tiny:1b")["leases"] == [] and stack.state("tiny:1b") == "COLD"
    assert stack.post("/models/nope/leases", {"seconds": 5}).status_code == 404


def test_the_client_lease_renews_in_the_background_and_ends_on_exit(
    stack: Stack, client: ModelPoolClient
) -> None:
    with client.lease(SHORT, seconds=5, holder="runner") as endpoint:  # the shortest lease
        assert endpoint == client.endpoint_for(SHORT)
        first = stack.model(SHORT)["leases"][0]
        time.sleep(7.5)  # past the lease's 5 s, the TTL and the grace: renewals keep it
        m = stack.model(SHORT)
        assert m["state"] == "HOT"
        assert m["leases"][0]["lease_id"] == first["lease_id"]
        assert m["leases"][0]["expires_at"] > first["expires_at"]
        reply = requests.post(
            endpoint + "/chat/completions",
            json={"model": SHORT, "messages": [{"role": "user", "content": "hi"}]},
            timeout=10,
        )
        assert reply.status_code == 200
    assert stack.model(SHORT)["leases"] == []
    stack.wait_state(SHORT, "COLD", timeout=15)


def test_a_lease_survives_a_control_plane_restart(stack: Stack) -> None:
    lease = stack.post(f"/models/{SHORT}/leases", {"seconds": 120, "holder": "long-task"}).json()
    stack.wait_state(SHORT, "HOT")
    old_pid = stack.get("/health").json()["pid"]
    assert "controlplane" in stack.supervisorctl("restart", "controlplane").stdout

    def back() -> dict[str, Any] | None:
        try:
            if stack.get("/health", timeout=2).json()["pid"] == old_pid:
                return None
            m = stack.model(SHORT)
        except (requests.RequestException, ValueError):
            return None
        return m if m["state"] == "HOT" else None

    m = wait_until(back, timeout=30)
    assert [(x["lease_id"], x["holder"]) for x in m["leases"]] == [(lease["lease_id"], "long-task")]
    assert m["leases"][0]["expires_at"] == pytest.approx(lease["expires_at"])
    time.sleep(2.5)  # its TTL would have run out: the restored lease holds it
    assert stack.state(SHORT) == "HOT"


def test_the_client_without_a_stack_is_pool_unavailable(standin: OllamaStandin) -> None:
    with pytest.raises(PoolUnavailable, match="not reachable"):
        ModelPoolClient("http://127.0.0.1:9", timeout=1).model("x")
