"""A stand-in for the Ollama server: the one fake of an external service in the test suite.

It speaks the parts of Ollama's HTTP API that modelpool relies on, as Ollama answers them: the
native API (``/api/generate``, ``/api/chat``, ``/api/ps``, ``/api/tags``, ``/api/version``) and
the OpenAI-compatible ``/v1`` endpoints, so it doubles as a fast local OpenAI-compatible
upstream. Answers are deterministic: the reply text split into words, one word per token.

Behaviour copied from Ollama because modelpool depends on it:

- a request without a prompt (or with no messages) only loads or unloads the model;
- ``keep_alive`` sets how long the model stays loaded after a request: ``0`` unloads, a negative
  value keeps it for ever, absent means the server default (five minutes);
- the ``/v1`` endpoints ignore ``keep_alive`` and reset the model to the default expiry;
- a request whose runner options (``num_ctx`` and friends) differ from the loaded model's
  reloads the model (``load_counts`` shows it).

Run it standalone with ``python -m tests.ollama_standin --port 11434 --load-delay 0.5``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from tests import standin_model

DEFAULT_MODELS: dict[str, int] = {
    "qwen2.5-coder:7b": 4_700_000_000,
    "llama3.1:8b": 4_900_000_000,
    "tiny:1b": 800_000_000,
}
DEFAULT_REPLY = "The quick brown fox jumps over the lazy dog while the pool keeps every model warm."
#: Ollama's default ``keep_alive``: five minutes.
DEFAULT_KEEP_ALIVE = 300.0
VERSION = "0.6.5"
THREAD_PREFIX = "ollama-standin"
# Options that shape the runner rather than sampling: Ollama reloads a model when one differs.
RUNNER_OPTIONS = ("num_ctx", "num_batch", "num_gpu", "main_gpu", "use_mmap", "num_thread")

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


class Call(NamedTuple):
    """One request the stand-in received."""

    method: str
    path: str
    body: Any


class _HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class _Loaded:
    size: int
    runner: dict[str, Any]
    expires_at: float | None = None  # wall clock; None while in use or when kept for ever
    refs: int = 0


def parse_keep_alive(value: Any) -> float | None:
    """Seconds to keep a model after a request (negative: for ever; None: the default).

    Ollama takes a number of seconds or a Go duration string such as ``"5m"`` or ``"-1m"``.
    """
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(text)
        except ValueError:
            pass
        sign = -1.0 if text.startswith("-") else 1.0
        unsigned = text.lstrip("+-")
        parts = _DURATION_PART.findall(unsigned)
        if unsigned and "".join(n + u for n, u in parts) == unsigned:
            return sign * sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    raise ValueError(f"time: invalid duration {value!r}")


def plan_reply(reply: str, num_predict: Any = None, stop: Any = None) -> tuple[list[str], str]:
    """The pieces a generation streams and its done reason (``stop`` or ``length``).

    One word is one token; ``num_predict`` caps the tokens (negative: no cap); the text ends
    before the first ``stop`` string.
    """
    words = reply.split()
    limit = len(words)
    if isinstance(num_predict, int) and not isinstance(num_predict, bool) and num_predict >= 0:
        limit = min(limit, num_predict)
    reason = "length" if limit < len(words) else "stop"
    pieces = [word if i == 0 else " " + word for i, word in enumerate(words[:limit])]
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    text = "".join(pieces)
    cuts = [text.find(s) for s in stops if isinstance(s, str) and s and s in text]
    if not cuts:
        return pieces, reason
    cut, kept, pos = min(cuts), [], 0
    for piece in pieces:
        if pos + len(piece) > cut:
            if cut > pos:
                kept.append(piece[: cut - pos])
            break
        kept.append(piece)
        pos += len(piece)
    return kept, "stop"


def count_words(content: Any) -> int:
    """Prompt tokens: whitespace-separated words in a string, a list of parts or of strings."""
    if isinstance(content, str):
        return len(content.split())
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, dict):
                total += count_words(part.get("text") or part.get("content"))
            else:
                total += count_words(part)
        return total
    return 0


def _full_name(name: str) -> str:
    # Ollama names without a tag mean ":latest" ("llama3" is "llama3:latest").
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


def _iso(at: float | None = None) -> str:
    moment = datetime.now(UTC) if at is None else datetime.fromtimestamp(at, UTC)
    return moment.isoformat().replace("+00:00", "Z")


def _details(name: str) -> dict[str, Any]:
    base, _, tag = name.rpartition(":")
    family = re.match(r"[a-z]+\d*", base.rsplit("/", 1)[-1])
    size = re.match(r"(\d+(?:\.\d+)?)b", tag)
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family.group(0) if family else "llama",
        "families": [family.group(0) if family else "llama"],
        "parameter_size": size.group(0).upper() if size else "unknown",
        "quantization_level": "Q4_K_M",
    }


class _Server(ThreadingHTTPServer):
    """A threading HTTP server that can close its open connections when it stops."""

    daemon_threads = True
    # Like a real server: many clients may connect at once (the default backlog is 5).
    request_queue_size = 1024
    block_on_close = False

    def __init__(self, address: tuple[str, int], standin: OllamaStandin) -> None:
        super().__init__(address, _Handler)
        self.standin = standin
        self._conns: dict[threading.Thread, socket.socket] = {}
        self._conns_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self._serve, args=(request, client_address), name=f"{THREAD_PREFIX}-conn"
        )
        thread.daemon = True
        with self._conns_lock:
            self._conns[thread] = request
        thread.start()

    def _serve(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            with self._conns_lock:
                self._conns.pop(threading.current_thread(), None)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):  # clients may hang up any time
            super().handle_error(request, client_address)

    def close_connections(self, timeout: float) -> None:
        with self._conns_lock:
            conns = dict(self._conns)
        for sock in conns.values():
            try:
                # Wakes threads blocked reading a keep-alive connection or writing a stream.
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        deadline = time.monotonic() + timeout
        for thread in conns:
            thread.join(max(0.0, deadline - time.monotonic()))


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 so streams can use chunked transfer encoding and clients can keep connections.
    protocol_version = "HTTP/1.1"
    server_version = "ollama-standin"
    # Real servers (Ollama, vLLM) send small writes at once; with Nagle's algorithm a body
    # written after its headers waits for the client's delayed ACK (about 40 ms).
    disable_nagle_algorithm = True
    server: _Server

    def do_GET(self) -> None:
        self.server.standin._handle(self, "GET")

    def do_POST(self) -> None:
        self.server.standin._handle(self, "POST")

    def do_HEAD(self) -> None:
        self.server.standin._handle(self, "HEAD")

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.standin.verbose:
            super().log_message(format, *args)

    def read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def send_bytes(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_json(self, status: int, payload: Any) -> None:
        self.send_bytes(status, json.dumps(payload).encode(), "application/json; charset=utf-8")

    def start_chunked(self, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def write_chunk(self, data: bytes) -> None:
        if data:  # an empty chunk would end the body
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def end_chunked(self) -> None:
        self.wfile.write(b"0\r\n\r\n")


def _ndjson(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload).encode() + b"\n"


def _sse(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


class OllamaStandin:
    """An in-process Ollama look-alike on a loopback port, for tests and local runs.

    Runtime-settable attributes: ``load_delay`` and ``token_delay`` (seconds), ``reply``,
    ``models`` (name -> size in bytes), ``default_keep_alive`` (seconds) and ``fail_next_load``
    (an error message: the next model load answers HTTP 500 with it, once).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        models: dict[str, int] | None = None,
        load_delay: float = 0.0,
        token_delay: float = 0.0,
        reply: str = DEFAULT_REPLY,
        *,
        default_keep_alive: float = DEFAULT_KEEP_ALIVE,
        verbose: bool = False,
        seconds_per_gb: float = 0.0,
        library: dict[str, int] | None = None,
        pull_seconds: float = 1.0,
        num_parallel: int = 0,
    ) -> None:
        self.host = host
        self.models: dict[str, int] = {
            _full_name(k): v for k, v in (DEFAULT_MODELS if models is None else models).items()
        }
        self.load_delay = load_delay
        #: More load time per GiB of the model's size (a big model takes longer, as in Ollama).
        self.seconds_per_gb = seconds_per_gb
        #: Models ``/api/pull`` can fetch (name: size), as the Ollama library has them.
        self.library: dict[str, int] = {_full_name(k): v for k, v in (library or {}).items()}
        #: How long a pull takes (its progress lines come over that time).
        self.pull_seconds = pull_seconds
        #: Requests a model works on at once (Ollama's ``OLLAMA_NUM_PARALLEL``); the rest wait
        #: in line. 0: no limit.
        self.num_parallel = num_parallel
        #: The most requests each model worked on at once.
        self.peak_running: dict[str, int] = {}
        self._running: dict[str, int] = {}
        self._slots: dict[str, threading.Semaphore] = {}
        self.token_delay = token_delay
        self.reply = reply
        self.default_keep_alive = default_keep_alive
        self.verbose = verbose
        self.fail_next_load: str | None = None
        #: How many times each model was loaded (a reload after an options change counts).
        self.load_counts: dict[str, int] = {}
        self._port = port
        self._lock = threading.Lock()
        self._model_locks: dict[str, threading.Lock] = {}
        self._loaded: dict[str, _Loaded] = {}
        self._calls: list[Call] = []
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._routes: dict[tuple[str, str], Callable[[_Handler, dict[str, Any]], None]] = {
            ("GET", "/"): self._root,
            ("HEAD", "/"): self._root,
            ("GET", "/api/version"): self._version,
            ("GET", "/api/tags"): self._tags,
            ("GET", "/api/ps"): self._ps,
            ("POST", "/api/generate"): lambda h, b: self._native(h, b, chat=False),
            ("POST", "/api/chat"): lambda h, b: self._native(h, b, chat=True),
            ("POST", "/api/embed"): self._embed,
            ("POST", "/api/pull"): self._pull,
            ("POST", "/v1/embeddings"): self._v1_embeddings,
            ("GET", "/v1/models"): self._v1_models,
            ("POST", "/v1/chat/completions"): lambda h, b: self._openai(h, b, chat=True),
            ("POST", "/v1/completions"): lambda h, b: self._openai(h, b, chat=False),
        }

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> OllamaStandin:
        if self._server is not None:
            return self
        self._stopping.clear()
        self._server = _Server((self.host, self._port), self)
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.name = f"{THREAD_PREFIX}-accept"
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, drop open connections and wait for every server thread to end."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping.set()  # cuts load and token delays short
        server.shutdown()
        server.server_close()
        server.close_connections(timeout=5.0)
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None

    def __enter__(self) -> OllamaStandin:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._port}"

    # -- what tests look at ------------------------------------------------------------------

    @property
    def calls(self) -> list[Call]:
        """A snapshot of every request received so far: (method, path, parsed JSON body)."""
        with self._lock:
            return list(self._calls)

    def calls_to(self, path: str) -> list[Call]:
        return [call for call in self.calls if call.path == path]

    def clear_calls(self) -> None:
        with self._lock:
            self._calls.clear()

    @property
    def loaded(self) -> dict[str, float | None]:
        """Loaded models: name -> wall-clock expiry (None: kept for ever, or in use)."""
        with self._lock:
            self._prune()
            return {name: entry.expires_at for name, entry in self._loaded.items()}

    @property
    def in_flight(self) -> int:
        """Requests currently holding a model (generating, or waiting for its load)."""
        with self._lock:
            return sum(entry.refs for entry in self._loaded.values())

    # -- model residency ---------------------------------------------------------------------

    def _prune(self) -> None:
        now = time.time()
        for name, entry in list(self._loaded.items()):
            if entry.refs == 0 and entry.expires_at is not None and entry.expires_at <= now:
                del self._loaded[name]

    def _acquire(self, name: str, options: dict[str, Any]) -> tuple[_Loaded, int]:
        """Hold the model for one request, loading it first if needed; returns the load ns.
        With ``num_parallel``, a request first waits for one of the model's slots."""
        if name not in self.models:
            raise _HTTPError(404, f"model '{name}' not found")
        if self.num_parallel > 0:
            with self._lock:
                slots = self._slots.setdefault(name, threading.Semaphore(self.num_parallel))
            slots.acquire()
        with self._lock:
            self._running[name] = self._running.get(name, 0) + 1
            self.peak_running[name] = max(self.peak_running.get(name, 0), self._running[name])
        try:
            return self._hold(name, options)
        except BaseException:
            self._leave(name)
            raise

    def _leave(self, name: str) -> None:
        with self._lock:
            self._running[name] -= 1
            slots = self._slots.get(name)
        if slots is not None:
            slots.release()

    def _hold(self, name: str, options: dict[str, Any]) -> tuple[_Loaded, int]:
        runner = {k: options[k] for k in RUNNER_OPTIONS if k in options}
        with self._lock:
            model_lock = self._model_locks.setdefault(name, threading.Lock())
        with model_lock:  # one load of a model at a time, as Ollama's scheduler does
            with self._lock:
                self._prune()
                entry = self._loaded.get(name)
                if entry is not None and entry.runner == runner:
                    entry.refs += 1
                    entry.expires_at = None
                    return entry, 0
                if self.fail_next_load:
                    message, self.fail_next_load = self.fail_next_load, None
                    raise _HTTPError(500, message)
                self._loaded.pop(name, None)
            started = time.monotonic()
            delay = self.load_delay + self.seconds_per_gb * self.models[name] / 2**30
            if delay > 0 and self._stopping.wait(delay):
                raise _HTTPError(503, "server shutting down")
            with self._lock:
                entry = _Loaded(size=self.models[name], runner=runner, refs=1)
                self._loaded[name] = entry
                self.load_counts[name] = self.load_counts.get(name, 0) + 1
            return entry, int((time.monotonic() - started) * 1e9)

    def _release(self, name: str, entry: _Loaded, keep_alive: float | None) -> None:
        self._leave(name)
        seconds = self.default_keep_alive if keep_alive is None else keep_alive
        with self._lock:
            entry.refs -= 1
            if self._loaded.get(name) is not entry:
                return  # reloaded with other options meanwhile
            if seconds < 0:
                entry.expires_at = None
            else:
                entry.expires_at = time.time() + seconds
                if seconds == 0 and entry.refs == 0:
                    del self._loaded[name]

    def _unload(self, name: str) -> None:
        with self._lock:
            entry = self._loaded.get(name)
            if entry is not None and entry.refs == 0:
                del self._loaded[name]
            elif entry is not None:
                entry.expires_at = time.time()  # goes once its requests finish

    def _paced(self, pieces: list[str]) -> Iterator[str]:
        for piece in pieces:
            if self.token_delay > 0 and self._stopping.wait(self.token_delay):
                # Stopping mid-answer is a crash as clients see it: no final object, no [DONE].
                raise ConnectionAbortedError("stand-in stopping")
            yield piece

    # -- HTTP --------------------------------------------------------------------------------

    def _handle(self, h: _Handler, method: str) -> None:
        path = urlsplit(h.path).path
        openai_style = path.startswith("/v1/")
        raw = h.read_body()
        try:
            body = json.loads(raw) if raw.strip() else None
        except ValueError as exc:
            body = None
            error: _HTTPError | None = _HTTPError(400, f"invalid JSON body: {exc}")
        else:
            error = None
        with self._lock:
            self._calls.append(Call(method, path, body))
        try:
            route = self._routes.get((method, path))
            if route is None:
                h.send_bytes(404, b"404 page not found", "text/plain")
                return
            if error is not None:
                raise error
            if method == "POST" and not isinstance(body, dict):
                raise _HTTPError(400, "request body must be a JSON object")
            route(h, body or {})
        except _HTTPError as exc:
            if openai_style:
                kind = {400: "invalid_request_error", 404: "not_found_error"}.get(exc.status)
                payload: dict[str, Any] = {
                    "error": {
                        "message": exc.message,
                        "type": kind or "api_error",
                        "param": None,
                        "code": None,
                    }
                }
            else:
                payload = {"error": exc.message}
            h.send_json(exc.status, payload)
        except OSError:
            h.close_connection = True  # the client went away, or stop() cut the connection

    def _pull(self, h: _Handler, body: dict[str, Any]) -> None:
        """Fetch a model of the library: streamed status lines, as Ollama sends them (one layer,
        its bytes coming in ten steps over ``pull_seconds``), then the model is there."""
        name = _full_name(str(body.get("model") or body.get("name") or ""))
        h.start_chunked("application/x-ndjson")
        h.write_chunk(_ndjson({"status": "pulling manifest"}))
        size = self.library.get(name)
        if size is None and name not in self.models:
            h.write_chunk(_ndjson({"error": "pull model manifest: file does not exist"}))
            h.end_chunked()
            return
        if size is not None:
            digest = "sha256:" + hashlib.sha256(name.encode()).hexdigest()
            for step in range(11):
                if step and self._stopping.wait(self.pull_seconds / 10):
                    h.end_chunked()  # cut off: nothing was pulled
                    return
                line = {"status": f"pulling {digest[7:19]}", "digest": digest, "total": size}
                h.write_chunk(_ndjson({**line, "completed": size * step // 10}))
            with self._lock:
                self.models[name] = size
        for status in ("verifying sha256 digest", "writing manifest", "success"):
            h.write_chunk(_ndjson({"status": status}))
        h.end_chunked()

    def _root(self, h: _Handler, body: dict[str, Any]) -> None:
        h.send_bytes(200, b"Ollama is running", "text/plain; charset=utf-8")

    def _version(self, h: _Handler, body: dict[str, Any]) -> None:
        h.send_json(200, {"version": VERSION})

    def _model_entry(self, name: str, size: int) -> dict[str, Any]:
        return {
            "name": name,
            "model": name,
            "size": size,
            "digest": hashlib.sha256(name.encode()).hexdigest(),
            "details": _details(name),
        }

    def _tags(self, h: _Handler, body: dict[str, Any]) -> None:
        models = [
            {**self._model_entry(name, size), "modified_at": _iso()}
            for name, size in sorted(self.models.items())
        ]
        h.send_json(200, {"models": models})

    def _ps(self, h: _Handler, body: dict[str, Any]) -> None:
        # Ollama shows a model kept for ever with an expiry centuries away.
        forever = (datetime.now(UTC) + timedelta(days=292 * 365)).timestamp()
        models = []
        for name, expires_at in sorted(self.loaded.items()):
            size = self.models.get(name, 0)
            entry = self._model_entry(name, size)
            entry.update(
                expires_at=_iso(forever if expires_at is None else expires_at),
                size_vram=size,
                context_length=4096,
            )
            models.append(entry)
        h.send_json(200, {"models": models})

    def _v1_models(self, h: _Handler, body: dict[str, Any]) -> None:
        created = int(time.time())
        data = [
            {"id": name, "object": "model", "created": created, "owned_by": "library"}
            for name in sorted(self.models)
        ]
        h.send_json(200, {"object": "list", "data": data})

    def _native(self, h: _Handler, body: dict[str, Any], *, chat: bool) -> None:
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise _HTTPError(400, "model is required")
        name = _full_name(name)
        try:
            keep_alive = parse_keep_alive(body.get("keep_alive"))
        except ValueError as exc:
            raise _HTTPError(400, str(exc)) from None
        options = body.get("options") or {}
        if not isinstance(options, dict):
            raise _HTTPError(400, "options must be an object")
        if chat:
            messages = body.get("messages") or []
            prompt_tokens = sum(
                count_words(m.get("content")) for m in messages if isinstance(m, dict)
            )
            empty = not messages
        else:
            prompt_tokens, empty = count_words(body.get("prompt")), not body.get("prompt")
        if name not in self.models:
            raise _HTTPError(404, f"model '{body['model']}' not found")
        head: dict[str, Any] = {"model": name, "created_at": _iso()}
        reply, call = self._behave(body, body.get("messages") if chat else None)
        if call is not None:
            tool_calls = [{"function": {"name": call[0], "arguments": call[1]}}]

        def answer(text: str, final: bool = False) -> dict[str, Any]:
            if chat:
                message: dict[str, Any] = {"role": "assistant", "content": text}
                if call is not None and final:
                    message["tool_calls"] = tool_calls
                return {"message": message}
            return {"response": text}

        if empty:  # no prompt: only load or unload, answered with one object
            if keep_alive == 0:
                self._unload(name)
            else:
                entry, _ = self._acquire(name, options)
                self._release(name, entry, keep_alive)
            reason = "unload" if keep_alive == 0 else "load"
            h.send_json(200, {**head, **answer(""), "done": True, "done_reason": reason})
            return
        pieces, reason = plan_reply(reply, options.get("num_predict"), options.get("stop"))
        if call is not None:
            pieces, reason = [], "stop"
        started = time.monotonic()
        entry, load_ns = self._acquire(name, options)
        try:
            eval_started = time.monotonic()

            def final(text: str) -> dict[str, Any]:
                now = time.monotonic()
                return {
                    **head,
                    "created_at": _iso(),
                    **answer(text, final=True),
                    "done": True,
                    "done_reason": reason,
                    "total_duration": int((now - started) * 1e9),
                    "load_duration": load_ns,
                    "prompt_eval_count": prompt_tokens,
                    "prompt_eval_duration": 1000 * prompt_tokens,
                    "eval_count": len(pieces) if call is None else 5,
                    "eval_duration": int((now - eval_started) * 1e9),
                }

            if body.get("stream", True) is False:
                text = "".join(self._paced(pieces))
                h.send_json(200, final(text))
                return
            h.start_chunked("application/x-ndjson")
            for piece in self._paced(pieces):
                h.write_chunk(
                    _ndjson({**head, "created_at": _iso(), **answer(piece), "done": False})
                )
            h.write_chunk(_ndjson(final("")))
            h.end_chunked()
        finally:
            self._release(name, entry, keep_alive)

    def _behave(self, body: dict[str, Any], messages: Any) -> tuple[str, Any]:
        """The reply text and the tool call (or None) for a request, as the model decides."""
        call = standin_model.tool_call(body.get("tools"), messages)
        reply = standin_model.tool_result_reply(messages) or self.reply
        seen = standin_model.images_seen(messages)
        if seen:
            reply = f"I see {seen} image{'s' if seen > 1 else ''}. {reply}"
        fmt = body.get("format")
        rf = body.get("response_format")
        if isinstance(rf, dict) and rf.get("type") == "json_object":
            fmt = "json"
        elif isinstance(rf, dict) and rf.get("type") == "json_schema":
            fmt = (rf.get("json_schema") or {}).get("schema") or "json"
        if fmt:
            reply = standin_model.json_reply(fmt, reply)
        return reply, call

    def _embed_inputs(self, body: dict[str, Any]) -> tuple[str, list[str], int | None]:
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise _HTTPError(400, "model is required")
        if _full_name(name) not in self.models:
            raise _HTTPError(404, f"model '{name}' not found")
        raw = body.get("input")
        inputs = [raw] if isinstance(raw, str) else raw
        if not isinstance(inputs, list) or not all(isinstance(t, str) for t in inputs):
            raise _HTTPError(400, "input must be a string or a list of strings")
        dims = body.get("dimensions")
        if dims is not None and (not isinstance(dims, int) or dims < 1):
            raise _HTTPError(400, "dimensions must be a positive integer")
        return _full_name(name), inputs, dims

    def _embed(self, h: _Handler, body: dict[str, Any]) -> None:
        name, inputs, dims = self._embed_inputs(body)
        entry, load_ns = self._acquire(name, body.get("options") or {})
        try:
            h.send_json(
                200,
                {
                    "model": name,
                    "embeddings": [standin_model.embedding(t, dims) for t in inputs],
                    "total_duration": 1000,
                    "load_duration": load_ns,
                    "prompt_eval_count": sum(count_words(t) for t in inputs),
                },
            )
        finally:
            self._release(name, entry, parse_keep_alive(body.get("keep_alive")))

    def _v1_embeddings(self, h: _Handler, body: dict[str, Any]) -> None:
        name, inputs, dims = self._embed_inputs(body)
        entry, _ = self._acquire(name, {})
        try:
            tokens = sum(count_words(t) for t in inputs)
            data = [
                {"object": "embedding", "index": i, "embedding": standin_model.embedding(t, dims)}
                for i, t in enumerate(inputs)
            ]
            h.send_json(
                200,
                {
                    "object": "list",
                    "data": data,
                    "model": body["model"],
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                },
            )
        finally:
            self._release(name, entry, None)

    def _openai(self, h: _Handler, body: dict[str, Any], *, chat: bool) -> None:
        name = body.get("model")
        if not isinstance(name, str) or not name:
            raise _HTTPError(400, "model is required")
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise _HTTPError(400, "[] is too short - 'messages'")
            prompt_tokens = sum(
                count_words(m.get("content")) for m in messages if isinstance(m, dict)
            )
            max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        else:
            prompt_tokens, max_tokens = count_words(body.get("prompt")), body.get("max_tokens")
        if _full_name(name) not in self.models:
            raise _HTTPError(404, f"model '{name}' not found")
        name = _full_name(name)
        reply, call = self._behave(body, body.get("messages") if chat else None)
        pieces, reason = plan_reply(reply, max_tokens, body.get("stop"))
        if call is not None:
            pieces, reason = [], "tool_calls"
            arguments = json.dumps(call[1])
            call_id = "call_" + uuid.uuid4().hex[:8]
        entry, _ = self._acquire(name, {})  # /v1 passes no runner options
        try:
            base = {
                "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:12],
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": body["model"],
                "system_fingerprint": "fp_ollama",
            }
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": len(pieces),
                "total_tokens": prompt_tokens + len(pieces),
            }

            def choice(text: str, finish: str | None, *, delta: bool) -> dict[str, Any]:
                if not chat:
                    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
                key = "delta" if delta else "message"
                message: dict[str, Any] = {"role": "assistant", "content": text}
                if call is not None and not delta:
                    message["content"] = None
                    message["tool_calls"] = [
                        {
                            "id": call_id,
                            "type": "function",
                            "function": {"name": call[0], "arguments": arguments},
                        }
                    ]
                return {"index": 0, key: message, "finish_reason": finish}

            if not body.get("stream"):
                text = "".join(self._paced(pieces))
                h.send_json(
                    200, {**base, "choices": [choice(text, reason, delta=False)], "usage": usage}
                )
                return
            if chat:
                base["object"] = "chat.completion.chunk"
            h.start_chunked("text/event-stream")
            if call is not None:  # a tool call streams as its head, then argument fragments
                head_delta = {
                    "index": 0,
                    "id": call_id,
                    "type": "function",
                    "function": {"name": call[0], "arguments": ""},
                }
                fragments = [arguments[i : i + 7] for i in range(0, len(arguments), 7)]
                deltas = [head_delta] + [
                    {"index": 0, "function": {"arguments": f}} for f in fragments
                ]
                for d in deltas:
                    chunk = {"index": 0, "delta": {"tool_calls": [d]}, "finish_reason": None}
                    h.write_chunk(_sse({**base, "choices": [chunk]}))
            for piece in self._paced(pieces):
                h.write_chunk(_sse({**base, "choices": [choice(piece, None, delta=True)]}))
            h.write_chunk(_sse({**base, "choices": [choice("", reason, delta=True)]}))
            stream_options = body.get("stream_options") or {}
            if isinstance(stream_options, dict) and stream_options.get("include_usage"):
                h.write_chunk(_sse({**base, "choices": [], "usage": usage}))
            h.write_chunk(b"data: [DONE]\n\n")
            h.end_chunked()
        finally:
            # The trap this reproduces: /v1 ignores keep_alive and resets the default expiry.
            self._release(name, entry, None)


def _parse_model(text: str) -> tuple[str, int]:
    name, sep, size = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=BYTES, got {text!r}")
    try:
        return name, int(size)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: size must be a number of bytes") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.ollama_standin", description="Serve a stand-in Ollama API."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434, help="0 picks a free port")
    parser.add_argument("--load-delay", type=float, default=0.0, help="seconds per model load")
    parser.add_argument("--token-delay", type=float, default=0.0, help="seconds per token")
    parser.add_argument("--reply", default=DEFAULT_REPLY, help="the text every answer is cut from")
    parser.add_argument(
        "--model",
        action="append",
        type=_parse_model,
        metavar="NAME=BYTES",
        help="a model to serve (repeatable; replaces the default set)",
    )
    parser.add_argument(
        "--keep-alive", type=float, default=DEFAULT_KEEP_ALIVE, help="default keep_alive seconds"
    )
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    args = parser.parse_args(argv)

    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()  # only queue: the main thread does the stopping

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    standin = OllamaStandin(
        args.host,
        args.port,
        dict(args.model) if args.model else None,
        load_delay=args.load_delay,
        token_delay=args.token_delay,
        reply=args.reply,
        default_keep_alive=args.keep_alive,
        verbose=args.verbose,
    )
    with standin:
        print(standin.url, flush=True)
        while not stop.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
