"""Latency added by the worker hop and the front-door hop, measured side by side in one run.

Starts a fast local OpenAI-compatible upstream (the test suite's Ollama stand-in, whose /v1
endpoints answer at once), a modelpool stack with one ``openai``-backend model pointed at it,
and then, interleaving the three targets request by request:

  upstream   -> the upstream directly
  worker     -> the model worker's port (one hop)
  frontdoor  -> the control plane's /v1 (two hops)

It prints p50/p99 of non-streamed requests and of the time to the first streamed chunk, the
latency each hop adds, and how many concurrent slow streams each target held without an error.

    .venv/bin/python -m bench.proxy_overhead [--requests 400] [--streams 200]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import statistics
import threading
import time
from collections import Counter
from typing import Any

import psutil

from tests.ollama_standin import OllamaStandin
from tests.stack import Stack

MODEL = "bench-upstream"
UPSTREAM_MODEL = "tiny:1b"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


class Client:
    """One keep-alive connection per target (the same client cost for every hop)."""

    def __init__(self, port: int, model: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.model = model

    def once(self, body: dict[str, Any], stream: bool) -> float:
        data = json.dumps({**body, "model": self.model, "stream": stream}).encode()
        started = time.perf_counter()
        self.conn.request(
            "POST", "/v1/chat/completions", body=data, headers={"Content-Type": "application/json"}
        )
        resp = self.conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
        if stream:
            first = resp.read1(65536)
            elapsed = time.perf_counter() - started
            assert first.startswith(b"data:")
            while resp.read1(65536):
                pass
        else:
            resp.read()
            elapsed = time.perf_counter() - started
        resp.close()
        return elapsed


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] * 1000


def latency(targets: dict[str, int], n: int, stream: bool) -> dict[str, list[float]]:
    clients = {name: Client(port, model_for(name)) for name, port in targets.items()}
    for c in clients.values():  # warm the connections and code paths
        for _ in range(20):
            c.once(BODY, stream)
    out: dict[str, list[float]] = {name: [] for name in targets}
    names = list(targets)
    for i in range(n):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            out[name].append(clients[name].once(BODY, stream))
    return out


def model_for(target: str) -> str:
    """The upstream knows the model by its own name; modelpool by the registered id."""
    return UPSTREAM_MODEL if target == "upstream" else MODEL


def concurrency(port: int, model: str, streams: int, tokens: int = 10) -> tuple[int, int, float]:
    """Open ``streams`` slow streams at once; (ok, errors, wall seconds)."""
    ok = errors = 0
    reasons: Counter[str] = Counter()
    lock = threading.Lock()
    barrier = threading.Barrier(streams)
    body = {**BODY, "max_tokens": tokens}

    def run() -> None:
        nonlocal ok, errors
        try:
            c = Client(port, model)
            barrier.wait(30)
            c.once(body, stream=True)
            with lock:
                ok += 1
        except Exception as exc:
            with lock:
                errors += 1
                reasons[f"{type(exc).__name__}: {exc}"[:160]] += 1

    threads = [threading.Thread(target=run) for _ in range(streams)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for reason, n in reasons.most_common(3):
        print(f"    {n} x {reason}")
    return ok, errors, time.perf_counter() - started


def memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, PSS) of a process in MiB."""
    info = psutil.Process(pid).memory_full_info()
    return info.rss / 2**20, getattr(info, "pss", info.uss) / 2**20


def cpu_seconds(proc: psutil.Process, children: bool = True) -> float:
    """User and system CPU seconds of a process (and its children) so far."""
    total = 0.0
    for p in [proc, *(proc.children(recursive=True) if children else [])]:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--streams", type=int, default=200)
    p.add_argument(
        "--long-streams",
        type=int,
        default=0,
        metavar="N",
        help="also hold N streams of 50 tokens at 20 ms at once, direct and through 8050",
    )
    p.add_argument("--skip-latency", action="store_true", help="only the concurrency runs")
    args = p.parse_args()
    upstream = OllamaStandin().start()
    stack = Stack(
        [
            {
                "model_id": MODEL,
                "backend": "openai",
                "upstream_url": upstream.url,
                "upstream_model": UPSTREAM_MODEL,
            }
        ],
        {"default_ttl_minutes": 60},
    ).up()
    try:
        worker_port = stack.load(MODEL)["port"]
        targets = {
            "upstream": upstream.port,
            "worker": worker_port,
            "frontdoor": stack.control_port,
        }
        print(
            f"machine: {platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}, {platform.platform()}"
        )
        print(f"requests per target: {args.requests} (interleaved)\n")
        for stream in () if args.skip_latency else (False, True):
            kind = "time to first chunk (stream)" if stream else "non-streamed request"
            res = latency(targets, args.requests, stream)
            print(f"{kind}: ms   p50     p99    mean")
            for name, values in res.items():
                print(
                    f"  {name:<10} {pct(values, 50):7.2f} {pct(values, 99):7.2f} "
                    f"{statistics.mean(values) * 1000:7.2f}"
                )
            for hop, (inner, outer) in {
                "the worker hop": ("upstream", "worker"),
                "the front door": ("worker", "frontdoor"),
            }.items():
                paired = [b - a for a, b in zip(res[inner], res[outer], strict=True)]
                p50 = pct(res[outer], 50) - pct(res[inner], 50)
                p99 = pct(res[outer], 99) - pct(res[inner], 99)
                print(
                    f"  added by {hop:<15} p50 {p50:6.2f}  p99 {p99:6.2f}  "
                    f"(median of paired differences {statistics.median(paired) * 1000:.2f})"
                )
            print()
        upstream.token_delay = 0.05  # each stream lasts about half a second
        print(f"concurrent streams ({args.streams} at once, 10 tokens at 50 ms):")
        for name, port in targets.items():
            ok, errors, wall = concurrency(port, model_for(name), args.streams)
            print(f"  {name:<10} ok {ok:4d}  errors {errors:3d}  wall {wall:5.2f} s")
        if args.long_streams:
            upstream.reply = " ".join(f"w{i}" for i in range(50))
            upstream.token_delay = 0.02
            n = args.long_streams
            cp_pid = int(stack.get("/health").json()["pid"])
            procs = {
                "bench": psutil.Process(),
                "control plane": psutil.Process(cp_pid),
                "worker": psutil.Process(int(stack.model(MODEL)["pid"])),
            }
            print(f"\n{n} concurrent streams, 50 tokens at 20 ms each:")
            walls = {}
            for name in ("upstream", "frontdoor"):
                before = {k: cpu_seconds(p, k != "bench") for k, p in procs.items()}
                ok, errors, wall = concurrency(targets[name], model_for(name), n, tokens=50)
                walls[name] = wall
                cpu = ", ".join(
                    f"{k} {cpu_seconds(p, k != 'bench') - before[k]:.1f}" for k, p in procs.items()
                )
                print(f"  {name:<10} ok {ok:4d}  errors {errors:3d}  wall {wall:5.2f} s")
                print(f"             CPU seconds: {cpu}")
            rss, pss = memory_mb(cp_pid)
            print(f"  through 8050 / direct: {walls['frontdoor'] / walls['upstream']:.2f}x")
            print(f"  control plane after the run: RSS {rss:.0f} MiB, PSS {pss:.0f} MiB")
    finally:
        stack.down()
        stack.cleanup()
        upstream.stop()


if __name__ == "__main__":
    main()
