"""The modelpool command: its options, and against a running stack: watch, config, exit codes."""

from __future__ import annotations

import os
import subprocess
from typing import Any

import psutil
import pytest

from controlplane.cli import build_parser
from controlplane.cli_stack import _alive
from tests.stack import Stack, wait_until

GLOBALS = {"--config-dir": "config_dir", "--run-dir": "run_dir", "--url": "url"}


@pytest.mark.parametrize("option", sorted(GLOBALS))
@pytest.mark.parametrize("command", [["up"], ["down"], ["status"], ["load", "m:1"]])
def test_cli_global_options_after_the_subcommand(option: str, command: list[str]) -> None:
    """Deterministic: argument parsing only."""
    parse = build_parser().parse_args
    attr = GLOBALS[option]
    before = parse([option, "A", *command])
    after = parse([*command, option, "A"])
    assert getattr(before, attr) == getattr(after, attr) == "A"
    assert before.fn is after.fn
    # Given in both places, the one after the command wins; given nowhere, it is None.
    assert getattr(parse([option, "A", *command, option, "B"]), attr) == "B"
    assert getattr(parse(command), attr) is None
    others = [a for o, a in GLOBALS.items() if o != option]
    assert all(getattr(after, a) is None for a in others)


def test_alive_counts_a_zombie_child_as_gone() -> None:
    """Deterministic: the child's exit is awaited (as a zombie, then reaped) before each check."""
    assert _alive(os.getpid())
    child = subprocess.Popen(["true"])
    wait_until(lambda: psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE)
    assert not _alive(child.pid)
    child.wait()
    assert not _alive(child.pid)


@pytest.fixture(scope="module")
def stack(make_stack: Any) -> Stack:
    return make_stack(  # type: ignore[no-any-return]
        [
            {"model_id": "tiny:1b", "ttl_minutes": 0.02},
            {"model_id": "qwen2.5-coder:7b", "warmup": True},
            {
                "model_id": "llama3.1:8b",
                "schedule": [{"days": "daily", "start": "00:00", "end": "24:00"}],
            },
        ],
        {"grace_period_minutes": 0.02},
    )


def test_status_watch_shows_a_model_cool_down_and_unload(stack: Stack) -> None:
    stack.load("tiny:1b")
    out = stack.cli("status", "--watch", "0.25", "--count", "40", check=True).stdout
    states = []
    for line in out.splitlines():
        if line.startswith("tiny:1b "):
            state = line.split()[1]
            if not states or states[-1] != state:
                states.append(state)
    assert states[0] == "HOT" and "COOLING" in states and states[-1] == "COLD", states
    assert states.index("COOLING") < states.index("COLD")
    assert "grace" in out  # the TTL column counts the grace period down


def test_status_table_marks_warmup_and_scheduled_models(stack: Stack) -> None:
    stack.wait_state("llama3.1:8b", "HOT", timeout=20)  # its window is always open: loaded
    lines = {ln.split()[0]: ln for ln in stack.cli("status", check=True).stdout.splitlines()}
    assert "WARM" in lines["MODEL"]
    # No last error: the WARM column ends each line.
    assert lines["qwen2.5-coder:7b"].split()[-1] == "warmup"
    assert lines["llama3.1:8b"].split()[-1] == "window"
    assert "forever" in lines["qwen2.5-coder:7b"] and "forever" in lines["llama3.1:8b"]


def test_config_get_and_set(stack: Stack) -> None:
    assert stack.cli("config", "get", "max_concurrent_models", check=True).stdout.strip() == "5"
    out = stack.cli("config", "set", "max_concurrent_models", "4", check=True).stdout
    assert out.strip() == "max_concurrent_models = 4"
    assert stack.get("/config").json()["max_concurrent_models"] == 4
    out = stack.cli("config", "set", "port_range", "{start: 9000, end: 10}")
    assert out.returncode == 1 and "port_range" in out.stderr
    bad = stack.cli("config", "set", "max_concurrent_models", "0")
    assert bad.returncode == 1
    assert "max_concurrent_models: 0 is below the minimum 1" in bad.stderr
    assert stack.get("/config").json()["max_concurrent_models"] == 4
    out = stack.cli("config", "set", "control_port", str(stack.control_port + 100))
    assert out.returncode == 0 and "after a restart: control_port" in out.stdout
    # The config file now names another port: reach the running control plane by its URL.
    stack.cli(
        "--url", stack.url, "config", "set", "control_port", str(stack.control_port), check=True
    )
    unknown = stack.cli("config", "get", "nope")
    assert unknown.returncode == 2 and "nope: unknown key" in unknown.stderr


def test_load_reports_progress_and_time(stack: Stack) -> None:
    out = stack.cli("load", "tiny:1b", check=True).stdout.splitlines()
    assert out[0].startswith("tiny:1b: WARMING") or out[0].startswith("tiny:1b: HOT")
    assert out[-1].startswith("tiny:1b is HOT on port ") and out[-1].endswith(" s")
