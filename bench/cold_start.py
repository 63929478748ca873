"""Cold start of a llama.cpp model, in parts, and the worker's memory over the model's size.

Generates a demo GGUF (random weights; ``--layers``/``--embd``/``--ff`` set its size), starts
a modelpool stack with it registered, then for each run asks the control plane to load it and
times, from that request:

  spawn      supervisord reports the worker process (pid)
  boot       gunicorn answers /health (status "loading")
  weights    /health says "ready" (the weights are in memory)
  hot        the control plane shows the model HOT
  token      the first streamed chunk of a chat completion sent once HOT

and prints the worker's idle RSS (its process tree) next to the model file's size.

    .venv/bin/python -m bench.cold_start [--runs 3] [--layers 4 --embd 1024 --ff 2816]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import requests

from controlplane.adapters.procmem import tree_rss_mb
from controlplane.adapters.supervisord import SupervisorClient, SupervisorError
from model_service.demo_model import DemoShape, write_demo_model
from tests.stack import Stack

POLL = 0.002


def one_run(stack: Stack, model: str, program: str) -> dict[str, float]:
    sup = SupervisorClient(str(stack.run_dir / "supervisor.sock"))
    marks: dict[str, float] = {}
    t0 = time.perf_counter()
    r = stack.post(f"/models/{model}/load", {"wait": False})
    assert r.status_code in (200, 202), r.text
    port = stack.model(model)["port"]
    while "hot" not in marks:
        now = time.perf_counter() - t0
        if "spawn" not in marks:
            try:
                if sup.process(program).pid:
                    marks["spawn"] = now
            except SupervisorError:
                pass
        elif "weights" not in marks:
            try:
                status = requests.get(f"http://127.0.0.1:{port}/health", timeout=1).json()["status"]
                marks.setdefault("boot", now)
                if status == "ready":
                    marks["weights"] = now
            except requests.RequestException:
                pass
        elif stack.state(model) == "HOT":
            marks["hot"] = now
        if now > 120:
            raise RuntimeError(f"no cold start within 120 s: {marks}")
        time.sleep(POLL)
    pid = stack.model(model)["pid"]
    marks["idle_rss_mb"] = tree_rss_mb(pid) or 0.0
    started = time.perf_counter()
    with requests.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "max_tokens": 4,
        },
        stream=True,
        timeout=60,
    ) as resp:
        for line in resp.iter_lines():
            if line.startswith(b"data: {"):
                marks["token"] = marks["hot"] + time.perf_counter() - started
                break
    stack.post(f"/models/{model}/unload", {"wait": True})
    return marks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--embd", type=int, default=1024)
    p.add_argument("--ff", type=int, default=2816)
    args = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="mp-bench-"))
    big = write_demo_model(
        workdir / "bench.gguf", seed=3, shape=DemoShape(args.layers, args.embd, 16, args.ff)
    )
    tiny = write_demo_model(workdir / "tiny.gguf", seed=4)
    entries = [
        {
            "model_id": "bench",
            "backend": "llamacpp",
            "model_path": str(big),
            "options": {"n_ctx": 512},
        },
        {
            "model_id": "tiny",
            "backend": "llamacpp",
            "model_path": str(tiny),
            "options": {"n_ctx": 512},
        },
    ]
    stack = Stack(entries, {"default_ttl_minutes": 60}).up()
    try:
        print(
            f"machine: {platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}, {platform.platform()}"
        )
        size_mb = big.stat().st_size / 2**20
        print(
            f"model: {args.layers} layers x {args.embd} embd, ff {args.ff}: "
            f"{size_mb:.1f} MiB GGUF (f32)\n"
        )
        program = stack.model("bench")["program"]
        rows = [one_run(stack, "bench", program) for _ in range(args.runs)]
        keys = ["spawn", "boot", "weights", "hot", "token"]
        print("seconds from the load request   " + "  ".join(f"{k:>8}" for k in keys))
        for i, row in enumerate(rows, 1):
            print(f"  run {i:<27}" + "  ".join(f"{row[k]:8.3f}" for k in keys))
        med = {k: statistics.median(r[k] for r in rows) for k in keys}
        print("  median                       " + "  ".join(f"{med[k]:8.3f}" for k in keys))
        parts = {
            "supervisord spawn": med["spawn"],
            "gunicorn boot (imports, app)": med["boot"] - med["spawn"],
            "weights loaded": med["weights"] - med["boot"],
            "seen HOT by the pool": med["hot"] - med["weights"],
            "first token": med["token"] - med["hot"],
        }
        print("\nparts (median):")
        for name, secs in parts.items():
            print(f"  {name:<30} {secs:7.3f} s")
        idle = statistics.median(r["idle_rss_mb"] for r in rows)
        base = one_run(stack, "tiny", stack.model("tiny")["program"])["idle_rss_mb"]
        print(
            f"\nidle RSS of the worker (process tree): {idle:.1f} MiB for a {size_mb:.1f} MiB "
            f"model: {idle - size_mb:.1f} MiB over the model's own size"
        )
        print(
            f"idle RSS with a {tiny.stat().st_size / 2**20:.1f} MiB model: {base:.1f} MiB "
            "(the worker's own overhead: Python, Flask, gunicorn, llama.cpp)"
        )
    finally:
        stack.down()
        stack.cleanup()
        for f in workdir.iterdir():
            f.unlink()
        workdir.rmdir()


if __name__ == "__main__":
    main()
