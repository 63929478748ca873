"""The event-loop relay client (model_service/aio.py) against real sockets on loopback.

Each test runs a small asyncio server that writes exactly the bytes under test, sometimes one
byte at a time, so every framing path (length, chunks, end of connection) is read as a server
would really split it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from model_service.aio import BrokenAnswer, Unreachable, Upstreams

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


def run(handler: Handler, client: Callable[[Upstreams, int], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            return await asyncio.wait_for(client(Upstreams(timeout=2.0), port), 10)
        finally:
            server.close()

    return asyncio.run(main())


def answering(*answers: bytes, split: bool = False, close: bool = False) -> Handler:
    """A server answering successive requests on a connection with ``answers``."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for answer in answers:
            try:
                await _read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            if split:
                for i in range(len(answer)):
                    writer.write(answer[i : i + 1])
                    await writer.drain()
                    await asyncio.sleep(0)
            else:
                writer.write(answer)
            await writer.drain()
        if close:
            writer.close()
        else:
            await reader.read()  # until the client closes

    return handler


CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"6\r\ndata: \r\n"
    b"b;ext=1\r\nhello world\r\n"
    b"0\r\n\r\n"
)


@pytest.mark.parametrize("split", [False, True])
def test_chunked_body_is_decoded_however_it_arrives(split: bool) -> None:
    async def client(pool: Upstreams, port: int) -> tuple[int, str | None, bytes, bool]:
        answer = await pool.request("127.0.0.1", port, "POST", "/v1/x", b"{}", {})
        body = await answer.read()
        return answer.status, answer.header("Content-Type"), body, answer.complete

    status, ctype, body, complete = run(answering(CHUNKED, split=split), client)
    assert (status, ctype, body, complete) == (200, "text/event-stream", b"data: hello world", True)


def test_chunked_trailers_are_skipped_and_the_connection_reused() -> None:
    first = CHUNKED.replace(b"0\r\n\r\n", b"0\r\nX-Trailer: 1\r\n\r\n")
    second = b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"

    async def client(pool: Upstreams, port: int) -> list[Any]:
        a = await pool.request("127.0.0.1", port, "POST", "/a", b"1", {})
        one = await a.read()
        b = await pool.request("127.0.0.1", port, "POST", "/b", b"2", {})
        two = await b.read()
        return [one, b.status, two, len(pool._idle[("127.0.0.1", port)])]

    one, status, two, idle = run(answering(first, second, split=True), client)
    assert (one, status, two, idle) == (b"data: hello world", 201, b"ok", 1)


def test_a_body_that_ends_with_the_connection() -> None:
    answer_bytes = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it"

    async def client(pool: Upstreams, port: int) -> tuple[bytes, dict[Any, Any]]:
        answer = await pool.request("127.0.0.1", port, "GET", "/", b"", {})
        return await answer.read(), pool._idle

    body, idle = run(answering(answer_bytes, close=True), client)
    assert body == b"all of it"
    assert not any(idle.values())  # not kept: the server closed it


def test_a_stream_cut_short_is_a_broken_answer() -> None:
    cut = CHUNKED[: CHUNKED.index(b"b;ext")] + b"b\r\nhel"

    async def client(pool: Upstreams, port: int) -> list[bytes]:
        answer = await pool.request("127.0.0.1", port, "POST", "/", b"", {})
        got = []
        with pytest.raises(BrokenAnswer):
            async for chunk in answer:
                got.append(chunk)
        answer.release()
        return got

    got = run(answering(cut, close=True), client)
    assert b"".join(got) == b"data: hel"


def test_a_silent_server_times_out() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        await asyncio.sleep(5)

    async def client(pool: Upstreams, port: int) -> str:
        pool.timeout = 0.3
        with pytest.raises(Unreachable) as info:
            await pool.request("127.0.0.1", port, "POST", "/", b"", {})
        return str(info.value)

    assert "no data for 0.3 s" in run(silent, client)


def test_a_refused_connection_is_unreachable() -> None:
    async def client(pool: Upstreams, port: int) -> str:
        with pytest.raises(Unreachable) as info:
            await pool.request("127.0.0.1", 1, "POST", "/", b"", {})
        return str(info.value)

    assert "port 1 is not reachable" in run(answering(), client)


def test_a_kept_connection_the_server_closed_is_retried_on_a_fresh_one() -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    conns = []

    async def once_per_connection(reader: asyncio.StreamReader, writer: Any) -> None:
        conns.append(1)
        await _read_request(reader)
        writer.write(ok)
        await writer.drain()
        writer.close()  # keep-alive announced, then closed: the next request must not fail

    async def client(pool: Upstreams, port: int) -> list[bytes]:
        out = []
        for _ in range(3):
            answer = await pool.request("127.0.0.1", port, "POST", "/", b"{}", {})
            out.append(await answer.read())
            await asyncio.sleep(0.05)  # let the close arrive
        return out

    assert run(once_per_connection, client) == [b"ok"] * 3
    assert len(conns) == 3


def test_the_request_carries_method_path_headers_and_body() -> None:
    seen: list[bytes] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await _read_request(reader))
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()
        await reader.read()

    async def client(pool: Upstreams, port: int) -> tuple[int, bytes]:
        answer = await pool.request(
            "127.0.0.1", port, "POST", "/v1/chat", b'{"a":1}', {"Authorization": "Bearer k"}
        )
        return answer.status, await answer.read()

    assert run(echo, client) == (204, b"")
    request = seen[0]
    assert request.startswith(b"POST /v1/chat HTTP/1.1\r\n")
    assert b"\r\nAuthorization: Bearer k\r\n" in request
    assert b"\r\nContent-Length: 7\r\n" in request
    assert request.endswith(b'\r\n\r\n{"a":1}')
