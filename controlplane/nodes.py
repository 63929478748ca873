"""Where model workers run: the stack's own supervisord (``LocalNode``) or a node's over
authenticated XML-RPC (``RemoteNode``). Both give the lifecycle one interface: start a worker
from its spec, read its log, remove it.

The local node writes the spec file and an include file, as it always has. A remote node shares
no disk with the control plane: the worker's whole entry, spec included (base64, in its
environment), travels in ``twiddler.addProgramToGroup``; its command runs the node's own Python
from the project directory that its supervisord names (``%(ENV_MODELPOOL_PYTHON)s``).
"""

from __future__ import annotations

import math
import shlex
import socket
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit, urlunsplit

from controlplane.adapters.procmem import pids_with_cmdline, terminate
from controlplane.adapters.supervisord import (
    SupervisorClient,
    SupervisorError,
    SupervisorUnavailable,
    TwiddlerClient,
)
from controlplane.node import Node
from controlplane.nodeconfig import LOCAL, NODE_USER, NodeConfig
from controlplane.settings import ModelEntry, Settings
from controlplane.specs import build_spec
from model_service.spec import SPEC_DATA_ENV, WorkerSpec

#: Set in a node supervisord's environment by ``modelpool node up``.
PYTHON_ENV: Final = "MODELPOOL_PYTHON"
PROJECT_ENV: Final = "MODELPOOL_PROJECT_DIR"


def port_checker(host: str) -> Callable[[int], bool]:
    """Whether a port can be bound on ``host`` (as gunicorn binds: with SO_REUSEADDR)."""

    def is_free(port: int) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError:
                return False
            return True

    return is_free


def reachable_ollama(config: NodeConfig) -> str:
    """A node's ``ollama_base_url`` as the control plane reaches it: the URL is the workers'
    (on the node), so a loopback host there means the node's own address here."""
    parts = urlsplit(config.ollama_base_url)
    host = parts.hostname or ""
    if _loopback(host) and not _loopback(config.address):
        netloc = config.address + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    return config.ollama_base_url


def _loopback(host: str) -> bool:
    return host == "localhost" or host.startswith("127.") or host == "::1"


def read_password(path: str) -> str:
    """A node's password: the first line of its password file (OSError/ValueError if unusable)."""
    text = Path(path).read_text(encoding="utf-8").strip()
    if not text or "\n" in text:
        raise ValueError(f"password_file {path}: expected one line holding the password")
    return text


class WorkerNode:
    """One supervisord that runs model workers."""

    name: str
    client: SupervisorClient
    #: Processes live on this host: their memory can be read from /proc.
    local: bool = False

    def address(self, settings: Settings) -> str:
        """Where the node's workers listen, and where clients reach them."""
        raise NotImplementedError

    def spec(self, entry: ModelEntry, settings: Settings, port: int) -> WorkerSpec:
        raise NotImplementedError

    def start(self, program: str, port: int, spec: WorkerSpec, settings: Settings) -> None:
        """Make the worker's program live and start it (without waiting)."""
        raise NotImplementedError

    def remove(self, program: str, settings: Settings) -> None:
        """Stop (draining), forget and delete a worker's program; idempotent.

        Raises SupervisorError or OSError if the node could not be told.
        """
        self.client.stop(program, timeout=settings.graceful_shutdown_seconds + 30)
        self._after_stop(program)
        self.client.remove_program(program)

    def _after_stop(self, program: str) -> None:
        pass

    def log_since_start(self, program: str, length: int = 2000) -> str:
        """The end of what the worker logged since it was last started."""
        return self.client.log_tail(program, length)

    def is_port_free(self, port: int) -> bool:
        return True


class LocalNode(WorkerNode):
    """The stack's own supervisord, over its unix socket, with files in the run directory."""

    local = True

    def __init__(self, node: Node, client: SupervisorClient) -> None:
        self.name = LOCAL
        self.node = node
        self.client = client
        self.paths = node.paths
        #: Size of each program's log when its worker was last started.
        self._log_offsets: dict[str, int] = {}
        self._is_free = port_checker(node.bind_host)

    def address(self, settings: Settings) -> str:
        return settings.bind_host

    def spec(self, entry: ModelEntry, settings: Settings, port: int) -> WorkerSpec:
        return build_spec(entry, settings, port, str(self.paths.api_key_file))

    def start(self, program: str, port: int, spec: WorkerSpec, settings: Settings) -> None:
        self.node.write_program(program, port, settings.graceful_shutdown_seconds, spec.to_json())
        self._mark_log(program)
        self.client.add_program(program)
        self.client.start(program)

    def _mark_log(self, program: str) -> None:
        """Remember where this run's output starts in the program's (appended) log."""
        try:
            self._log_offsets[program] = self.paths.program_log(program).stat().st_size
        except OSError:
            self._log_offsets[program] = 0

    def log_since_start(self, program: str, length: int = 2000) -> str:
        path = self.paths.program_log(program)
        try:
            with path.open("rb") as fh:
                size = fh.seek(0, 2)
                start = self._log_offsets.get(program, 0)
                start = 0 if start > size else start  # rotated meanwhile
                fh.seek(max(start, size - length))
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    def remove(self, program: str, settings: Settings) -> None:
        self.client.stop(program, timeout=settings.graceful_shutdown_seconds + 30)
        self._after_stop(program)
        self.node.delete_program(program)  # before the reload, which must not see it
        self.client.remove_program(program)

    def _after_stop(self, program: str) -> None:
        """Stop what a killed gunicorn master left behind (its worker, holding port and model).

        supervisord kills the process group only when it stops a program itself; a master
        killed from outside orphans its worker. They carry the spec path on their command line.
        """
        leftovers = pids_with_cmdline(f"MODELPOOL_SPEC={self.paths.spec_file(program)}")
        if leftovers:
            terminate(leftovers)

    def is_port_free(self, port: int) -> bool:
        return self._is_free(port)


class RemoteNode(WorkerNode):
    """A node's supervisord over HTTP (username ``modelpool``, the password from a file)."""

    def __init__(self, config: NodeConfig, timeout: float = 10.0) -> None:
        self.name = config.name
        self.config = config
        #: Why the node cannot be driven at all (its password file), else "".
        self.error = ""
        password = ""
        try:
            password = read_password(config.password_file)
        except (OSError, ValueError) as exc:
            self.error = f"cannot read password_file {config.password_file}: {exc}"
        self.client = TwiddlerClient(config.url, NODE_USER, password, timeout)
        self._lock = threading.Lock()

    def address(self, settings: Settings) -> str:
        return self.config.address

    def spec(self, entry: ModelEntry, settings: Settings, port: int) -> WorkerSpec:
        # The key travels in the spec: a rotation gives workers on nodes a new fingerprint,
        # so they are drained and loaded again with it.
        # A relative model_path is the node's own: its worker runs in the node's project dir.
        base = build_spec(entry, settings, port, "")
        return replace(
            base,
            ollama_base_url=self.config.ollama_base_url,
            api_key=settings.api_key,
            model_path=entry.model_path,
        )

    def program_options(
        self, program: str, port: int, spec: WorkerSpec, graceful: float
    ) -> dict[str, str]:
        """The worker's entry, as ``twiddler.addProgramToGroup`` takes it."""
        wait = max(1, math.ceil(graceful))
        command = shlex.join(
            [
                "-m",
                "gunicorn",
                "--config",
                "python:model_service.gunicorn_conf",
                "--bind",
                f"{self.config.address}:{int(port)}",
                "--graceful-timeout",
                str(wait),
                "--name",
                program,
                "model_service.worker_asgi:create()",
            ]
        )
        return {
            "command": f"%(ENV_{PYTHON_ENV})s {command}",
            "directory": f"%(ENV_{PROJECT_ENV})s",
            "environment": f'PYTHONUNBUFFERED="1",{SPEC_DATA_ENV}="{spec.encode()}"',
            "autostart": "false",
            "autorestart": "false",
            "startsecs": "1",
            "startretries": "0",
            "stopsignal": "TERM",
            "stopwaitsecs": str(wait + 10),
            "stopasgroup": "true",
            "killasgroup": "true",
            "redirect_stderr": "true",
            "stdout_logfile_maxbytes": "10MB",
            "stdout_logfile_backups": "1",
        }

    def start(self, program: str, port: int, spec: WorkerSpec, settings: Settings) -> None:
        if self.error:
            raise SupervisorUnavailable(self.error)
        options = self.program_options(program, port, spec, settings.graceful_shutdown_seconds)
        with self._lock:
            try:
                self.client.stop(program, timeout=settings.graceful_shutdown_seconds + 30)
            except SupervisorError:
                pass
            self.client.add_program(program, options)
        self.client.start(program)
