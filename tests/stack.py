"""A real modelpool stack for tests: its own config dir, run dir and ports under /tmp.

It is started with the ``modelpool up`` command and stopped with ``modelpool down``; afterwards
every process whose command line names the stack's directory is looked for, killed by PID and
reported, so a test that leaks a process fails.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self
from urllib.parse import quote

import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent
PORTS_PER_STACK = 12


def wait_until(pred: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Poll ``pred`` until it returns something truthy; fail with the last value otherwise."""
    limit = time.monotonic() + timeout
    value = None
    while time.monotonic() < limit:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s (last value: {value!r})")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port_block(n: int) -> int:
    """The first port of ``n`` consecutive bindable loopback ports."""
    for _ in range(200):
        # Below Linux's ephemeral range (32768-60999): no client connection takes these.
        base = random.randrange(20000, 32000 - n)
        if all(_bindable(p) for p in range(base, base + n)):
            return base
    raise RuntimeError("no free port block")


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    """(pid, command line) of every process whose command line contains ``text``."""
    found = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if text in cmd and stat.rsplit(")", 1)[1].split()[0] != "Z":
            found.append((int(entry.name), cmd.strip()))
    return found


class Stack:
    """One modelpool stack on loopback."""

    def __init__(
        self,
        models: list[dict[str, Any]] | Callable[[Stack], list[dict[str, Any]]],
        settings: dict[str, Any] | None = None,
        ollama_url: str = "http://127.0.0.1:9",
    ) -> None:
        # Short path: unix socket paths are limited to 108 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="mp-", dir="/tmp"))
        self.config_dir = self.root / "config"
        self.run_dir = self.root / "run"
        self.config_dir.mkdir()
        base = free_port_block(PORTS_PER_STACK)
        self.control_port = base
        self.port_start, self.port_end = base + 1, base + PORTS_PER_STACK - 1
        config = {
            "default_ttl_minutes": 5,
            "min_ttl_minutes": 0.01,
            "max_ttl_minutes": 60,
            "grace_period_minutes": 0.05,
            "check_interval_seconds": 30,
            "port_range": {"start": self.port_start, "end": self.port_end},
            "control_port": self.control_port,
            "ollama_base_url": ollama_url,
            "graceful_shutdown_seconds": 3,
            "load_timeout_seconds": 30,
            "service_registry_url": "",
            # Tests load and evict within seconds; residency is tested where it is the subject.
            "min_resident_seconds": 0,
            "min_idle_seconds": 0,
            "capacity_wait_seconds": 0,
        }
        config.update(settings or {})
        self.write_config(config)
        if callable(models):  # entries that depend on this stack's ports
            models = models(self)
        (self.config_dir / "model_pool_registry.yaml").write_text(
            yaml.safe_dump({"models": models}, sort_keys=False)
        )
        self.url = f"http://127.0.0.1:{self.control_port}"
        self.supervisord_pid: int | None = None

    def write_config(self, config: dict[str, Any]) -> None:
        (self.config_dir / "model_pool_config.yaml").write_text(yaml.safe_dump(config))

    # --- processes ----------------------------------------------------------------------------

    def cli(
        self, *args: str, timeout: float = 120, check: bool = False
    ) -> subprocess.CompletedProcess[str]:
        cmd = [
            sys.executable,
            "-m",
            "controlplane.cli",
            "--config-dir",
            str(self.config_dir),
            "--run-dir",
            str(self.run_dir),
            *args,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        if check and proc.returncode != 0:
            raise AssertionError(f"{args} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
        return proc

    def up(self) -> Stack:
        self.cli("up", "--timeout", "60", check=True)
        self.supervisord_pid = int((self.run_dir / "supervisord.pid").read_text())
        return self

    def down(self) -> list[tuple[int, str]]:
        """Stop the stack; return (and kill) whatever process of it was still left."""
        if self.run_dir.exists():
            self.cli("down", "--timeout", "60")
        leaked = processes_mentioning(str(self.root))
        for pid, _ in leaked:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return leaked

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def running(self) -> Iterator[Self]:
        """Up for the length of a fixture; then down, removed, and checked for leaks."""
        try:
            self.up()
            yield self
        finally:
            leaks = self.down()
            self.cleanup()
        assert not leaks, f"processes left running after modelpool down: {leaks}"

    def supervisorctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "supervisor.supervisorctl",
                "-c",
                str(self.run_dir / "supervisord.conf"),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )

    # --- HTTP ---------------------------------------------------------------------------------

    def request(
        self, method: str, path: str, json: Any = None, timeout: float = 60
    ) -> requests.Response:
        return requests.request(method, self.url + path, json=json, timeout=timeout)

    def get(self, path: str, **kw: Any) -> requests.Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, json: Any = None, **kw: Any) -> requests.Response:
        return self.request("POST", path, json=json, **kw)

    def model(self, model_id: str) -> dict[str, Any]:
        resp = self.get(f"/models/{quote(model_id, safe=':')}")
        resp.raise_for_status()
        data: dict[str, Any] = resp.json()
        return data

    def state(self, model_id: str) -> str:
        return str(self.model(model_id)["state"])

    def wait_state(self, model_id: str, *states: str, timeout: float = 20) -> dict[str, Any]:
        return wait_until(
            lambda: (m := self.model(model_id))["state"] in states and m, timeout, 0.05
        )

    def load(self, model_id: str, timeout: float = 60) -> dict[str, Any]:
        resp = self.post(f"/models/{model_id}/load", {"wait": True}, timeout=timeout)
        assert resp.status_code == 200, resp.text
        data: dict[str, Any] = resp.json()
        return data

    def worker_log(self, program: str) -> str:
        path = self.run_dir / "logs" / f"{program}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def spawn_count(self, program: str) -> int:
        """How many times supervisord spawned ``program`` (from its own log)."""
        log = (self.run_dir / "logs" / "supervisord.log").read_text(errors="replace")
        return log.count(f"spawned: '{program}'")
