"""``modelpool up`` / ``down`` (the stack in its run directory) and ``node up`` / ``down`` /
``nodes`` (nodes for a control plane elsewhere)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import requests

from controlplane import nodehost
from controlplane.adapters import rundir
from controlplane.adapters.supervisord import SupervisorClient, SupervisorError
from controlplane.adapters.worker import local_session
from controlplane.app import (
    CONFIG_DIR_ENV,
    DEFAULTS_DIR_ENV,
    RUN_DIR_ENV,
    config_store,
)
from controlplane.cli_base import (
    EXIT_USAGE,
    CliError,
    api_for,
    dirs,
    settings_of,
    table,
)
from controlplane.core.slug import PROGRAM_PREFIX
from controlplane.node import Node, RunPaths
from controlplane.settings import ConfigError, Settings


def _run_dir_owner(run_dir: Path) -> rundir.Holder | None:
    """The stack that has ``run_dir`` now: its control plane holds the lock, or its supervisord
    answers on the run dir's socket (then the lock's last record says whose it is)."""
    holder = rundir.holder(run_dir)
    if holder is not None:
        return holder
    try:
        pid = SupervisorClient(str(RunPaths(run_dir).socket), timeout=5).pid()
    except SupervisorError:
        return None
    last = rundir.last_holder(run_dir) or rundir.Holder(0)
    return rundir.Holder(pid, last.config_dir, last.control_port)


def cmd_up(args: argparse.Namespace) -> int:
    config_dir, run_dir = dirs(args)
    store = config_store(config_dir)
    settings = settings_of(config_dir, store)
    # Nothing is written before this check: a run dir another stack has stays as it is.
    owner = _run_dir_owner(run_dir)
    if owner is not None and not owner.same_stack(config_dir, settings.control_port):
        raise CliError(str(rundir.RunDirBusy(run_dir, owner)))
    node = Node.local(run_dir, settings)
    if owner is not None:
        print(f"modelpool is already up for {run_dir} (pid {owner.pid})")
    else:
        try:
            # A moment's wait: another `up` probing the lock at the same instant is not a holder.
            lock = rundir.RunDirLock.acquire(run_dir, config_dir, settings.control_port, wait=1.0)
        except rundir.RunDirBusy as exc:
            raise CliError(str(exc)) from None
        try:
            node.paths.create()
            store.seed()
            _start_supervisord(node, config_dir, run_dir, settings)
        except ConfigError as exc:
            raise CliError(str(exc), EXIT_USAGE) from None
        finally:
            lock.release()
    host = "127.0.0.1" if settings.bind_host in ("0.0.0.0", "") else settings.bind_host
    url = f"http://{host}:{settings.control_port}"
    limit = time.monotonic() + args.timeout
    session = local_session()
    while time.monotonic() < limit:
        try:
            resp = session.get(url + "/health", timeout=2)
            if resp.status_code == 200 and resp.json().get("status") == "healthy":
                print(f"modelpool is up: control plane {url}, run dir {node.paths.run_dir}")
                print(
                    f"{Path(sys.executable).parent / 'supervisorctl'} -c {node.paths.conf} status"
                )
                return 0
        except (requests.RequestException, ValueError):
            pass
        time.sleep(0.2)
    log = node.paths.logs / "controlplane.log"
    tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
    raise CliError(
        f"the control plane did not become healthy at {url} within {args.timeout:g} s\n{tail}"
    )


def _start_supervisord(node: Node, config_dir: Path, run_dir: Path, settings: Settings) -> None:
    conf = node.render_supervisord_conf(config_dir, settings.control_port)
    node.paths.conf.write_text(conf)
    node.paths.conf.chmod(0o600)
    env = dict(os.environ)
    env[CONFIG_DIR_ENV] = str(config_dir.resolve())
    env[RUN_DIR_ENV] = str(run_dir.resolve())
    if env.get(DEFAULTS_DIR_ENV):
        env[DEFAULTS_DIR_ENV] = str(Path(env[DEFAULTS_DIR_ENV]).resolve())
    proc = subprocess.run(
        [sys.executable, "-m", "supervisor.supervisord", "-c", str(node.paths.conf)],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise CliError(f"supervisord did not start: {proc.stderr.strip() or proc.stdout.strip()}")


def stop_stack(paths: RunPaths, timeout: float = 120) -> bool:
    """Drain every model worker, stop the control plane, shut supervisord down and wait for it.

    Returns False if no supervisord was running for ``paths``.
    """
    client = SupervisorClient(str(paths.socket), timeout=5)
    try:
        pid = client.pid()
        procs = client.all_processes()
    except SupervisorError:
        return False
    # The control plane first, so that it does not react to its workers stopping.
    client.stop("controlplane", timeout=60)
    models = [p.name for p in procs if p.name.startswith(PROGRAM_PREFIX)]
    threads = [threading.Thread(target=client.stop, args=(n, timeout)) for n in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        client.shutdown()
    except SupervisorError:
        pass
    limit = time.monotonic() + timeout
    while time.monotonic() < limit and _alive(pid):
        time.sleep(0.1)
    for f in [*paths.conf_d.glob("*.conf"), *paths.specs.glob("*.json")]:
        f.unlink(missing_ok=True)
    return not _alive(pid)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie child of ours counts as gone)."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def cmd_down(args: argparse.Namespace) -> int:
    _, run_dir = dirs(args)
    paths = RunPaths(run_dir.resolve())
    if not paths.socket.exists():
        print(f"modelpool is not running (no socket in {paths.run_dir})")
        return 0
    # Through the control plane first: it unloads every model (reason "shutdown"), withdraws
    # them from the service registry, and lets in-flight requests finish.
    try:
        api_for(args).call("POST", "/drain", {"timeout": args.timeout}, timeout=args.timeout + 10)
    except CliError as exc:
        print(f"drain through the control plane skipped: {exc}", file=sys.stderr)
    stopped = stop_stack(paths, args.timeout)
    print("modelpool is down" if stopped else f"no supervisord answered at {paths.socket}")
    return 0


def cmd_node(args: argparse.Namespace) -> int:
    try:
        if args.action == "up":
            if not (args.name and args.listen and args.password_file):
                raise CliError("node up needs --name, --listen and --password-file", EXIT_USAGE)
            pid = nodehost.node_up(
                args.name, args.listen, Path(args.node_dir), Path(args.password_file), args.timeout
            )
            print(f"node {args.name} is up: supervisord pid {pid}, XML-RPC http://{args.listen}")
            print(f"supervisorctl -s http://{args.listen} -u modelpool -p PASSWORD status")
        elif nodehost.node_down(Path(args.node_dir), args.timeout):
            print(f"node in {args.node_dir} is down")
        else:
            print(f"no node supervisord runs for {args.node_dir}")
    except nodehost.NodeError as exc:
        raise CliError(str(exc)) from None
    return 0


def cmd_nodes(args: argparse.Namespace) -> int:
    nodes = api_for(args).call("GET", "/nodes")["nodes"]
    if args.json:
        print(json.dumps(nodes, indent=2))
        return 0
    rows = [["NODE", "STATE", "ADDRESS", "MODELS", "MEMORY MB", "LABELS", "LAST ERROR"]]
    for n in nodes:
        limit = f"{n['memory_limit_mb']:.0f}" if n["memory_limit_mb"] else "-"
        rows.append(
            [
                n["name"] + ("" if n["placeable"] else " (no models)"),
                n["state"],
                n["address"],
                f"{len(n['models'])}/{n['max_concurrent_models']}",
                f"{n['memory_used_mb']:.0f}/{limit}",
                ",".join(n["labels"]) or "-",
                (n["last_error"] or "")[:60],
            ]
        )
    print(table(rows))
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    jobs = api_for(args).call("GET", "/jobs")["jobs"]
    if args.json:
        print(json.dumps(jobs, indent=2))
        return 0
    rows = [["JOB", "MODEL", "PHASE", "PROGRESS", "NODE", "ORIGIN", "ERROR"]]
    for j in jobs:
        progress = "-" if j["progress"] is None else f"{j['progress']:.0%}"
        rows.append(
            [
                j["job_id"],
                j["model_id"],
                j["phase"],
                progress,
                j["node"] or "-",
                j["origin"],
                (j["error"] or "")[:60],
            ]
        )
    print(table(rows))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    job = api_for(args).call("DELETE", f"/jobs/{args.job_id}")
    print(f"{job['job_id']} ({job['model_id']}): {job['phase']}")
    return 0
