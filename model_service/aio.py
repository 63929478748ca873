"""Relaying on the event loop: a small HTTP/1.1 client for servers on loopback (a model worker,
an OpenAI-compatible upstream) over a pool of kept-alive connections.

The hot paths of the front door and of the ``openai`` backend relay streams with it: one event
loop holds a thousand streams where threads would each wake, take the GIL and copy every chunk
(see bench/proxy_overhead.py). It speaks only what those servers answer: a status line, headers,
then a body framed by ``Content-Length``, by chunks, or by the end of the connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Final

#: Stop reading from the upstream while this much is buffered and not yet relayed.
HIGH_WATER: Final = 256 * 1024
#: Idle keep-alive connections kept per server (more are closed after use).
MAX_IDLE_PER_SERVER: Final = 64
MAX_HEAD: Final = 64 * 1024


class Unreachable(Exception):
    """The server did not take the request (refused, or closed before any answer)."""


class BrokenAnswer(Exception):
    """The answer stopped before its end (connection lost, malformed framing, timeout)."""


class _Conn(asyncio.Protocol):
    """One connection: bytes received are buffered until the reader takes them."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.eof = False
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _time_out(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(BrokenAnswer(f"no data for {self.timeout:g} s"))

    async def more(self) -> None:
        """Wait for more bytes; BrokenAnswer at the end of the connection or a timeout."""
        if self.eof:
            raise BrokenAnswer("the connection was closed")
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        timer = loop.call_later(self.timeout, self._time_out)
        try:
            await self._waiter
        finally:
            timer.cancel()
            self._waiter = None
        if self.eof and not self.buf:
            raise BrokenAnswer("the connection was closed")

    def take(self, n: int | None = None) -> bytes:
        if n is None or n >= len(self.buf):
            data = bytes(self.buf)
            self.buf.clear()
        else:
            data = bytes(self.buf[:n])
            del self.buf[:n]
        if self._paused and len(self.buf) < HIGH_WATER and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.eof = True


class Answer:
    """A status, headers, and a body to read once: ``await read()`` or ``async for chunk``."""

    def __init__(
        self, pool: Upstreams, key: tuple[str, int], conn: _Conn, head: bytes, method: str
    ) -> None:
        self._pool, self._key, self._conn = pool, key, conn
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        try:
            self.status = int(parts[1])
        except (IndexError, ValueError):
            raise BrokenAnswer(f"not an HTTP status line: {lines[0][:80]!r}") from None
        self.reason = parts[2] if len(parts) > 2 else ""
        self.headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                self.headers[name.strip().lower()] = value.strip()
        self.chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
        length = self.headers.get("content-length")
        self._left: int | None = None  # bytes of the body (or of the current chunk) still due
        if method == "HEAD" or self.status in (204, 304) or 100 <= self.status < 200:
            self._left = 0
        elif not self.chunked and length is not None:
            try:
                self._left = int(length)
            except ValueError:
                raise BrokenAnswer(f"bad Content-Length {length!r}") from None
        self._keep = self.headers.get("connection", "").lower() != "close" and (
            self.chunked or self._left is not None
        )
        self._in_chunk = 0
        self.complete = False
        self._released = False

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    async def read(self) -> bytes:
        """The whole body."""
        return b"".join([chunk async for chunk in self])

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        conn = self._conn
        if self.chunked:
            async for piece in self._dechunk():
                yield piece
        elif self._left is not None:
            while self._left > 0:
                if not conn.buf:
                    await conn.more()
                piece = conn.take(self._left)
                self._left -= len(piece)
                yield piece
        else:  # the body ends with the connection
            while True:
                if not conn.buf:
                    try:
                        await conn.more()
                    except BrokenAnswer:
                        if conn.eof:
                            break
                        raise
                yield conn.take()
        self.complete = True
        self.release()

    async def _dechunk(self) -> AsyncIterator[bytes]:
        conn = self._conn
        buf = conn.buf
        while True:
            out: list[bytes] = []
            while True:
                if self._in_chunk:  # the rest of a chunk begun earlier
                    if not buf:
                        break
                    piece = conn.take(self._in_chunk)
                    self._in_chunk -= len(piece)
                    out.append(piece)
                    if self._in_chunk:
                        break
                    continue
                end = buf.find(b"\r\n")
                if end < 0:
                    break
                if end == 0:  # the CRLF after a chunk's data
                    del buf[:2]
                    continue
                try:
                    size = int(bytes(buf[:end]).split(b";", 1)[0], 16)
                except ValueError:
                    raise BrokenAnswer(f"bad chunk size {bytes(buf[:end][:20])!r}") from None
                if size == 0:
                    # The last chunk, then trailers (usually none) up to an empty line.
                    while (tail := buf.find(b"\r\n\r\n", end)) < 0:
                        if out:
                            yield b"".join(out)
                            out = []
                        await conn.more()
                    del buf[: tail + 4]
                    if out:
                        yield b"".join(out)
                    return
                del buf[: end + 2]
                self._in_chunk = size
            if out:
                yield b"".join(out)
            if len(buf) > MAX_HEAD and not self._in_chunk:
                raise BrokenAnswer("chunk header too long")
            await conn.more()

    def release(self) -> None:
        """Give the connection back once the body was read to its end, else close it."""
        if self._released:
            return
        self._released = True
        if self.complete and self._keep and not self._conn.buf:
            self._pool._give_back(self._key, self._conn)
        else:
            self._conn.close()


class Upstreams:
    """Kept-alive connections to servers on loopback, per (host, port); one event loop only."""

    def __init__(self, timeout: float = 3600.0) -> None:
        self.timeout = timeout
        self._idle: dict[tuple[str, int], list[_Conn]] = {}

    def _give_back(self, key: tuple[str, int], conn: _Conn) -> None:
        idle = self._idle.setdefault(key, [])
        if len(idle) < MAX_IDLE_PER_SERVER and not conn.eof:
            idle.append(conn)
        else:
            conn.close()

    def forget(self, host: str, port: int) -> None:
        """Close the idle connections to a server that is stopping or gone."""
        for conn in self._idle.pop((host, port), []):
            conn.close()

    async def _connect(self, host: str, port: int) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(lambda: _Conn(self.timeout), host, port)
        except OSError as exc:
            raise Unreachable(f"port {port} is not reachable: {exc}") from None
        return conn

    async def request(
        self, host: str, port: int, method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> Answer:
        """Send a request and read the answer's head; the body is read from the Answer.

        A kept-alive connection the server closed meanwhile is retried once on a fresh one
        (the server never saw the request); a refused connection is not.
        """
        key = (host, port)
        lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        lines.append(f"Content-Length: {len(body)}")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
        for attempt in (0, 1):
            conn = None
            idle = self._idle.get(key)
            while idle:
                candidate = idle.pop()
                if candidate.eof or candidate.buf:
                    candidate.close()
                    continue
                conn = candidate
                break
            fresh = conn is None
            if conn is None:
                conn = await self._connect(host, port)
            assert conn.transport is not None
            conn.transport.write(data)
            try:
                while True:
                    end = conn.buf.find(b"\r\n\r\n")
                    if end >= 0:
                        break
                    if len(conn.buf) > MAX_HEAD:
                        raise BrokenAnswer("answer head too long")
                    await conn.more()
            except BrokenAnswer as exc:
                conn.close()
                if fresh or attempt == 1 or conn.buf:
                    raise Unreachable(f"port {port} closed the connection: {exc}") from None
                continue
            head = conn.take(end + 4)[:-4]
            try:
                return Answer(self, key, conn, head, method)
            except BrokenAnswer:
                conn.close()
                raise
        raise Unreachable(f"port {port} is not reachable")  # pragma: no cover
