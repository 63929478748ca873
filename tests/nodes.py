"""Nodes for tests and benchmarks: node supervisords on their own loopback addresses.

Each node is started with ``modelpool node up`` on 127.0.0.2, .3 and .4 (all of 127.0.0.0/8 is
loopback on Linux, so all of them use the same worker ports) and has an Ollama stand-in of its
own on its address; a fourth, ``wrongpw`` on 127.0.0.5, is listed with the wrong password.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import xmlrpc.client
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.ollama_standin import OllamaStandin
from tests.stack import ROOT, processes_mentioning

PASSWORD = "node-pass-7f3a"
#: n3 has the most memory: it takes models first, and pinned models can prefer it.
NODES = {"n2": ("127.0.0.2", 4000), "n3": ("127.0.0.3", 6000), "n4": ("127.0.0.4", 4000)}


def _free_on_all(hosts: list[str], n: int) -> int:
    """The first of ``n`` consecutive ports bindable on every one of ``hosts``."""
    for base in range(21000, 31000, 97):
        ok = True
        for host in hosts:
            for port in range(base, base + n):
                with socket.socket() as s:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    try:
                        s.bind((host, port))
                    except OSError:
                        ok = False
                        break
            if not ok:
                break
        if ok:
            return base
    raise RuntimeError("no port block free on every node address")


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "controlplane.cli", *args],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=ROOT,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
    return proc


class Nodes:
    """Three nodes and their stand-ins, plus a fourth supervisord whose password is wrong."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mp-nodes-", dir="/tmp"))
        self.password_file = self.root / "password"
        self.password_file.write_text(PASSWORD + "\n")
        self.password_file.chmod(0o600)
        self.wrong_file = self.root / "wrong"
        self.wrong_file.write_text("not-the-password\n")
        self.wrong_file.chmod(0o600)
        hosts = [h for h, _ in NODES.values()] + ["127.0.0.5"]
        # The XML-RPC port, then the workers' ports: the same numbers on every node address.
        self.rpc_port = _free_on_all(hosts, 8)
        self.worker_base = self.rpc_port + 1
        self.standins: dict[str, OllamaStandin] = {}

    def run_dir(self, name: str) -> Path:
        return self.root / name

    def url(self, name: str) -> str:
        host = NODES[name][0] if name in NODES else "127.0.0.5"
        return f"http://{host}:{self.rpc_port}"

    def up(self, name: str) -> None:
        host = NODES[name][0] if name in NODES else "127.0.0.5"
        cli(
            "node",
            "up",
            "--name",
            name,
            "--listen",
            f"{host}:{self.rpc_port}",
            "--run-dir",
            str(self.run_dir(name)),
            "--password-file",
            str(self.password_file),
        )

    def pid(self, name: str) -> int:
        return int((self.run_dir(name) / "supervisord.pid").read_text())

    def rpc(self, name: str, password: str = PASSWORD) -> Any:
        host = self.url(name).removeprefix("http://")
        return xmlrpc.client.ServerProxy(f"http://modelpool:{password}@{host}/RPC2")

    def programs(self, name: str) -> list[dict[str, Any]]:
        return list(self.rpc(name).supervisor.getAllProcessInfo())

    def config(self) -> list[dict[str, Any]]:
        entries = [
            {
                "name": name,
                "url": self.url(name),
                "password_file": str(self.password_file),
                "address": host,
                "port_range": {"start": self.worker_base, "end": self.worker_base + 6},
                "memory_limit_mb": memory,
                "max_concurrent_models": 4,
                "ollama_base_url": self.standins[name].url,
                "labels": ["big"] if name == "n3" else [],
            }
            for name, (host, memory) in NODES.items()
        ]
        entries.append(
            {
                "name": "wrongpw",
                "url": self.url("wrongpw"),
                "password_file": str(self.wrong_file),
                "address": "127.0.0.5",
                "port_range": {"start": self.worker_base, "end": self.worker_base + 6},
            }
        )
        return entries


@contextmanager
def running_nodes(names: Iterable[str], **standin: Any) -> Iterator[Nodes]:
    """The nodes ``names`` up, each of ``NODES`` with an Ollama stand-in of its own (``standin``:
    its settings); afterwards every one down, and no process of theirs left running."""
    ns = Nodes()
    names = list(names)
    try:
        for name in names:
            if name in NODES:
                ns.standins[name] = OllamaStandin(host=NODES[name][0], **standin).start()
        for name in names:
            ns.up(name)
        yield ns
    finally:
        for name in names:
            if (ns.run_dir(name) / "supervisord.pid").exists():
                cli("node", "down", "--run-dir", str(ns.run_dir(name)), check=False)
        for one in ns.standins.values():
            one.stop()
        leaked = processes_mentioning(str(ns.root))
        for pid, _ in leaked:
            os.kill(pid, signal.SIGKILL)
        assert not leaked, f"node processes left running: {leaked}"
