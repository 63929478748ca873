"""A bounded soak run: a real stack under churn, with killed workers, checked for lost requests
and leaks.

Starts the Ollama stand-in and a modelpool stack on loopback with ``--models`` Ollama models
(``soak-0`` .. ``soak-N-1``), room for one model fewer than that (so loads evict) and very short
TTLs and grace periods (so models go HOT -> COOLING -> UNLOADING -> COLD all the time). Then,
until ``--duration`` has passed:

  clients   ``--clients`` threads, each picking at random (seeded) among
              chat     non-streamed chat completion through the front door
              stream   streamed chat completion through the front door, read to ``[DONE]``
              direct   chat completion straight to the worker's port of a HOT model
              load     POST /models/{id}/load {"wait": true}
              unload   POST /models/{id}/unload
              extend   POST /models/{id}/extend-ttl {"minutes": 0.05}
  killer    every ``--kill-every`` seconds SIGKILLs the gunicorn master of a random loaded
            worker (the ``pid`` of GET /models) and times how long the control plane takes to
            stop showing that model serving from that pid
  sampler   every 5 s: processes of the stack, open fds and RSS of the control plane's
            process (its pid from GET /health), listening TCP ports of the stack, model states,
            and each model's recent transitions (GET /models/{id}/health)

Outcomes: ``ok``; ``refused`` (503 with Retry-After, reported but allowed); ``race`` (an
expected answer to a lost race: 409 from unload or extend-ttl of a model that is not loaded, a
``load`` whose model was unloaded or killed again before the answer); ``miss`` (a direct
request whose connection was refused or dropped unanswered because its model went away
meanwhile); ``error`` (anything else: a lost request, its details kept).

At the end the clients stop, the stack is brought down with ``modelpool down`` and every
process still mentioning its directory and every port of its range still listening is a leak.
Exit status 0 when there was no error and no leak, else 1.

    .venv/bin/python -m bench.soak [--duration 60] [--models 4] [--clients 8] [--kill-every 20]
                                   [--report soak.md] [--seed 1]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import signal
import statistics
import sys
import threading
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

from tests.ollama_standin import DEFAULT_MODELS, OllamaStandin
from tests.stack import Stack, processes_mentioning

KINDS = ("chat", "stream", "direct", "load", "unload", "extend")
WEIGHTS = (30, 25, 20, 9, 7, 9)
OUTCOMES = ("ok", "refused", "race", "miss", "error")
SERVING = ("HOT", "COOLING")
UPSTREAM_MODELS = list(DEFAULT_MODELS)
SAMPLE_EVERY = 5.0
REQUEST_TIMEOUT = 60.0  # a front-door request may wait for a load (load_timeout_seconds: 30)
CONTROL_TIMEOUT = 10.0  # GET /models and friends
NOTICE_TIMEOUT = 15.0  # how long a kill may go unnoticed before it is an error
CHILDREN_TIMEOUT = 10.0  # how long the killed master's worker processes are watched
MAX_SAMPLES = 20
PROMPT = [{"role": "user", "content": "Say something short."}]
HISTORY_LEN = 20  # the pool keeps this many transitions per model


# --- small helpers ----------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] * 1000


def tcp_sockets() -> list[tuple[int, int, str, str]]:
    """(local port, remote port, state in hex, inode) of every TCP socket (/proc/net/tcp*)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9:
                local = int(parts[1].rsplit(":", 1)[1], 16)
                remote = int(parts[2].rsplit(":", 1)[1], 16)
                found.append((local, remote, parts[3], parts[9]))
    return found


def listening_ports(lo: int, hi: int) -> set[int]:
    """TCP ports in lo..hi in LISTEN state (state 0A)."""
    return {local for local, _, state, _ in tcp_sockets() if state == "0A" and lo <= local <= hi}


def socket_inodes(pid: int) -> set[str]:
    found = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                found.add(target[8:-1])
    except OSError:
        pass
    return found


def close_wait(pid: int, lo: int, hi: int) -> int:
    """Sockets of ``pid`` in CLOSE_WAIT (state 08) to a port in lo..hi: the peer closed the
    connection, ``pid`` did not."""
    mine = socket_inodes(pid)
    return sum(
        1
        for _, remote, state, inode in tcp_sockets()
        if state == "08" and lo <= remote <= hi and inode in mine
    )


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state, ppid, ...)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and fields[1] == str(pid) and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_exc(exc: BaseException) -> str:
    return short(f"{type(exc).__name__}: {exc}")


def refusal_reason(detail: str) -> str:
    """A 503's message without its numbers and details, to count refusals by reason."""
    try:
        message = json.loads(detail.partition(" ")[2])["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = detail
    message = re.sub(r"\d+(\.\d+)?", "N", message.split(" (")[0])
    return short(message, 120)


def refused_connection(exc: BaseException) -> bool:
    return "refused" in str(exc).lower()


# --- what the run records -----------------------------------------------------------------------


@dataclass
class Kill:
    at: float  # seconds since the start
    model: str
    pid: int
    port: int | None
    children: list[int]
    noticed_after: float | None = None
    seen: str = ""  # what GET /models showed once noticed
    children_gone_after: float | None = None
    note: str = ""


@dataclass
class Sample:
    at: float
    processes: int
    cp_pid: int | None
    fds: int | None
    rss_mb: float | None
    listening: list[int]
    states: dict[str, int]
    stray_ports: list[int]
    orphans: list[int]
    close_wait: int | None


@dataclass
class Tally:
    """Counts, latencies and error samples; shared by every thread."""

    started: float
    lock: threading.Lock = field(default_factory=threading.Lock)
    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    skipped: Counter[str] = field(default_factory=Counter)
    errors: list[dict[str, Any]] = field(default_factory=list)
    refusals: Counter[str] = field(default_factory=Counter)
    misses: list[dict[str, Any]] = field(default_factory=list)

    def record(
        self, kind: str, outcome: str, model: str, elapsed: float | None = None, detail: str = ""
    ) -> None:
        sample = {
            "at": round(time.monotonic() - self.started, 2),
            "kind": kind,
            "model": model,
            "detail": detail,
        }
        with self.lock:
            self.counts[kind, outcome] += 1
            if outcome == "ok" and elapsed is not None:
                self.latencies[kind].append(elapsed)
            if outcome == "refused":
                self.refusals[refusal_reason(detail)] += 1
            keep = {"error": self.errors, "miss": self.misses}.get(outcome)
            if keep is not None and len(keep) < MAX_SAMPLES:
                keep.append(sample)

    def error_count(self) -> int:
        with self.lock:
            return sum(n for (_, outcome), n in self.counts.items() if outcome == "error")


# --- the run ------------------------------------------------------------------------------------


class Soak:
    def __init__(self, args: argparse.Namespace, stack: Stack, model_ids: list[str]) -> None:
        self.args = args
        self.stack = stack
        self.model_ids = model_ids
        self.url = stack.url
        self.started = time.monotonic()
        self.deadline = self.started + args.duration
        self.stop = threading.Event()
        self.tally = Tally(self.started)
        self.kills: list[Kill] = []
        self.killed_pids: set[int] = set()
        self.killed_children: set[int] = set()
        self.samples: list[Sample] = []
        self.transitions: Counter[str] = Counter()
        self.history_seen: dict[str, set[tuple[Any, ...]]] = defaultdict(set)
        self.history_gaps: set[str] = set()
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()
        self.cp_pids: set[int] = set()
        self.lifecycle: dict[str, Counter[str]] = {}
        self.ended: float | None = None

    def now(self) -> float:
        return time.monotonic() - self.started

    # -- control-plane reads ---------------------------------------------------------------------

    def model_path(self, model: str, suffix: str = "") -> str:
        return f"{self.url}/models/{quote(model, safe=':')}{suffix}"

    def models(self) -> dict[str, dict[str, Any]]:
        r = requests.get(f"{self.url}/models", timeout=CONTROL_TIMEOUT)
        r.raise_for_status()
        return {m["model_id"]: m for m in r.json()["models"]}

    def model_view(self, model: str) -> dict[str, Any]:
        r = requests.get(self.model_path(model), timeout=CONTROL_TIMEOUT)
        r.raise_for_status()
        view: dict[str, Any] = r.json()
        return view

    def went_away(self, model: str, port: int, pid: int | None) -> str:
        """Why a HOT model seen on ``port`` with ``pid`` is no longer there ('' if it is)."""
        with self.lock:
            if pid in self.killed_pids:
                return f"pid {pid} was SIGKILLed"
        try:
            view = self.model_view(model)
        except (requests.RequestException, ValueError):
            return ""
        if view["state"] not in SERVING:
            return f"now {view['state']}"
        if view["port"] != port or view["pid"] != pid:
            return f"now {view['state']} on port {view['port']} pid {view['pid']}"
        return ""

    # -- client requests -----------------------------------------------------------------------

    def classify(self, kind: str, model: str, r: requests.Response, elapsed: float) -> bool:
        """Record a non-200 answer; True if the answer was 200 and is left to the caller."""
        if r.status_code == 200:
            return True
        text = short(r.text)
        if r.status_code == 503 and r.headers.get("Retry-After"):
            self.tally.record(kind, "refused", model, elapsed, f"503 {r.text}")
        else:
            self.tally.record(kind, "error", model, elapsed, f"HTTP {r.status_code}: {text}")
        return False

    def chat_body(self, model: str, stream: bool = False) -> dict[str, Any]:
        return {"model": model, "messages": PROMPT, "max_tokens": 8, "stream": stream}

    def do_chat(self, model: str) -> None:
        t0 = time.perf_counter()
        try:
            r = requests.post(
                f"{self.url}/v1/chat/completions",
                json=self.chat_body(model),
                timeout=REQUEST_TIMEOUT,
            )
        except requests.RequestException as exc:
            self.tally.record("chat", "error", model, detail=describe_exc(exc))
            return
        elapsed = time.perf_counter() - t0
        if not self.classify("chat", model, r, elapsed):
            return
        try:
            content = r.json()["choices"][0]["message"]["content"]
            assert isinstance(content, str) and content, "empty content"
        except (ValueError, KeyError, IndexError, TypeError, AssertionError) as exc:
            detail = f"200 with a bad body ({describe_exc(exc)}): {short(r.text)}"
            self.tally.record("chat", "error", model, elapsed, detail)
            return
        self.tally.record("chat", "ok", model, elapsed)

    def do_stream(self, model: str) -> None:
        t0 = time.perf_counter()
        try:
            r = requests.post(
                f"{self.url}/v1/chat/completions",
                json=self.chat_body(model, stream=True),
                timeout=(5, REQUEST_TIMEOUT),
                stream=True,
            )
        except requests.RequestException as exc:
            self.tally.record("stream", "error", model, detail=describe_exc(exc))
            return
        with r:
            if r.status_code != 200:
                self.classify("stream", model, r, time.perf_counter() - t0)
                return
            try:
                data = b"".join(r.iter_content(chunk_size=None))
            except requests.RequestException as exc:
                detail = f"truncated stream: {describe_exc(exc)}"
                self.tally.record("stream", "error", model, detail=detail)
                return
        elapsed = time.perf_counter() - t0
        problem = sse_problem(data)
        if problem:
            detail = f"{problem}; stream tail: {short(repr(data[-200:]))}"
            self.tally.record("stream", "error", model, elapsed, detail)
        else:
            self.tally.record("stream", "ok", model, elapsed)

    def do_direct(self, model: str) -> None:
        try:
            view = self.model_view(model)
        except (requests.RequestException, ValueError) as exc:
            self.tally.record("direct", "error", model, detail=f"GET model: {describe_exc(exc)}")
            return
        port, pid = view.get("port"), view.get("pid")
        if view["state"] != "HOT" or not port:
            with self.tally.lock:
                self.tally.skipped["direct"] += 1
            return
        t0 = time.perf_counter()
        try:
            r = requests.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json=self.chat_body(model),
                timeout=REQUEST_TIMEOUT,
            )
        except requests.ConnectionError as exc:
            # Refused, or dropped before any answer: expected if the model went away meanwhile.
            why = self.went_away(model, port, pid)
            how = "refused" if refused_connection(exc) else "dropped unanswered"
            if why:
                self.tally.record("direct", "miss", model, detail=f"{how} on port {port}: {why}")
            else:
                detail = f"{how} on port {port} while still HOT: {describe_exc(exc)}"
                self.tally.record("direct", "error", model, detail=detail)
            return
        except requests.RequestException as exc:
            self.tally.record("direct", "error", model, detail=describe_exc(exc))
            return
        elapsed = time.perf_counter() - t0
        if not self.classify("direct", model, r, elapsed):
            return
        try:
            content = r.json()["choices"][0]["message"]["content"]
            assert isinstance(content, str) and content, "empty content"
        except (ValueError, KeyError, IndexError, TypeError, AssertionError) as exc:
            detail = f"200 with a bad body ({describe_exc(exc)}): {short(r.text)}"
            self.tally.record("direct", "error", model, elapsed, detail)
            return
        self.tally.record("direct", "ok", model, elapsed)

    def control(
        self, kind: str, model: str, action: str, body: dict[str, Any], judge: Callable[..., str]
    ) -> None:
        """POST a control call; ``judge(status, json)`` names the outcome of a non-503 answer."""
        t0 = time.perf_counter()
        try:
            r = requests.post(self.model_path(model, action), json=body, timeout=REQUEST_TIMEOUT)
        except requests.RequestException as exc:
            self.tally.record(kind, "error", model, detail=describe_exc(exc))
            return
        elapsed = time.perf_counter() - t0
        if r.status_code == 503 and r.headers.get("Retry-After"):
            self.tally.record(kind, "refused", model, elapsed, f"503 {r.text}")
            return
        try:
            data = r.json()
        except ValueError:
            data = {}
        outcome = judge(r.status_code, data if isinstance(data, dict) else {})
        detail = "" if outcome == "ok" else f"HTTP {r.status_code}: {short(r.text)}"
        self.tally.record(kind, outcome, model, elapsed, detail)

    def do_load(self, model: str) -> None:
        def judge(status: int, data: dict[str, Any]) -> str:
            if status == 200 and data.get("state") in SERVING:
                return "ok"
            # wait=true came back after the load, but another client (or the killer) already
            # unloaded or killed the model again.
            if status == 202 and data.get("state") in ("UNLOADING", "COLD", "FAILED"):
                return "race"
            return "error"

        self.control("load", model, "/load", {"wait": True}, judge)

    def do_unload(self, model: str) -> None:
        def judge(status: int, data: dict[str, Any]) -> str:
            if status in (200, 202):
                return "ok"
            return "race" if status == 409 else "error"

        self.control("unload", model, "/unload", {}, judge)

    def do_extend(self, model: str) -> None:
        def judge(status: int, data: dict[str, Any]) -> str:
            if status == 200:
                return "ok"
            return "race" if status == 409 else "error"

        self.control("extend", model, "/extend-ttl", {"minutes": 0.05}, judge)

    def client(self, index: int) -> None:
        rng = random.Random(f"{self.args.seed}-client-{index}")
        actions: dict[str, Callable[[str], None]] = {
            "chat": self.do_chat,
            "stream": self.do_stream,
            "direct": self.do_direct,
            "load": self.do_load,
            "unload": self.do_unload,
            "extend": self.do_extend,
        }
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            kind = rng.choices(KINDS, WEIGHTS)[0]
            model = rng.choice(self.model_ids)
            try:
                actions[kind](model)
            except Exception as exc:  # a bug here must show up, not end the thread silently
                detail = f"soak client failed: {describe_exc(exc)} {traceback.format_exc(-1)}"
                self.tally.record(kind, "error", model, detail=short(detail))

    # -- the killer ----------------------------------------------------------------------------

    def killer(self) -> None:
        rng = random.Random(f"{self.args.seed}-killer")
        next_at = self.started + self.args.kill_every
        while not self.stop.wait(max(0.0, next_at - time.monotonic())):
            if self.deadline - time.monotonic() < 2:
                return
            try:
                victims = [
                    m
                    for m in self.models().values()
                    if m["state"] in SERVING and m.get("pid") and "gunicorn" in cmdline(m["pid"])
                ]
            except (requests.RequestException, ValueError):
                victims = []
            if not victims:
                next_at = time.monotonic() + 0.5  # nothing loaded right now: look again soon
                continue
            self.kill(rng.choice(sorted(victims, key=lambda m: m["model_id"])))
            next_at = max(next_at + self.args.kill_every, time.monotonic() + 1)

    def kill(self, view: dict[str, Any]) -> None:
        model, pid = view["model_id"], int(view["pid"])
        children = children_of(pid)
        with self.lock:
            self.killed_pids.add(pid)
            self.killed_children.update(children)
        t0 = time.monotonic()
        kill = Kill(round(t0 - self.started, 2), model, pid, view["port"], children)
        self.kills.append(kill)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            kill.note = "already gone"
            return
        limit = t0 + NOTICE_TIMEOUT
        while time.monotonic() < limit:
            try:
                now = self.model_view(model)
            except (requests.RequestException, ValueError):
                now = None
            if now is not None and not (now["state"] in SERVING and now.get("pid") == pid):
                kill.noticed_after = time.monotonic() - t0
                kill.seen = f"{now['state']} pid {now.get('pid')}"
                break
            time.sleep(0.05)
        else:
            kill.note = f"still shown serving from pid {pid} after {NOTICE_TIMEOUT:.0f} s"
            self.tally.record("kill", "error", model, detail=kill.note)
        limit = t0 + CHILDREN_TIMEOUT
        while any(alive(c) for c in children) and time.monotonic() < limit:
            time.sleep(0.05)
        left = [c for c in children if alive(c)]
        if left:
            kill.note = (kill.note + "; " if kill.note else "") + (
                f"worker processes {left} still alive {CHILDREN_TIMEOUT:.0f} s after the kill"
            )
        else:
            kill.children_gone_after = time.monotonic() - t0

    # -- the sampler -----------------------------------------------------------------------------

    def sample(self) -> Sample:
        root = str(self.stack.root)
        procs = processes_mentioning(root)
        cp_pid = None
        try:
            cp_pid = int(requests.get(f"{self.url}/health", timeout=CONTROL_TIMEOUT).json()["pid"])
            self.cp_pids.add(cp_pid)
        except (requests.RequestException, ValueError, KeyError, TypeError):
            pass
        listening = listening_ports(self.stack.control_port, self.stack.port_end)
        states: Counter[str] = Counter()
        claimed: set[int] = {self.stack.control_port}
        try:
            for m in self.models().values():
                states[m["state"]] += 1
                if m["state"] != "COLD" and m.get("port"):
                    claimed.add(m["port"])
        except (requests.RequestException, ValueError):
            states["(GET /models failed)"] += 1
        with self.lock:
            orphans = sorted(c for c in self.killed_children if alive(c))
        return Sample(
            at=round(self.now(), 1),
            processes=len(procs),
            cp_pid=cp_pid,
            fds=fd_count(cp_pid) if cp_pid else None,
            rss_mb=rss_mb(cp_pid) if cp_pid else None,
            listening=sorted(listening),
            states=dict(sorted(states.items())),
            stray_ports=sorted(listening - claimed),
            orphans=orphans,
            close_wait=close_wait(cp_pid, self.stack.port_start, self.stack.port_end)
            if cp_pid
            else None,
        )

    def poll_histories(self) -> None:
        for model in self.model_ids:
            try:
                r = requests.get(self.model_path(model, "/health"), timeout=CONTROL_TIMEOUT)
                history = r.json()["history"]
            except (requests.RequestException, ValueError, KeyError):
                continue
            seen = self.history_seen[model]
            keys = [(t["from"], t["to"], t["at"], t["reason"]) for t in history]
            if seen and len(keys) >= HISTORY_LEN and keys[0] not in seen:
                self.history_gaps.add(model)  # more transitions than the pool remembers
            for key in keys:
                if key not in seen:
                    seen.add(key)
                    self.transitions[f"{key[0]} -> {key[1]}"] += 1

    def time_in_state(self) -> dict[str, list[float]]:
        """How long each stay in a state lasted, from consecutive transitions of a model."""
        out: dict[str, list[float]] = defaultdict(list)
        for seen in self.history_seen.values():
            ordered = sorted(seen, key=lambda key: key[2])
            for (_, into, at, _), (left, _, then, _) in itertools.pairwise(ordered):
                if into == left:
                    out[into].append(then - at)
        return out

    def sampler(self) -> None:
        while not self.stop.wait(SAMPLE_EVERY):
            try:
                self.samples.append(self.sample())
                self.poll_histories()
            except Exception as exc:  # keep sampling; show the failure
                self.tally.record("soak", "error", "-", detail=f"sampler: {describe_exc(exc)}")

    # -- the whole run -----------------------------------------------------------------------

    def start(self) -> None:
        self.samples.append(self.sample())
        self.poll_histories()
        for i in range(self.args.clients):
            self.threads.append(threading.Thread(target=self.client, args=(i,), daemon=True))
        if self.args.kill_every > 0:
            self.threads.append(threading.Thread(target=self.killer, daemon=True))
        self.threads.append(threading.Thread(target=self.sampler, daemon=True))
        for t in self.threads:
            t.start()

    def wait(self) -> None:
        self.stop.wait(max(0.0, self.deadline - time.monotonic()))

    def finish(self) -> list[str]:
        """Stop every thread (each is bounded); names of threads that did not end in time."""
        self.stop.set()
        limit = time.monotonic() + REQUEST_TIMEOUT + 10
        for t in self.threads:
            t.join(max(0.1, limit - time.monotonic()))
        self.ended = self.now()
        hung = [t.name for t in self.threads if t.is_alive()]
        for name in hung:
            self.tally.record("soak", "error", "-", detail=f"thread {name} did not end in time")
        return hung

    def final_sample(self) -> None:
        """The last sample, histories and /metrics: taken after the clients, before down."""
        self.samples.append(self.sample())
        self.poll_histories()
        self.lifecycle = self.metrics()

    def metrics(self) -> dict[str, Counter[str]]:
        """Lifecycle counters from /metrics, summed over models (by reason where there is one)."""
        out: dict[str, Counter[str]] = defaultdict(Counter)
        try:
            text = requests.get(f"{self.url}/metrics", timeout=CONTROL_TIMEOUT).text
        except requests.RequestException:
            return out
        wanted = ("loads", "unloads", "load_failures", "capacity_refusals")
        pattern = re.compile(r"^modelpool_(\w+)_total\{([^}]*)\} (\S+)$")
        for line in text.splitlines():
            m = pattern.match(line)
            if not m or m.group(1) not in wanted:
                continue
            reason = re.search(r'reason="([^"]*)"', m.group(2))
            value = float(m.group(3))
            if value:
                out[m.group(1)][reason.group(1) if reason else "all"] += int(value)
        return out


def sse_problem(data: bytes) -> str:
    """What is wrong with a complete SSE body of a chat completion ('' if nothing)."""
    events = [
        line[5:].strip()
        for line in data.replace(b"\r\n", b"\n").split(b"\n")
        if line[:5] == b"data:"
    ]
    if not events:
        return "no data: events"
    if events[-1] != b"[DONE]":
        return "stream does not end with data: [DONE]"
    chunks = 0
    for event in events[:-1]:
        try:
            payload = json.loads(event)
        except ValueError:
            return f"an event is not JSON: {short(repr(event), 120)}"
        if "error" in payload:
            return f"error event: {short(json.dumps(payload['error']), 200)}"
        if payload.get("choices"):
            chunks += 1
    return "" if chunks else "no chunk with choices"


# --- logs and report ------------------------------------------------------------------------------


def log_problems(run_dir: Path, limit: int = 3) -> tuple[Counter[str], list[str]]:
    """Tracebacks per log file of the stack, and the first few of them."""
    counts: Counter[str] = Counter()
    excerpts: list[str] = []
    for path in sorted((run_dir / "logs").glob("*.log")):
        lines = path.read_text(errors="replace").splitlines()
        for i, line in enumerate(lines):
            if line.startswith("Traceback"):
                counts[path.name] += 1
                if len(excerpts) < limit:
                    end = i + 1
                    while end < len(lines) and lines[end][:1] in (" ", "\t"):
                        end += 1
                    tail = lines[max(i - 1, 0) : min(end + 1, len(lines))]
                    excerpts.append(f"{path.name}:\n" + "\n".join(tail[-25:]))
    return counts, excerpts


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(head: Iterable[str], rows: Iterable[Iterable[Any]]) -> list[str]:
    head = list(head)
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def resource_rows(samples: list[Sample]) -> list[list[Any]]:
    rows = []
    series: dict[str, Callable[[Sample], float | None]] = {
        "stack processes": lambda s: s.processes,
        "control-plane open fds": lambda s: s.fds,
        "control-plane RSS MB": lambda s: s.rss_mb,
        "listening ports of the stack": lambda s: len(s.listening),
        "control-plane sockets in CLOSE_WAIT to workers": lambda s: s.close_wait,
    }
    for name, get in series.items():
        values = [v for v in (get(s) for s in samples) if v is not None]
        if not values:
            rows.append([name, "-", "-", "-", "-"])
            continue
        first, last = values[0], values[-1]
        rows.append([name, fmt(first), fmt(last), fmt(max(values)), f"{last - first:+.1f}"])
    return rows


@dataclass
class Ending:
    """What happened after the clients stopped."""

    leaked: list[tuple[int, str]] = field(default_factory=list)
    ports_open: list[int] = field(default_factory=list)
    down_seconds: float | None = None
    log_counts: Counter[str] = field(default_factory=Counter)
    log_excerpts: list[str] = field(default_factory=list)
    aborted: str = ""


def report(
    args: argparse.Namespace, soak: Soak | None, stack: Stack | None, end: Ending
) -> tuple[list[str], bool]:
    """The report as Markdown lines, and whether the run passed."""
    lines = ["# modelpool soak", ""]
    if stack is not None:
        lines.append(
            f"- stack: {stack.root}, control port {stack.control_port}, "
            f"worker ports {stack.port_start}-{stack.port_end}"
        )
    lines.append(
        f"- settings: {args.models} models, max_concurrent_models {max(1, args.models - 1)}, "
        f"ttl {args.ttl_minutes} min, grace {args.grace_minutes} min, {args.clients} clients, "
        f"kill every {args.kill_every} s, seed {args.seed}, token delay {args.token_delay} s, "
        f"load delay {args.load_delay} s"
    )
    failures: list[str] = []
    if end.aborted:
        lines += ["", f"**aborted**: {end.aborted}"]
        failures.append("aborted")
    if soak is not None:
        lines.append(f"- clients ran {fmt(soak.ended)} s (the last in-flight requests included)")
        lines += report_run(soak, failures)
    lines += ["", "## Leaks (after modelpool down)", ""]
    lines.append(f"- modelpool down took {fmt(end.down_seconds)} s")
    lines.append(f"- processes left: {len(end.leaked)}")
    lines += [f"  - pid {pid}: `{short(cmd, 200)}`" for pid, cmd in end.leaked]
    lines.append(f"- ports still listening: {end.ports_open or 'none'}")
    if end.leaked:
        failures.append(f"{len(end.leaked)} processes leaked")
    if end.ports_open:
        failures.append(f"ports {end.ports_open} still listening")
    if end.log_counts:
        lines += ["", "## Tracebacks in the stack's logs", ""]
        lines += [f"- {name}: {n}" for name, n in sorted(end.log_counts.items())]
        for excerpt in end.log_excerpts:
            lines += ["", "```", excerpt, "```"]
    lines += ["", "## Verdict", ""]
    lines.append("PASS" if not failures else "FAIL: " + "; ".join(failures))
    return lines, not failures


def report_run(soak: Soak, failures: list[str]) -> list[str]:
    tally = soak.tally
    lines = ["", "## Requests", ""]
    rows = []
    for kind in (*KINDS, "kill", "soak"):
        counts = [tally.counts[kind, o] for o in OUTCOMES]
        if kind in ("kill", "soak") and not any(counts):
            continue
        lat = tally.latencies.get(kind, [])
        p50 = f"{pct(lat, 50):.0f}" if lat else "-"
        p99 = f"{pct(lat, 99):.0f}" if lat else "-"
        rows.append([kind, sum(counts), *counts, p50, p99])
    lines += table(["kind", "sent", *OUTCOMES, "p50 ms", "p99 ms"], rows)
    lines.append("")
    lines.append(
        f"- direct requests not sent because the model was not HOT: {tally.skipped['direct']}"
    )
    lost = tally.error_count()
    lines.append(f"- lost requests (errors): {lost}")
    if lost:
        failures.append(f"{lost} errors")

    lines += ["", "## Kills", ""]
    if soak.kills:
        rows = [
            [
                i + 1,
                f"{k.at:.1f}",
                k.model,
                k.pid,
                k.port,
                fmt(k.noticed_after, 2),
                k.seen or "-",
                fmt(k.children_gone_after, 2),
                k.note or "",
            ]
            for i, k in enumerate(soak.kills)
        ]
        lines += table(
            ["#", "at s", "model", "pid", "port", "noticed after s", "then", "workers gone s", ""],
            rows,
        )
    else:
        lines.append("no kill (nothing was loaded at kill time, or --kill-every 0)")

    lines += ["", "## Lifecycle", ""]
    if soak.transitions:
        lines.append(
            "Transitions seen in GET /models/{id}/health histories"
            + (
                f" (a lower bound: {sorted(soak.history_gaps)} changed faster than sampled)"
                if soak.history_gaps
                else ""
            )
            + ":"
        )
        lines.append("")
        lines += table(["transition", "count"], sorted(soak.transitions.items()))
        lines += ["", "Time spent in a state (from the same histories):", ""]
        rows = [
            [state, len(d), f"{statistics.median(d):.2f}", f"{max(d):.2f}"]
            for state, d in sorted(soak.time_in_state().items())
        ]
        lines += table(["state", "stays", "median s", "max s"], rows)
    metrics = soak.lifecycle
    if metrics:
        lines.append("")
        lines.append("From /metrics (all models):")
        lines.append("")
        for name, by in sorted(metrics.items()):
            parts = ", ".join(f"{k} {v}" for k, v in sorted(by.items()))
            lines.append(f"- {name}: {sum(by.values())} ({parts})")

    lines += ["", "## Resources (sampled every 5 s)", ""]
    lines += table(["what", "first", "last", "max", "growth"], resource_rows(soak.samples))
    if len(soak.cp_pids) > 1:
        lines.append(f"- the control plane's process changed: pids {sorted(soak.cp_pids)}")
    lines += ["", "Samples:", ""]
    lines += table(
        [
            "at s",
            "procs",
            "fds",
            "RSS MB",
            "listening",
            "CLOSE_WAIT",
            "stray ports",
            "orphans",
            "states",
        ],
        [
            [
                s.at,
                s.processes,
                s.fds if s.fds is not None else "-",
                fmt(s.rss_mb),
                len(s.listening),
                s.close_wait if s.close_wait is not None else "-",
                s.stray_ports or "",
                s.orphans or "",
                " ".join(f"{k} {v}" for k, v in s.states.items()),
            ]
            for s in soak.samples
        ],
    )
    lines.append("")
    lines.append(
        "(stray ports: listening in the stack's range but held by no loaded model; orphans: "
        "worker processes of a killed master still alive)"
    )

    if tally.refusals:
        lines += ["", "## Refusals (503 with Retry-After) by reason", ""]
        lines += table(["reason", "count"], tally.refusals.most_common())
    for title, samples in (("Errors", tally.errors), ("Direct misses", tally.misses)):
        if samples:
            lines += ["", f"## {title} (first {MAX_SAMPLES})", ""]
            lines += [f"- {s['at']:.2f} s {s['kind']} {s['model']}: {s['detail']}" for s in samples]
    return lines


# --- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bin/soak", description=(__doc__ or "").splitlines()[0].rstrip(",")
    )
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    p.add_argument("--models", type=int, default=4, help="models soak-0..soak-N-1 (default 4)")
    p.add_argument("--ttl-minutes", type=float, default=0.02, help="model TTL (default 0.02)")
    p.add_argument("--grace-minutes", type=float, default=0.01, help="grace (default 0.01)")
    p.add_argument("--clients", type=int, default=8, help="client threads (default 8)")
    p.add_argument(
        "--kill-every", type=float, default=20.0, help="seconds between SIGKILLs (0: none)"
    )
    p.add_argument("--report", type=Path, help="also write the report to this Markdown file")
    p.add_argument("--seed", type=int, default=1, help="seed of the clients' choices")
    p.add_argument("--token-delay", type=float, default=0.01, help="stand-in seconds per token")
    p.add_argument("--load-delay", type=float, default=0.05, help="stand-in seconds per load")
    p.add_argument("--keep", action="store_true", help="keep the stack's directory (logs)")
    args = p.parse_args(argv)
    if args.models < 2:
        p.error("--models must be at least 2 (one fewer fit, so that loads evict)")
    if args.duration <= 0 or args.clients < 1:
        p.error("--duration must be positive and --clients at least 1")
    return args


def build_stack(args: argparse.Namespace, standin: OllamaStandin) -> tuple[Stack, list[str]]:
    ids = [f"soak-{i}" for i in range(args.models)]
    entries = [
        {
            "model_id": model,
            "backend": "ollama",
            "upstream_model": UPSTREAM_MODELS[i % len(UPSTREAM_MODELS)],
            "ttl_minutes": args.ttl_minutes,
        }
        for i, model in enumerate(ids)
    ]
    settings = {
        "default_ttl_minutes": args.ttl_minutes,
        "min_ttl_minutes": min(0.01, args.ttl_minutes),
        "grace_period_minutes": args.grace_minutes,
        "max_concurrent_models": max(1, args.models - 1),
    }
    return Stack(entries, settings, ollama_url=standin.url), ids


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    standin = OllamaStandin(token_delay=args.token_delay, load_delay=args.load_delay)
    stack: Stack | None = None
    soak: Soak | None = None
    end = Ending()
    try:
        standin.start()
        stack, ids = build_stack(args, standin)
        print(f"starting a stack in {stack.root} ...", file=sys.stderr, flush=True)
        stack.up()
        soak = Soak(args, stack, ids)
        print(
            f"soaking for {args.duration:.0f} s with {args.clients} clients ...",
            file=sys.stderr,
            flush=True,
        )
        soak.start()
        soak.wait()
    except BaseException as exc:  # also Ctrl-C: report what ran, and clean up
        end.aborted = describe_exc(exc) if str(exc) else type(exc).__name__
        if not isinstance(exc, KeyboardInterrupt):
            traceback.print_exc()
    finally:
        if soak is not None:
            soak.finish()
            try:
                soak.final_sample()
            except Exception as exc:
                end.aborted = end.aborted or f"final sample failed: {describe_exc(exc)}"
        if stack is not None:
            t0 = time.monotonic()
            try:
                end.leaked = stack.down()
            except Exception as exc:  # e.g. modelpool down timed out: kill what is left
                end.aborted = end.aborted or f"modelpool down failed: {describe_exc(exc)}"
                end.leaked = processes_mentioning(str(stack.root))
                for pid, _ in end.leaked:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            end.down_seconds = time.monotonic() - t0
            end.ports_open = sorted(listening_ports(stack.control_port, stack.port_end))
            if stack.run_dir.exists():
                end.log_counts, end.log_excerpts = log_problems(stack.run_dir)
            if args.keep:
                print(f"kept {stack.root}", file=sys.stderr)
            else:
                stack.cleanup()
        standin.stop()
    lines, passed = report(args, soak, stack, end)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.report:
        args.report.write_text(text)
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
