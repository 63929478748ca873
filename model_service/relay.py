"""Relaying one HTTP request to a server on loopback (a model worker, an upstream) and its
answer back, chunk by chunk.

Plain ``http.client`` over a shared pool of keep-alive connections: the front door adds as little
as possible to each request (see bench/proxy_overhead.py).
"""

from __future__ import annotations

import http.client
import select
import threading
from collections.abc import Callable, Iterator

#: Read size when relaying a stream: whatever the worker sent so far, up to this much.
CHUNK = 64 * 1024


class WorkerUnreachable(Exception):
    """The worker did not accept the request (not listening, reset before an answer)."""


#: Idle keep-alive connections kept per worker (more are closed after use).
MAX_IDLE_PER_WORKER = 64


def _stale(conn: http.client.HTTPConnection) -> bool:
    """An idle connection that has something to read was closed (or broken) by the worker."""
    sock = conn.sock
    if sock is None:
        return True
    # poll, not select: select() refuses descriptors past FD_SETSIZE (1024), which a front door
    # with a few hundred streams and their idle connections reaches.
    poller = select.poll()
    try:
        poller.register(sock, select.POLLIN | select.POLLPRI)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


class WorkerProxy:
    """Sends requests to workers over a shared pool of idle keep-alive connections."""

    def __init__(self, timeout: float = 3600.0) -> None:
        self.timeout = timeout
        self._lock = threading.Lock()
        self._idle: dict[tuple[str, int], list[http.client.HTTPConnection]] = {}

    def _take(self, key: tuple[str, int]) -> http.client.HTTPConnection | None:
        while True:
            with self._lock:
                idle = self._idle.get(key)
                conn = idle.pop() if idle else None
            if conn is None or not _stale(conn):
                return conn
            conn.close()

    def _give_back(self, key: tuple[str, int], conn: http.client.HTTPConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(key, [])
            if len(idle) < MAX_IDLE_PER_WORKER:
                idle.append(conn)
                return
        conn.close()

    def forget(self, host: str, port: int) -> None:
        """Close the idle connections to a worker that is stopping or gone.

        gunicorn waits for idle keep-alive connections when it stops, and a stopped worker's
        half-closed connections would otherwise hold file descriptors here.
        """
        with self._lock:
            idle = self._idle.pop((host, port), [])
        for conn in idle:
            conn.close()

    def send(
        self, host: str, port: int, method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[http.client.HTTPResponse, Callable[[bool], None]]:
        """Send a request; return the response and ``done(reusable)`` to call after reading it.

        A kept-alive connection that the worker closed meanwhile is retried once on a fresh
        connection (the worker never saw the request); a refused connection is not.
        """
        key = (host, port)
        for attempt in (0, 1):
            conn = self._take(key)
            fresh = conn is None
            if conn is None:
                conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
            try:
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
            except (
                http.client.RemoteDisconnected,
                http.client.ImproperConnectionState,
                BrokenPipeError,
                ConnectionResetError,
            ) as exc:
                conn.close()
                if fresh or attempt == 1:
                    raise WorkerUnreachable(
                        f"worker on port {port} closed the connection: {exc}"
                    ) from None
                continue
            except OSError as exc:
                conn.close()
                raise WorkerUnreachable(f"worker on port {port} is not reachable: {exc}") from None
            return resp, _Release(self, key, conn, resp)
        raise WorkerUnreachable(f"worker on port {port} is not reachable")  # pragma: no cover


class _Release:
    """Give a connection back to the pool once its answer was read to the end."""

    def __init__(
        self,
        proxy: WorkerProxy,
        key: tuple[str, int],
        conn: http.client.HTTPConnection,
        resp: http.client.HTTPResponse,
    ) -> None:
        self.proxy, self.key, self.conn, self.resp = proxy, key, conn, resp

    def __call__(self, reusable: bool) -> None:
        if reusable and not self.resp.will_close:
            self.proxy._give_back(self.key, self.conn)
        else:
            self.conn.close()


class Relay:
    """An answer body relayed chunk by chunk; ``close`` runs ``on_close`` exactly once.

    A class, not a generator: a generator closed before its first chunk never runs its
    ``finally``, and the request would stay counted as in flight for ever. A read that fails
    ends the body (with ``on_error``'s last chunk, if given) and the connection is not reused.
    """

    def __init__(
        self,
        resp: http.client.HTTPResponse,
        done: Callable[[bool], None],
        on_close: Callable[[], None] = lambda: None,
        on_error: Callable[[Exception], bytes] | None = None,
    ) -> None:
        self._resp = resp
        self._done = done
        self._on_close = on_close
        self._on_error = on_error
        self._finished = False
        self._complete = False  # read to its end: the connection can carry another request
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._finished:
            raise StopIteration
        try:
            chunk = self._resp.read1(CHUNK)
        except (OSError, http.client.HTTPException) as exc:
            self._finished = True
            self._resp.close()
            if self._on_error is None:
                raise StopIteration from None
            return self._on_error(exc)
        if not chunk:
            self._finished = self._complete = True
            # read1() does not mark a Content-Length answer read to its end as closed; the
            # connection can only carry the next request once it is.
            self._resp.close()
            raise StopIteration
        return chunk

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            # A stream cut short leaves unread data on the connection: do not reuse it.
            if not self._complete:
                self._resp.close()
            self._done(self._complete)
        finally:
            self._on_close()
