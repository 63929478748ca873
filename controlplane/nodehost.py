"""``modelpool node up`` / ``node down``: a node on this host, for a control plane elsewhere.

A node is a stock supervisord: an ``[inet_http_server]`` on the node's own address only (never a
wildcard), always with username ``modelpool`` and the password from ``--password-file`` (kept
in the generated config as its SHA-1, as supervisord allows), the ``supervisor_twiddler`` RPC
interface and an empty ``[group:models]``. Its environment names this host's Python and project
directory, which the workers' commands use (``%(ENV_MODELPOOL_PYTHON)s``).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from string import Template
from typing import Final

import psutil

from controlplane.adapters.supervisord import SupervisorError, TwiddlerClient
from controlplane.node import PROJECT_DIR, TEMPLATE_DIR
from controlplane.nodeconfig import NODE_NAME_RE, NODE_USER
from controlplane.nodes import PROJECT_ENV, PYTHON_ENV, read_password
from controlplane.validate import HOST_RE

WILDCARDS: Final = ("", "0.0.0.0", "::", "*")


class NodeError(Exception):
    """The node could not be started or stopped; the message says why."""


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` with a specific host (the XML-RPC server listens there alone)."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise NodeError(f"--listen: {listen!r} is not HOST:PORT")
    if host in WILDCARDS or not HOST_RE.fullmatch(host):
        raise NodeError(
            f"--listen: {host!r} is not a specific address; the node's XML-RPC server listens "
            "on the node's own address only (e.g. 10.0.0.5:9001), never on every interface"
        )
    return host, int(port_text)


def check_password_file(path: Path) -> str:
    """The password, from a file only its owner may read."""
    try:
        mode = path.stat().st_mode
        password = read_password(str(path))
    except (OSError, ValueError) as exc:
        raise NodeError(f"--password-file: {exc}") from None
    if mode & 0o077:
        raise NodeError(
            f"--password-file: {path} may be read by others (mode {mode & 0o777:o}); "
            f"chmod 600 {path}"
        )
    return password


def render_conf(name: str, listen: str, run_dir: Path, password: str) -> str:
    for value in (str(run_dir), listen):
        if any(c in value for c in "\n\r%"):
            raise NodeError(f"{value!r}: a line break or % cannot go in supervisord's config")
    return Template((TEMPLATE_DIR / "node.conf.tmpl").read_text()).substitute(
        name=name,
        listen=listen,
        run_dir=str(run_dir),
        password_sha1=hashlib.sha1(password.encode()).hexdigest(),
    )


def _pid(run_dir: Path) -> int | None:
    try:
        pid = int((run_dir / "supervisord.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE or "supervisord" not in " ".join(proc.cmdline()):
            return None
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
    return pid


def node_up(
    name: str, listen: str, run_dir: Path, password_file: Path, timeout: float = 30.0
) -> int:
    """Start the node's supervisord and return its pid once it answers over XML-RPC."""
    if not NODE_NAME_RE.fullmatch(name):
        raise NodeError(f"--name: {name!r} is not a node name (a-z, 0-9, - and _)")
    parse_listen(listen)
    password = check_password_file(password_file)
    run_dir = run_dir.resolve()
    client = TwiddlerClient(f"http://{listen}", NODE_USER, password, timeout=2)
    running = _pid(run_dir)
    if running is not None:
        try:
            client.state()
        except SupervisorError as exc:
            raise NodeError(f"a supervisord (pid {running}) runs for {run_dir}: {exc}") from None
        return running
    for d in (run_dir, run_dir / "logs"):
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o700)
    conf = run_dir / "supervisord.conf"
    conf.write_text(render_conf(name, listen, run_dir, password))
    conf.chmod(0o600)
    env = dict(os.environ, **{PYTHON_ENV: sys.executable, PROJECT_ENV: str(PROJECT_DIR)})
    proc = subprocess.run(
        [sys.executable, "-m", "supervisor.supervisord", "-c", str(conf)],
        env=env,
        capture_output=True,
        text=True,
        cwd=str(PROJECT_DIR),
    )
    if proc.returncode != 0:
        raise NodeError(f"supervisord did not start: {proc.stderr.strip() or proc.stdout.strip()}")
    limit = time.monotonic() + timeout
    error = ""
    while time.monotonic() < limit:
        try:
            if client.state() == "RUNNING":
                pid = _pid(run_dir)
                if pid is not None:
                    return pid
        except SupervisorError as exc:
            error = str(exc)
        time.sleep(0.1)
    log = run_dir / "logs" / "supervisord.log"
    tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
    raise NodeError(f"node {name} did not answer at {listen} within {timeout:g} s: {error}\n{tail}")


def node_down(run_dir: Path, timeout: float = 60.0) -> bool:
    """Stop the node's supervisord (it stops its workers first); False if none ran."""
    run_dir = run_dir.resolve()
    pid = _pid(run_dir)
    if pid is None:
        return False
    proc = psutil.Process(pid)
    os.kill(pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except psutil.TimeoutExpired:
        raise NodeError(f"supervisord (pid {pid}) did not stop within {timeout:g} s") from None
    return True
