"""A node: one supervisord, its run directory, its port range and memory (a value, not a global).

Also renders the supervisord files for the node: the stack's ``supervisord.conf`` and one
program entry per model worker, from the templates in ``supervisord/``.
"""

from __future__ import annotations

import math
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Final

from controlplane.configstore import atomic_write
from controlplane.settings import ConfigError, Settings

PROJECT_DIR: Final = Path(__file__).resolve().parent.parent
TEMPLATE_DIR: Final = PROJECT_DIR / "supervisord"
SOCKET_PATH_MAX: Final = 100  # sun_path is 108 bytes with the terminating NUL; keep a margin
_SAFE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


def _conf_value(text: str, what: str) -> str:
    """A value safe to put in a supervisord entry: one line, ``%`` escaped."""
    if any(c in text for c in "\n\r\0"):
        raise ConfigError(f"{what}: {text!r} contains a line break")
    return text.replace("%", "%%")


@dataclass(frozen=True)
class RunPaths:
    """Every file a running stack writes, under one run directory."""

    run_dir: Path

    @property
    def conf(self) -> Path:
        return self.run_dir / "supervisord.conf"

    @property
    def socket(self) -> Path:
        return self.run_dir / "supervisor.sock"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "supervisord.pid"

    @property
    def conf_d(self) -> Path:
        return self.run_dir / "conf.d"

    @property
    def specs(self) -> Path:
        return self.run_dir / "specs"

    @property
    def logs(self) -> Path:
        return self.run_dir / "logs"

    @property
    def state_file(self) -> Path:
        return self.run_dir / "state.json"

    @property
    def api_key_file(self) -> Path:
        """The pool's current api_key, which workers re-read when it changes (0600)."""
        return self.run_dir / "api_key"

    def program_conf(self, program: str) -> Path:
        return self.conf_d / f"{program}.conf"

    def spec_file(self, program: str) -> Path:
        return self.specs / f"{program}.json"

    def program_log(self, program: str) -> Path:
        return self.logs / f"{program}.log"

    def create(self) -> None:
        """Create the run directory tree, private to its owner (0700)."""
        for d in (self.run_dir, self.conf_d, self.specs, self.logs):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o700)
        if len(str(self.socket)) > SOCKET_PATH_MAX:
            raise ConfigError(
                f"run_dir: {self.run_dir} is too long for a unix socket path "
                f"({len(str(self.socket))} > {SOCKET_PATH_MAX} bytes); use a shorter --run-dir"
            )


@dataclass(frozen=True)
class Node:
    """One supervisord and what it may use."""

    name: str
    paths: RunPaths
    bind_host: str
    port_start: int
    port_end: int
    memory_limit_mb: float
    python: str = sys.executable

    @classmethod
    def local(cls, run_dir: Path, settings: Settings) -> Node:
        return cls(
            name="local",
            paths=RunPaths(run_dir.resolve()),
            bind_host=settings.bind_host,
            port_start=settings.port_range.start,
            port_end=settings.port_range.end,
            memory_limit_mb=settings.memory_limit_mb,
        )

    def render_program(self, program: str, port: int, graceful_seconds: float) -> str:
        """The supervisord entry of one model worker (a safe name and an integer port only)."""
        if not _SAFE_NAME.match(program):
            raise ValueError(f"unsafe program name {program!r}")
        graceful = max(1, math.ceil(graceful_seconds))
        spec = self.paths.spec_file(program)
        command = [
            self.python,
            "-m",
            "gunicorn",
            "--config",
            "python:model_service.gunicorn_conf",
            "--bind",
            f"{self.bind_host}:{int(port)}",
            "--graceful-timeout",
            str(graceful),
            "--env",
            f"MODELPOOL_SPEC={spec}",
            "--name",
            program,
            "model_service.worker_asgi:create()",
        ]
        return Template((TEMPLATE_DIR / "program.conf.tmpl").read_text()).substitute(
            name=program,
            command=_conf_value(shlex.join(command), "command"),
            project_dir=_conf_value(str(PROJECT_DIR), "project_dir"),
            stopwaitsecs=graceful + 10,
            log=_conf_value(str(self.paths.program_log(program)), "log"),
        )

    def render_supervisord_conf(
        self, config_dir: Path, control_port: int, nodaemon: bool = False
    ) -> str:
        """The stack's supervisord.conf: control plane program plus the include of conf.d."""
        command = [
            self.python,
            "-m",
            "gunicorn",
            "--config",
            "python:controlplane.gunicorn_conf",
            "--bind",
            f"{self.bind_host}:{int(control_port)}",
            "--env",
            f"MODELPOOL_RUN_DIR={self.paths.run_dir}",
            "--env",
            f"MODELPOOL_CONFIG_DIR={config_dir.resolve()}",
            "controlplane.asgi:create()",
        ]
        run_dir = _conf_value(str(self.paths.run_dir), "run_dir")
        return Template((TEMPLATE_DIR / "supervisord.conf.tmpl").read_text()).substitute(
            run_dir=run_dir,
            socket=_conf_value(str(self.paths.socket), "socket"),
            nodaemon="true" if nodaemon else "false",
            controlplane_command=_conf_value(shlex.join(command), "command"),
            project_dir=_conf_value(str(PROJECT_DIR), "project_dir"),
        )

    def write_program(self, program: str, port: int, graceful_seconds: float, spec: str) -> None:
        """Write the spec file, then the entry (so a reload never sees an entry without spec)."""
        atomic_write(self.paths.spec_file(program), spec)
        atomic_write(
            self.paths.program_conf(program), self.render_program(program, port, graceful_seconds)
        )

    def delete_program(self, program: str) -> None:
        self.paths.program_conf(program).unlink(missing_ok=True)
        self.paths.spec_file(program).unlink(missing_ok=True)
