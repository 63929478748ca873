"""Replay a synthetic multi-agent workload against a live stack, once with plain LRU and once with
the pool's scheduling (priority, reload cost, residency, waiting for room in order), and print
loads, hit ratio, the wait for a model (p50/p95) and 503s for each.

    .venv/bin/python -m bench.trace_replay [--seed 7] [--agents 12] [--models 8] [--capacity 3]

The trace is seeded and the same for both runs: agents pick models by Zipf popularity, send
bursts of requests to one model, then think. The Ollama stand-in takes a time proportional to a
model's size to load it (``--seconds-per-gb``), and the pool has room for ``--capacity`` models.
An agent refused with 503 retries after ``Retry-After`` (at most 5 s), as a client would: the
wait for a model is the time from an agent's first try to its answer; a request never served
(another answer, or none within 120 s) counts as an endless wait.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import requests
import yaml

from bench.trace_bounds import lru_loads, optimal_loads, visits
from tests.ollama_standin import OllamaStandin
from tests.stack import Stack

GB = 1024**3


@dataclass(frozen=True)
class Event:
    at: float  # seconds from the start
    agent: int
    model: str


def zipf_weights(n: int, s: float) -> list[float]:
    raw = [1.0 / (rank**s) for rank in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def make_trace(
    seed: int, agents: int, models: list[str], duration: float, zipf_s: float = 1.1
) -> list[Event]:
    """Each agent: pick a model (Zipf), send a burst (1 + geometric) at 0.2 s gaps, think
    (exponential, mean 4 s), until ``duration``."""
    rng = random.Random(seed)
    weights = zipf_weights(len(models), zipf_s)
    events = []
    for agent in range(agents):
        t = rng.uniform(0, 2)
        while t < duration:
            model = rng.choices(models, weights)[0]
            burst = 1
            while rng.random() < 0.6:
                burst += 1
            for _ in range(burst):
                events.append(Event(t, agent, model))
                t += 0.2
            t += rng.expovariate(1 / 4.0)
    return sorted(events, key=lambda e: e.at)


@dataclass
class Outcome:
    #: The wait of each served request.
    waits: list[float]
    refusals: int
    failures: int
    loads: int
    requests: int

    def plus(self, other: Outcome) -> Outcome:
        """Two replays pooled."""
        return Outcome(
            self.waits + other.waits,
            self.refusals + other.refusals,
            self.failures + other.failures,
            self.loads + other.loads,
            self.requests + other.requests,
        )

    def all_waits(self) -> list[float]:
        """Every request's wait: one not served (failed, or no answer) counts as endless."""
        return self.waits + [math.inf] * (self.requests - len(self.waits))


def loads_total(stack: Stack) -> int:
    text = stack.get("/metrics").text
    return int(
        sum(float(v) for v in re.findall(r"^modelpool_loads_total\{[^}]*\} (\S+)$", text, re.M))
    )


def replay(stack: Stack, trace: list[Event], give_up: float = 120.0) -> Outcome:
    waits: list[float] = []
    counts = {"refusals": 0, "failures": 0}
    statuses: dict[int, int] = {}
    errors: dict[str, int] = {}
    lock = threading.Lock()
    start = time.monotonic() + 1.0
    by_agent: dict[int, list[Event]] = {}
    for e in trace:
        by_agent.setdefault(e.agent, []).append(e)

    def agent(events: list[Event]) -> None:
        session = requests.Session()
        session.trust_env = False
        for e in events:
            delay = start + e.at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            first = time.monotonic()
            body = {"model": e.model, "messages": [{"role": "user", "content": "hi"}]}
            while True:
                try:
                    resp = session.post(
                        stack.url + "/v1/chat/completions", json=body, timeout=give_up
                    )
                except requests.RequestException as exc:
                    with lock:
                        counts["failures"] += 1
                        kind = type(exc).__name__
                        errors[kind] = errors.get(kind, 0) + 1
                    break
                if resp.status_code == 200:
                    with lock:
                        waits.append(time.monotonic() - first)
                    break
                if resp.status_code == 503 and time.monotonic() - first < give_up:
                    with lock:
                        counts["refusals"] += 1
                    time.sleep(min(5.0, float(resp.headers.get("Retry-After") or 1)))
                    continue
                with lock:
                    counts["failures"] += 1
                    statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
                break

    before = loads_total(stack)
    threads = [threading.Thread(target=agent, args=(evs,)) for evs in by_agent.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if statuses or errors:
        print(f"    answers other than 200 and 503 (after retries): {statuses}; errors: {errors}")
    return Outcome(
        waits, counts["refusals"], counts["failures"], loads_total(stack) - before, len(trace)
    )


@contextmanager
def running(stack: Stack) -> Iterator[Stack]:
    try:
        yield stack.up()
    finally:
        leaked = stack.down()
        stack.cleanup()
        if leaked:
            raise SystemExit(f"processes left running: {leaked}")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


POLICIES: dict[str, dict[str, Any]] = {
    "lru": {
        "eviction_order": "lru",
        "min_resident_seconds": 0,
        "min_idle_seconds": 0,
        "capacity_wait_seconds": 0,
    },
    # The defaults.
    "modelpool": {
        "eviction_order": "cost",
        "min_resident_seconds": 30,
        "resident_load_multiple": 0.5,
        "min_idle_seconds": 1,
        "capacity_wait_seconds": 30,
    },
}


def summary(policy: str, r: Outcome) -> str:
    return (
        f"  {policy:10s} loads {r.loads:4d}  hit ratio {1 - r.loads / max(1, r.requests):.2f}  "
        f"wait p50 {pct(r.all_waits(), 0.5):6.2f} s  p95 {pct(r.all_waits(), 0.95):6.2f} s  "
        f"503s {r.refusals:4d}  served {len(r.waits)}/{r.requests}  failed {r.failures}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--agents", type=int, default=12)
    ap.add_argument("--models", type=int, default=8)
    ap.add_argument("--capacity", type=int, default=3)
    ap.add_argument("--duration", type=float, default=90.0)
    ap.add_argument("--seconds-per-gb", type=float, default=0.5)
    ap.add_argument("--policies", default=",".join(POLICIES), help="which runs, comma-separated")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting of the modelpool run (YAML value), to try others than the defaults",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="replay the trace this many times per policy, taking turns (results pooled)",
    )
    args = ap.parse_args()
    rng = random.Random(args.seed)
    sizes = {f"m{i}:7b": int(rng.uniform(1, 8) * GB) for i in range(args.models)}
    names = sorted(sizes)
    trace = make_trace(args.seed, args.agents, names, args.duration)
    print(
        f"machine: {platform.machine()}, Python {platform.python_version()}, {platform.platform()}"
    )
    print(
        f"trace: seed {args.seed}, {args.agents} agents, {len(names)} models (Zipf 1.1), "
        f"room for {args.capacity}, {len(trace)} requests over {args.duration:g} s, "
        f"load {args.seconds_per_gb:g} s per GB"
    )
    seen = visits(trace)
    paper_lru, paper_best = lru_loads(seen, args.capacity), optimal_loads(seen, args.capacity)
    print(
        f"on paper, {len(seen)} visits one at a time: LRU {paper_lru} loads, the clairvoyant "
        f"optimum {paper_best} ({1 - paper_best / max(1, paper_lru):.1%} fewer)"
    )
    results: dict[str, Outcome] = {}
    for key, _, value in (s.partition("=") for s in args.set):
        POLICIES["modelpool"][key] = yaml.safe_load(value)
    for policy in args.policies.split(",") * args.repeats:
        settings = POLICIES[policy]
        print(f"  {policy}: {json.dumps(settings)}")
        standin = OllamaStandin(models=sizes, seconds_per_gb=args.seconds_per_gb).start()
        try:
            models = [
                {"model_id": m, "memory_mb": sizes[m] / 2**20, "ttl_minutes": 30} for m in names
            ]
            stack = Stack(
                models,
                {"max_concurrent_models": args.capacity, "memory_limit_mb": 0, **settings},
                ollama_url=standin.url,
            )
            with running(stack):
                r = replay(stack, trace)
        finally:
            standin.stop()
        results[policy] = results[policy].plus(r) if policy in results else r
        print(summary(policy, r))
    if args.repeats > 1:
        print(f"pooled over {args.repeats} replays each:")
        for policy, r in results.items():
            print(summary(policy, r))
    if set(results) != set(POLICIES):
        return
    lru, new = results["lru"], results["modelpool"]
    fewer = 1 - new.loads / max(1, lru.loads)
    p95_new, p95_lru = pct(new.all_waits(), 0.95), pct(lru.all_waits(), 0.95)
    print(f"fewer loads than LRU: {fewer:.1%}; p95 wait {p95_new:.2f} s against {p95_lru:.2f} s")
    print(
        json.dumps(
            {
                p: {"loads": o.loads, "p95": pct(o.all_waits(), 0.95), "refusals": o.refusals}
                for p, o in results.items()
            }
        )
    )


if __name__ == "__main__":
    main()
