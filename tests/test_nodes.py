"""Nodes: one control plane, three node supervisords on their own loopback addresses.

Each node is started with ``modelpool node up`` on 127.0.0.2, .3 and .4 (all of 127.0.0.0/8 is
loopback on Linux, so all three use the same worker ports) and has an Ollama stand-in of its
own on its address. The control plane (on 127.0.0.1) keeps no model on its own supervisord
(``local_node: false``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import xmlrpc.client
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
import requests
from playwright.sync_api import Browser, expect

from tests.nodes import NODES, PASSWORD, Nodes, cli, running_nodes
from tests.stack import Stack, wait_until

MIB = 1024 * 1024
NODE_TIMEOUT = 3.0
MODELS = {f"m{i}:1b": 1000 * MIB for i in range(1, 5)} | {"x:1b": 500 * MIB, "y:1b": 500 * MIB}


@pytest.fixture(scope="module")
def nodes() -> Iterator[Nodes]:
    with running_nodes([*NODES, "wrongpw"], models=MODELS, load_delay=0.1) as ns:
        yield ns


@pytest.fixture(scope="module")
def stack(nodes: Nodes) -> Iterator[Stack]:
    models = [
        *({"model_id": m} for m in sorted(MODELS) if m.startswith("m")),
        {"model_id": "pinned:1b", "upstream_model": "m1:1b", "nodes": ["n4"]},
        {"model_id": "labelled:1b", "upstream_model": "m2:1b", "labels": ["big"]},
        {"model_id": "x:1b", "nodes": ["n3"]},
        {"model_id": "y:1b", "nodes": ["n3", "n2"]},
    ]
    settings = {
        "local_node": False,
        "node_timeout_seconds": NODE_TIMEOUT,
        "nodes": nodes.config(),
        "default_memory_mb": 1000,
    }
    st = Stack(models, settings)
    yield from st.running()


def node_table(stack: Stack) -> dict[str, dict[str, Any]]:
    return {n["name"]: n for n in stack.get("/nodes").json()["nodes"]}


def chat(stack: Stack, model: str) -> requests.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return stack.post("/v1/chat/completions", body)


def unload_all(stack: Stack) -> None:
    for m in stack.get("/models").json()["models"]:
        if m["state"] in ("HOT", "COOLING"):
            stack.post(f"/models/{m['model_id']}/unload", {"wait": True, "force": True})


def test_models_spread_by_free_memory_and_are_served_on_every_node(
    nodes: Nodes, stack: Stack
) -> None:
    wait_until(lambda: all(node_table(stack)[n]["state"] == "UP" for n in NODES), 10)
    placed: dict[str, str] = {}
    for model in ("m1:1b", "m2:1b", "m3:1b", "m4:1b"):
        table = node_table(stack)
        free = {
            n: (table[n]["memory_limit_mb"] - table[n]["memory_used_mb"], len(table[n]["models"]))
            for n in NODES
        }
        expected = min(NODES, key=lambda n: (-free[n][0], free[n][1], list(NODES).index(n)))
        m = stack.load(model)
        assert m["node"] == expected, (model, free, m)
        host = NODES[expected][0]
        assert m["endpoint"] == f"http://{host}:{m['port']}"
        placed[model] = expected
    assert set(placed.values()) == set(NODES)  # all three nodes hold a model
    for model, node in placed.items():
        for standin in nodes.standins.values():
            standin.clear_calls()
        resp = chat(stack, model)
        assert resp.status_code == 200, resp.text
        # The request went through 8050 to the worker on that node, and to its own Ollama.
        assert nodes.standins[node].calls_to("/api/chat") or nodes.standins[node].calls
        others = [n for n in NODES if n != node]
        # (Each node's drift check polls its Ollama's GET /api/ps every second: not a request.)
        assert not any(c.method == "POST" for n in others for c in nodes.standins[n].calls), model
    table = node_table(stack)
    for node in NODES:
        assert sorted(m for m, n in placed.items() if n == node) == table[node]["models"]
    listed = {m["id"]: m for m in stack.get("/v1/models").json()["data"]}
    assert listed["m1:1b"]["node"] == placed["m1:1b"]


def test_pinned_and_labelled_models_land_on_their_nodes(nodes: Nodes, stack: Stack) -> None:
    assert stack.load("pinned:1b")["node"] == "n4"
    assert stack.load("labelled:1b")["node"] == "n3"
    status = subprocess.run(
        [
            sys.executable,
            "-m",
            "supervisor.supervisorctl",
            "-s",
            nodes.url("n4"),
            "-u",
            "modelpool",
            "-p",
            PASSWORD,
            "status",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    program = stack.model("pinned:1b")["program"]
    assert f"models:{program}" in status.stdout and "RUNNING" in status.stdout, status.stdout
    out = cli("--url", stack.url, "nodes").stdout
    row = next(line.split() for line in out.splitlines() if line.startswith("n4 "))
    assert row[:3] == ["n4", "UP", "127.0.0.4"], out
    status = cli("--url", stack.url, "status").stdout.splitlines()
    assert status[0].split()[:3] == ["MODEL", "STATE", "NODE"], status
    assert next(line for line in status if line.startswith("pinned:1b ")).split()[1:3] == [
        "HOT",
        "n4",
    ]


def test_node_xmlrpc_listens_on_its_address_only_and_needs_the_password(nodes: Nodes) -> None:
    for name, (host, _) in NODES.items():
        conns = psutil.Process(nodes.pid(name)).net_connections(kind="inet")
        listening = {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}
        assert listening == {(host, nodes.rpc_port)}, (name, listening)
    anonymous = requests.post(f"{nodes.url('n2')}/RPC2", data=b"<methodCall/>", timeout=5)
    assert anonymous.status_code == 401
    with pytest.raises(xmlrpc.client.ProtocolError) as info:
        nodes.rpc("n2", "wrong").supervisor.getState()
    assert info.value.errcode == 401
    # A node is never started on every interface, nor without a private password file.
    other = nodes.root / "other"
    base = ["node", "up", "--name", "z", "--run-dir", str(other)]
    wildcard = cli(
        *base, "--listen", "0.0.0.0:1", "--password-file", str(nodes.password_file), check=False
    )
    assert wildcard.returncode != 0 and "own address" in wildcard.stderr
    missing = cli(*base, "--listen", "127.0.0.9:1", "--password-file", "/nonexistent", check=False)
    assert missing.returncode != 0 and "--password-file" in missing.stderr
    shared = nodes.root / "shared"
    shared.write_text("pw\n")
    shared.chmod(0o644)
    readable = cli(*base, "--listen", "127.0.0.9:1", "--password-file", str(shared), check=False)
    assert readable.returncode != 0 and "chmod 600" in readable.stderr
    assert not other.exists()


def test_a_wrong_password_leaves_the_node_down_with_an_error_that_says_so(stack: Stack) -> None:
    wrong = node_table(stack)["wrongpw"]
    assert wrong["state"] == "DOWN"
    assert "401" in wrong["last_error"] and "password" in wrong["last_error"]
    assert wrong["models"] == []


def test_a_node_cut_off_then_back_keeps_its_workers_unless_moved(
    nodes: Nodes, stack: Stack
) -> None:
    unload_all(stack)
    x, y = stack.load("x:1b"), stack.load("y:1b")
    assert x["node"] == "n3" and y["node"] == "n3"
    pid = nodes.pid("n3")
    os.kill(pid, signal.SIGSTOP)  # its workers keep running; the node no longer answers
    try:
        began = time.monotonic()
        wait_until(lambda: node_table(stack)["n3"]["state"] == "DOWN", NODE_TIMEOUT + 5)
        assert time.monotonic() - began <= NODE_TIMEOUT + 3
        lost = stack.model("x:1b")
        assert lost["state"] == "FAILED" and "node n3 lost" in lost["last_error"]
        assert chat(stack, "y:1b").status_code == 200  # loaded again, on n2
        assert stack.model("y:1b")["node"] == "n2"
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(lambda: node_table(stack)["n3"]["state"] == "UP", 10)
    back = stack.wait_state("x:1b", "HOT", timeout=10)
    assert back["node"] == "n3" and back["pid"] == x["pid"]  # adopted, not restarted
    # y's old worker on n3 is stopped: y runs once, on n2.
    wait_until(lambda: not psutil.pid_exists(y["pid"]), 15)
    assert stack.model("y:1b")["node"] == "n2"
    names = [p["name"] for p in nodes.programs("n3") if p["statename"] == "RUNNING"]
    assert names == [x["program"]]
    assert chat(stack, "x:1b").status_code == 200


def test_a_restarted_control_plane_adopts_the_workers_on_its_nodes(
    nodes: Nodes, stack: Stack
) -> None:
    unload_all(stack)
    before = stack.load("pinned:1b")
    assert before["node"] == "n4"
    restart = stack.supervisorctl("restart", "controlplane")
    assert restart.returncode == 0, restart.stdout + restart.stderr
    wait_until(lambda: stack.get("/health").status_code == 200, 30)
    after = stack.wait_state("pinned:1b", "HOT", timeout=15)
    # The same worker on the same node, taken over, not started again.
    assert after["node"] == "n4" and after["pid"] == before["pid"]
    history = stack.get("/models/pinned:1b/health").json()["history"]
    assert history[-1]["reason"] == "adopted" and history[-1]["to"] == "HOT"
    assert chat(stack, "pinned:1b").status_code == 200
    running = [p for p in nodes.programs("n4") if p["statename"] == "RUNNING"]
    assert [p["name"] for p in running] == [before["program"]]


def test_losing_a_node_moves_its_models_and_its_return_makes_no_duplicate(
    nodes: Nodes, stack: Stack
) -> None:
    unload_all(stack)
    # n3 (6000 MB) takes m1, x and m2 (most free memory), then m3 goes to n2.
    for model in ("m1:1b", "x:1b", "m2:1b", "m3:1b"):
        stack.load(model)
    placed = {m: stack.model(m)["node"] for m in ("m1:1b", "x:1b", "m2:1b", "m3:1b")}
    victim = placed["m3:1b"]
    assert victim != "n3", placed
    survivors = {m: stack.model(m) for m, n in placed.items() if n != victim}
    assert survivors
    # SIGKILL the node's supervisord and every worker under it.
    sup = psutil.Process(nodes.pid(victim))
    tree = [sup, *sup.children(recursive=True)]
    for proc in tree:
        proc.send_signal(signal.SIGKILL)
    psutil.wait_procs(tree, timeout=5)
    began = time.monotonic()
    wait_until(lambda: node_table(stack)[victim]["state"] == "DOWN", NODE_TIMEOUT + 5)
    assert time.monotonic() - began <= NODE_TIMEOUT + 3
    lost = [m for m, n in placed.items() if n == victim]
    for model in lost:
        rec = stack.model(model)
        assert rec["state"] == "FAILED" and f"node {victim} lost" in rec["last_error"]
    for model in lost:  # the next request loads it on another node
        assert chat(stack, model).status_code == 200
        assert stack.model(model)["node"] not in (victim, None)
    for model, before in survivors.items():  # nothing lost elsewhere
        now = stack.model(model)
        assert now["state"] == "HOT" and now["pid"] == before["pid"], model
    nodes.up(victim)
    wait_until(lambda: node_table(stack)[victim]["state"] == "UP", 10)
    time.sleep(1.5)  # a monitor pass or two
    assert nodes.programs(victim) == []  # no duplicate worker
    for model in lost:
        assert stack.model(model)["node"] != victim
        assert chat(stack, model).status_code == 200


def test_the_page_groups_models_by_node(nodes: Nodes, stack: Stack, browser: Browser) -> None:
    unload_all(stack)
    stack.load("x:1b")
    stack.load("pinned:1b")
    page = browser.new_page()
    try:
        page.goto(stack.url + "/ui")
        heads = page.locator("tr.node-group")
        expect(heads.filter(has_text="Node n3")).to_contain_text("UP · 127.0.0.3 · 1/4 models")
        expect(heads.filter(has_text="Node wrongpw")).to_have_count(1)
        expect(heads.filter(has_text="Node wrongpw")).to_contain_text("401")
        expect(heads.filter(has_text="Not loaded")).to_have_count(1)
        names = page.locator("#models-body > tr").evaluate_all(
            "rows => rows.map(r => r.dataset.node !== undefined ? '#' + r.dataset.node"
            " : r.querySelector('.model-name').textContent)"
        )
        # Each loaded model right under its node's header; the rest under "Not loaded".
        assert names[names.index("#n3") + 1] == "x:1b", names
        assert names[names.index("#n4") + 1] == "pinned:1b", names
        assert names.index("#") > names.index("#n4") and "m1:1b" in names[names.index("#") :]
    finally:
        page.close()
