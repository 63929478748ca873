"""The ASGI side of a modelpool server under gunicorn's ``asgi`` worker.

The Flask app stays the server's whole API: ``WSGIBridge`` runs it in a thread pool for every
request. A hot path (a relay that only passes bytes along) may answer a request on the event
loop first, and hands it to Flask whenever it is not the plain case (an error to render, a model
to load): the answers and errors stay Flask's, written once.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import signal
import sys
import weakref
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger("modelpool.asgi")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


async def lifespan(receive: Receive, send: Send) -> None:
    """Acknowledge startup and shutdown (the pool starts and stops in gunicorn's hooks)."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def read_body(receive: Receive, limit: int) -> bytes:
    """The request body, up to ``limit + 1`` bytes (the rest is not read: more is a 413)."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        if chunk:
            parts.append(chunk)
            size += len(chunk)
        if not message.get("more_body", False) or size > limit:
            break
    return b"".join(parts)


def header(scope: Scope, name: bytes) -> str | None:
    """A request header's value (``name`` lower case)."""
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


class Disconnect:
    """Notices that the client went away while an answer streams (the ASGI server drops what
    is sent after that without a word)."""

    def __init__(self, receive: Receive) -> None:
        self._task = asyncio.ensure_future(self._watch(receive))

    @staticmethod
    async def _watch(receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    @property
    def gone(self) -> bool:
        return self._task.done()

    def stop(self) -> None:
        self._task.cancel()


def _environ(scope: Scope, body: bytes) -> dict[str, Any]:
    server = scope.get("server") or ("127.0.0.1", 80)
    client = scope.get("client") or ("", 0)
    path = scope.get("root_path", "") + scope["path"]
    environ: dict[str, Any] = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": "",
        # PEP 3333: the decoded path's bytes, as a latin-1 string.
        "PATH_INFO": path.encode("utf-8").decode("latin-1"),
        "QUERY_STRING": bytes(scope.get("query_string", b"")).decode("latin-1"),
        "SERVER_NAME": str(server[0]),
        "SERVER_PORT": str(server[1] if server[1] is not None else 80),
        "REMOTE_ADDR": str(client[0]),
        "REMOTE_PORT": str(client[1]),
        "SERVER_PROTOCOL": f"HTTP/{scope.get('http_version', '1.1')}",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scope.get("scheme", "http"),
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    for raw_name, raw_value in scope.get("headers", ()):
        name = bytes(raw_name).decode("latin-1").upper().replace("-", "_")
        value = bytes(raw_value).decode("latin-1")
        if name == "CONTENT_TYPE":
            environ["CONTENT_TYPE"] = value
            continue
        if name == "CONTENT_LENGTH":
            continue
        key = "HTTP_" + name
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    # The body was read here already: its length is what Flask checks against its limit (a
    # body cut at limit + 1 bytes still reads as too large).
    environ["CONTENT_LENGTH"] = str(len(body))
    return environ


class _Answer:
    """A WSGI answer: status and headers once ``start_response`` ran, then the body."""

    def __init__(self) -> None:
        self.status = 500
        self.headers: list[tuple[bytes, bytes]] = []
        self.length: int | None = None

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], None]:
        self.status = int(status.split(" ", 1)[0])
        self.headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        for k, v in headers:
            if k.lower() == "content-length":
                self.length = int(v)
        return self._write

    @staticmethod
    def _write(data: bytes) -> None:  # pragma: no cover - Flask never uses write()
        raise RuntimeError("the WSGI write() callable is not supported")


_END = object()


def _close(iterable: Iterable[bytes]) -> None:
    close = getattr(iterable, "close", None)
    if close is not None:
        try:
            close()
        except Exception:
            log.exception("closing a response failed")


class WSGIBridge:
    """Serves ASGI HTTP requests with a WSGI app whose calls run in a thread pool.

    An answer with a ``Content-Length`` is produced whole in one pool call; a streamed one
    (no length) is pulled chunk by chunk and closed when it ends or the client goes away.
    """

    def __init__(self, app: Any, threads: int, max_body: int) -> None:
        self.app = app
        self.max_body = max_body
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="http")

    def close(self) -> None:
        """Stop the threads (once nothing runs on them)."""
        self.executor.shutdown(wait=True)

    def _start(self, environ: dict[str, Any]) -> tuple[_Answer, Iterable[bytes], Any]:
        answer = _Answer()
        result = self.app(environ, answer.start_response)
        it = iter(result)
        if answer.length is None:
            return answer, result, it
        try:
            body = b"".join(it)
        finally:
            _close(result)
        return answer, (), body

    async def __call__(
        self, scope: Scope, receive: Receive, send: Send, body: bytes | None = None
    ) -> None:
        if body is None:
            body = await read_body(receive, self.max_body)
        loop = asyncio.get_running_loop()
        environ = _environ(scope, body)
        started = loop.run_in_executor(self.executor, self._start, environ)
        try:
            # Shielded: if the server cancels this request (its client went away), the call
            # still finishes in its thread, and its answer is closed below.
            answer, result, it = await asyncio.shield(started)
        except asyncio.CancelledError:
            started.add_done_callback(self._close_when_done)
            raise
        start = {"type": "http.response.start", "status": answer.status, "headers": answer.headers}
        if isinstance(it, bytes):  # whole
            await send(start)
            await send({"type": "http.response.body", "body": it})
            return
        await self._stream(start, result, it, receive, send)

    def _close_when_done(self, started: asyncio.Future[Any]) -> None:
        """Close the answer of a call whose request was cancelled meanwhile."""
        if not started.cancelled() and started.exception() is None:
            self.executor.submit(_close, started.result()[1])

    async def _stream(
        self,
        start: Message,
        result: Iterable[bytes],
        it: Iterator[bytes],
        receive: Receive,
        send: Send,
    ) -> None:
        """Pull the answer chunk by chunk in the pool; close it in the pool whatever happens
        (the end, the client gone, this request cancelled), after its last pull returned."""
        loop = asyncio.get_running_loop()
        watch = Disconnect(receive)
        pull: asyncio.Future[Any] | None = None
        try:
            await send(start)
            while not watch.gone:
                pull = loop.run_in_executor(self.executor, next, it, _END)
                chunk = await asyncio.shield(pull)
                pull = None
                if chunk is _END:
                    break
                if chunk:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            watch.stop()
            if pull is not None and not pull.done():
                # A generator cannot be closed while it runs: after this pull returns.
                pull.add_done_callback(lambda _: self.executor.submit(_close, result))
            else:
                self.executor.submit(_close, result)


def prepare_worker(worker: Any) -> None:
    """Fix two things of gunicorn's ``asgi`` worker for a server under load (call it from
    ``post_worker_init``, before the worker starts serving).

    - The backlog: the worker hands its listening socket to asyncio's ``create_server``, which
      calls ``listen()`` again with asyncio's default backlog of 100; a burst of a few hundred
      connections then overflows the accept queue and waits for SYN retransmits (seconds) or is
      reset. gunicorn's ``backlog`` setting is passed along instead.
    - The stop: the worker waits for every open connection before it exits, idle keep-alive
      ones included, each until its keep-alive timeout. Once it is told to stop, connections
      that wait for their next request are closed at once (a gthread worker does the same).
    - The start of the stop: the worker's main loop sleeps a second between heartbeats and only
      then sees that it was told to stop, so every stop (each eviction) took over a second. The
      first stop signal now wakes it at once; a later QUIT still cuts a graceful drain short.
    - The end of the stop: closing the loop gives the stop signals back their default action,
      and a forced stop sends the worker a QUIT and then supervisord's TERM to the whole
      process group; a TERM arriving after the loop closed would kill the worker before
      ``worker_exit`` lets go of its model. Once the drain is over, stop signals are ignored.
    """
    loop = worker.loop
    create_server = loop.create_server
    protocols: weakref.WeakSet[Any] = weakref.WeakSet()

    def tracked(factory: Callable[[], Any]) -> Callable[[], Any]:
        def make() -> Any:
            protocol = factory()
            protocols.add(protocol)
            return protocol

        return make

    def with_backlog(factory: Callable[[], Any], *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("backlog", worker.cfg.backlog)
        return create_server(tracked(factory), *args, **kwargs)

    loop.create_server = with_backlog

    def close_idle_once_stopping() -> None:
        if worker.alive:
            loop.call_later(0.1, close_idle_once_stopping)
            return
        for protocol in list(protocols):
            # Idle: served a request and waits for the next one (what its keep-alive timer
            # would close a few seconds later).
            idle = getattr(protocol, "_awaiting_request", False)
            close = getattr(protocol, "_keepalive_timeout", None)
            if idle and getattr(protocol, "req_count", 0) > 1 and close is not None:
                close()

    loop.call_soon(close_idle_once_stopping)

    def waking(handler: Callable[[], None]) -> Callable[[], None]:
        def handle() -> None:
            # Only a worker in its heartbeat loop is woken: one that left it because its
            # parent changed is in its shutdown already (alive still true).
            was_alive = worker.alive and worker.ppid == os.getppid()
            handler()
            if was_alive and not worker.alive and getattr(worker, "servers", None):
                # The serving task sleeps between heartbeats; cancelled there, it goes on to
                # its graceful shutdown at once (it catches the cancellation).
                for task in asyncio.all_tasks(loop):
                    if getattr(task.get_coro(), "__name__", "") == "_serve":
                        task.cancel()

        return handle

    for signum, handler in _stop_signals(worker):
        loop.add_signal_handler(signum, waking(handler))

    cleanup = worker._cleanup

    def cleanup_ignoring_stop_signals() -> None:
        # SIGUSR1 (the master's "reopen your logs") too: its default action ends the process.
        for signum in [s for s, _ in _stop_signals(worker)] + [signal.SIGUSR1]:
            # Out of the loop's hands (closing the loop would set the default action again);
            # removing sets the default for the moment between these two calls.
            loop.remove_signal_handler(signum)
            signal.signal(signum, signal.SIG_IGN)
        cleanup()

    worker._cleanup = cleanup_ignoring_stop_signals


def _stop_signals(worker: Any) -> list[tuple[int, Callable[[], None]]]:
    """The signals that stop a worker, each with the worker's own handler."""
    return [
        (signal.SIGTERM, worker.handle_exit_signal),
        (signal.SIGQUIT, worker.handle_quit_signal),
        (signal.SIGINT, worker.handle_quit_signal),
    ]
