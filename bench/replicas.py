"""Throughput of one model served by 1, 2 and 3 replicas on three nodes, through the front door.

Three node supervisords (``modelpool node up`` on 127.0.0.2-4, as the tests start them), each
with an Ollama stand-in of its own that behaves like one Ollama: it generates for at most
``--parallel`` requests at once (``OLLAMA_NUM_PARALLEL``) at ``--token-delay`` seconds per token
and queues the rest, so one replica really is the bottleneck. One model with
``replicas: {min: 1, max: 3}``; for each count N the count is pinned (``POST /models/{id}/scale``)
and ``--clients`` closed-loop clients stream chat completions through 8050 for ``--seconds``.
Tokens/s is the streamed content chunks (one token each) received per second of the window.

Then the count is given back to scaling by load (from one replica, with the same clients) and
the time until three replicas serve is printed, with the throughput of that whole window.

    .venv/bin/python -m bench.replicas [--seconds 20] [--clients 24] [--token-delay 0.05]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import threading
import time
from contextlib import contextmanager
from typing import Any

import psutil

from tests.nodes import NODES, running_nodes
from tests.stack import Stack, wait_until

MODEL = "bench-replicas:1b"
MIB = 1024 * 1024


class Load:
    """Closed-loop clients streaming through the front door; counts tokens and requests."""

    def __init__(self, port: int, clients: int, tokens: int) -> None:
        self.port = port
        self.tokens = tokens
        self.count = 0
        self.requests = 0
        self.errors = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client) for _ in range(clients)]

    def _client(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
        body = json.dumps(
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "hi"}],
                "stream": True,
                "max_tokens": self.tokens,
            }
        ).encode()
        while not self.stop.is_set():
            try:
                conn.request(
                    "POST",
                    "/v1/chat/completions",
                    body=body,
                    headers={"Content-Type": "application/json"},
                )
                resp = conn.getresponse()
                if resp.status != 200:
                    resp.read()
                    raise RuntimeError(f"HTTP {resp.status}")
                for line in resp:
                    if line.startswith(b"data: {"):
                        chunk = json.loads(line[6:])
                        if any(c.get("delta", {}).get("content") for c in chunk["choices"]):
                            with self.lock:
                                self.count += 1
                with self.lock:
                    self.requests += 1
            except Exception:
                with self.lock:
                    self.errors += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=300)
                time.sleep(0.2)
        conn.close()

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(300)

    def snapshot(self) -> tuple[int, int, int]:
        with self.lock:
            return self.count, self.requests, self.errors


def serving(stack: Stack) -> list[dict[str, Any]]:
    reps = stack.model(MODEL)["replicas"]
    return [r for r in reps if r["state"] in ("HOT", "COOLING")]


def wait_serving(stack: Stack, n: int, timeout: float = 60.0) -> None:
    wait_until(lambda: len(serving(stack)) == n, timeout, 0.2)


def measure(stack: Stack, load: Load, seconds: float) -> tuple[float, float, int]:
    """Tokens/s and requests/s over the next ``seconds``; errors meanwhile."""
    t0, r0, e0 = load.snapshot()
    began = time.monotonic()
    time.sleep(seconds)
    t1, r1, e1 = load.snapshot()
    took = time.monotonic() - began
    return (t1 - t0) / took, (r1 - r0) / took, e1 - e0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="measured window per count")
    ap.add_argument("--clients", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=32, help="tokens per answer")
    ap.add_argument("--token-delay", type=float, default=0.05)
    ap.add_argument("--parallel", type=int, default=2, help="each stand-in's num_parallel")
    args = ap.parse_args()
    print(
        f"machine: {platform.node()} {os.cpu_count()} cores "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}"
    )
    print(
        f"each node: num_parallel {args.parallel}, {args.token_delay * 1000:.0f} ms per token "
        f"(at most {args.parallel / args.token_delay:.0f} tokens/s per replica); "
        f"{args.clients} clients, {args.tokens} tokens per answer, {args.seconds:g} s windows"
    )
    reply = " ".join(f"w{i}" for i in range(args.tokens))
    with running_nodes(
        NODES,
        models={MODEL: 1000 * MIB},
        load_delay=0.2,
        token_delay=args.token_delay,
        reply=reply,
        num_parallel=args.parallel,
    ) as nodes:
        settings = {
            "local_node": False,
            "node_timeout_seconds": 5,
            "nodes": [c for c in nodes.config() if c["name"] in NODES],
            "default_memory_mb": 1000,
            "scale_up_seconds": 2,
            "scale_down_idle_minutes": 0.1,
        }
        stack = Stack([{"model_id": MODEL, "replicas": {"min": 1, "max": 3}}], settings)
        with contextmanager(stack.running)():
            wait_until(lambda: all(n["state"] == "UP" for n in stack.get("/nodes").json()["nodes"]))
            stack.load(MODEL)
            results: dict[int, float] = {}
            with Load(stack.control_port, args.clients, args.tokens) as load:
                for n in (1, 2, 3):
                    stack.post(f"/models/{MODEL}/scale", {"replicas": n}).raise_for_status()
                    wait_serving(stack, n)
                    time.sleep(2)  # the queues settle across the replicas
                    tps, rps, errors = measure(stack, load, args.seconds)
                    results[n] = tps
                    nodes_used = sorted(r["node"] for r in serving(stack))
                    ratio = tps / results[1]
                    print(
                        f"replicas {n} on {', '.join(nodes_used)}: {tps:7.1f} tokens/s "
                        f"{rps:5.2f} answers/s  {ratio:4.2f}x one replica "
                        f"(target >= {0.8 * n:.1f}x)  errors {errors}"
                    )
                peaks = {k: s.peak_running.get(MODEL, 0) for k, s in nodes.standins.items()}
                print(f"most requests generating at once per node: {peaks}")
                # Back to one, then scaling by load.
                stack.post(f"/models/{MODEL}/scale", {"replicas": 1}).raise_for_status()
                wait_serving(stack, 1)
                stack.post(f"/models/{MODEL}/scale", {"replicas": None}).raise_for_status()
                began = time.monotonic()
                t0, _, _ = load.snapshot()
                wait_until(lambda: len(serving(stack)) == 3, 120, 0.2)
                to_three = time.monotonic() - began
                tps, _, errors = measure(stack, load, args.seconds)
                t1, _, _ = load.snapshot()
                whole = (t1 - t0) / (time.monotonic() - began)
                print(
                    f"scaled by load: 1 -> 3 replicas in {to_three:.1f} s; then {tps:.1f} "
                    f"tokens/s; {whole:.1f} tokens/s over the whole window; errors {errors}"
                )
            idle = time.monotonic()
            wait_until(lambda: len(serving(stack)) == 1, 120, 0.5)
            print(f"load gone: back to 1 replica in {time.monotonic() - idle:.1f} s")
            ok = all(results[n] >= 0.8 * n * results[1] for n in results)
            print("target met" if ok else "TARGET MISSED: N replicas < 0.8 x N x one replica")


if __name__ == "__main__":
    main()
