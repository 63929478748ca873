"""Relaying one HTTP request to a model worker and its answer back, chunk by chunk.

Plain ``http.client`` with one keep-alive connection per thread and worker: the front door adds
as little as possible to each request (see bench/proxy_overhead.py).
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable, Iterator

#: Read size when relaying a stream: whatever the worker sent so far, up to this much.
CHUNK = 64 * 1024


class WorkerUnreachable(Exception):
    """The worker did not accept the request (not listening, reset before an answer)."""


class WorkerProxy:
    """Sends requests to workers over per-thread keep-alive connections."""

    def __init__(self, timeout: float = 3600.0) -> None:
        self.timeout = timeout
        self._local = threading.local()

    def _pool(self) -> dict[tuple[str, int], http.client.HTTPConnection]:
        pool: dict[tuple[str, int], http.client.HTTPConnection] | None = getattr(
            self._local, "conns", None
        )
        if pool is None:
            pool = self._local.conns = {}
        return pool

    def send(
        self, host: str, port: int, method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[http.client.HTTPResponse, Callable[[bool], None]]:
        """Send a request; return the response and ``done(reusable)`` to call after reading it.

        A kept-alive connection that the worker closed meanwhile is retried once on a fresh
        connection (the worker never saw the request); a refused connection is not.
        """
        conns = self._pool()
        key = (host, port)
        for attempt in (0, 1):
            conn = conns.pop(key, None)
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

            return resp, _Release(conns, key, conn, resp)
        raise WorkerUnreachable(f"worker on port {port} is not reachable")  # pragma: no cover


class _Release:
    """Give a connection back to its thread's pool once its answer was read to the end."""

    def __init__(
        self,
        conns: dict[tuple[str, int], http.client.HTTPConnection],
        key: tuple[str, int],
        conn: http.client.HTTPConnection,
        resp: http.client.HTTPResponse,
    ) -> None:
        self.conns, self.key, self.conn, self.resp = conns, key, conn, resp

    def __call__(self, reusable: bool) -> None:
        if reusable and not self.resp.will_close:
            self.conns[self.key] = self.conn
        else:
            self.conn.close()


class Relay:
    """An answer body relayed chunk by chunk; ``close`` runs ``on_close`` exactly once.

    A class, not a generator: a generator closed before its first chunk never runs its
    ``finally``, and the request would stay counted as in flight for ever.
    """

    def __init__(
        self,
        resp: http.client.HTTPResponse,
        done: Callable[[bool], None],
        on_close: Callable[[], None],
    ) -> None:
        self._resp = resp
        self._done = done
        self._on_close = on_close
        self._finished = False
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        if self._finished:
            raise StopIteration
        try:
            chunk = self._resp.read1(CHUNK)
        except (OSError, http.client.HTTPException):
            chunk = b""
        if not chunk:
            self._finished = True
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
            if not self._finished:
                self._resp.close()
            self._done(self._finished)
        finally:
            self._on_close()
