"""One stack per run dir: the lock, `modelpool up` and a control plane started by hand."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from controlplane.adapters.rundir import LOCK_NAME, Holder, RunDirBusy, RunDirLock, holder
from tests.stack import ROOT, Stack, free_port_block, processes_mentioning, wait_until

# --- the lock --------------------------------------------------------------------------------


def test_lock_refuses_a_second_holder_and_names_the_first(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert holder(run_dir) is None and not run_dir.exists()  # looking creates nothing
    first = RunDirLock.acquire(run_dir, tmp_path / "a", 20001)
    try:
        record = (run_dir / LOCK_NAME).read_bytes()
        assert holder(run_dir) == Holder(os.getpid(), str(tmp_path / "a"), 20001)
        with pytest.raises(RunDirBusy) as info:
            RunDirLock.acquire(run_dir, tmp_path / "b", 20002)
        message = str(info.value)
        assert str(run_dir) in message and f"pid {os.getpid()}" in message
        assert "control port 20001" in message
        assert (run_dir / LOCK_NAME).read_bytes() == record  # the refused one wrote nothing
    finally:
        first.release()
    assert holder(run_dir) is None
    second = RunDirLock.acquire(run_dir, tmp_path / "b", 20002)
    second.release()
    assert holder(run_dir) is None


def test_lock_is_released_when_its_process_dies(tmp_path: Path) -> None:
    """Deterministic: the child holds the lock until it is killed, and is waited for."""
    code = (
        "import sys; from pathlib import Path; from controlplane.adapters.rundir import RunDirLock;"
        "RunDirLock.acquire(Path(sys.argv[1]), Path(sys.argv[1]), 20001);"
        "print('held', flush=True); sys.stdin.read()"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "held\n"
        found = holder(tmp_path)
        assert found is not None and found.pid == child.pid
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert holder(tmp_path) is None


def test_holder_of_the_same_stack_matches_what_it_recorded(tmp_path: Path) -> None:
    h = Holder(1, str(tmp_path.resolve()), 20001)
    assert h.same_stack(tmp_path, 20001)
    assert not h.same_stack(tmp_path, 20002)
    assert not h.same_stack(tmp_path / "other", 20001)
    assert Holder(1).same_stack(tmp_path, 20001)  # nothing recorded: nothing to refuse on


# --- two stacks on one run dir ---------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(make_stack: Any) -> Stack:
    return make_stack(  # type: ignore[no-any-return]
        [{"model_id": "qwen2.5-coder:7b", "warmup": True}]
    )


@pytest.fixture
def other_config(stack: Stack) -> Iterator[tuple[Path, int]]:
    """Another config dir with another control port and port range; its processes are
    stopped by PID afterwards."""
    root = Path(tempfile.mkdtemp(prefix="mp-other-", dir="/tmp"))
    config_dir = root / "config"
    shutil.copytree(stack.config_dir, config_dir)
    config = yaml.safe_load((config_dir / "model_pool_config.yaml").read_text())
    base = free_port_block(12)
    config.update(control_port=base, port_range={"start": base + 1, "end": base + 11})
    (config_dir / "model_pool_config.yaml").write_text(yaml.safe_dump(config))
    yield config_dir, base
    for pid, _ in processes_mentioning(str(root)):
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(root, ignore_errors=True)


def _snapshot(stack: Stack) -> dict[str, Any]:
    """What a second stack must not touch: the first one's files and processes."""
    run = stack.run_dir
    hot = stack.wait_state("qwen2.5-coder:7b", "HOT", timeout=30)
    return {
        "conf": (run / "supervisord.conf").read_bytes(),
        "conf_stat": (run / "supervisord.conf").stat().st_mtime_ns,
        "socket": (run / "supervisor.sock").stat().st_ino,
        "conf.d": {p.name: p.read_bytes() for p in (run / "conf.d").iterdir()},
        "lock": (run / LOCK_NAME).read_bytes(),
        "worker": (hot["pid"], hot["port"]),
        "controlplane": stack.get("/health").json()["pid"],
        "supervisord": int((run / "supervisord.pid").read_text()),
    }


def test_two_control_planes_on_one_run_dir_refuse_the_second_up(
    stack: Stack, other_config: tuple[Path, int]
) -> None:
    """Deterministic: the first stack is up (its control plane holds the lock) before the
    second `modelpool up` starts, and the refusal comes before anything is written."""
    before = _snapshot(stack)
    config_dir, _ = other_config
    cmd = [sys.executable, "-m", "controlplane.cli", "--config-dir", str(config_dir)]
    cmd += ["--run-dir", str(stack.run_dir), "up", "--timeout", "10"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert str(stack.run_dir) in proc.stderr
    assert f"pid {before['controlplane']}" in proc.stderr
    assert not any(config_dir.parent.glob("**/*.sock"))
    assert _snapshot(stack) == before
    # The same stack again: a no-op that says so.
    again = stack.cli("up", "--timeout", "30", check=True)
    assert "already up" in again.stdout
    assert _snapshot(stack) == before


def test_two_control_planes_on_one_run_dir_refuse_a_hand_started_gunicorn(
    stack: Stack, other_config: tuple[Path, int]
) -> None:
    """Deterministic: the first control plane holds the lock for its whole life; the second
    is refused when it builds its app, before its pool exists, and gunicorn exits."""
    before = _snapshot(stack)
    config_dir, port = other_config
    env = {
        **os.environ,
        "MODELPOOL_RUN_DIR": str(stack.run_dir),
        "MODELPOOL_CONFIG_DIR": str(config_dir),
    }
    cmd = [sys.executable, "-m", "gunicorn", "--config", "python:controlplane.gunicorn_conf"]
    cmd += [
        "--bind",
        f"127.0.0.1:{port}",
        "--name",
        str(config_dir),
        "controlplane.asgi:create()",
    ]
    gunicorn = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        log, _ = gunicorn.communicate(timeout=60)
    finally:
        if gunicorn.poll() is None:
            os.killpg(gunicorn.pid, signal.SIGKILL)
            gunicorn.wait()
    assert gunicorn.returncode != 0, log
    assert f"run dir {stack.run_dir} is in use by pid {before['controlplane']}" in log
    assert _snapshot(stack) == before


def test_a_restarted_control_plane_takes_the_run_dir_over_from_its_orphaned_predecessor(
    stack: Stack,
) -> None:
    """Deterministic: the master is killed, and the test waits (polling) for the new worker to
    answer; the orphaned old worker holds the lock until it notices and exits."""
    before = _snapshot(stack)
    master = int(stack.supervisorctl("pid", "controlplane").stdout.strip())
    os.kill(master, signal.SIGKILL)

    def new_control_plane() -> int | None:
        try:
            pid = int(stack.get("/health", timeout=2).json()["pid"])
        except (requests.RequestException, ValueError):
            return None
        return pid if pid != before["controlplane"] else None

    pid = wait_until(new_control_plane, timeout=60, interval=0.2)
    assert holder(stack.run_dir) == Holder(pid, str(stack.config_dir.resolve()), stack.control_port)
    hot = stack.wait_state("qwen2.5-coder:7b", "HOT", timeout=30)
    assert (hot["pid"], hot["port"]) == before["worker"]  # adopted, not stopped
