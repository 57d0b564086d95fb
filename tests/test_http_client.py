"""The upstream HTTP client against real sockets: framing, keep-alive, failures."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from lastseen.http_client import HttpError, UpstreamClient

Reply = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture
async def raw_server() -> AsyncIterator[Callable[[Reply], Awaitable[str]]]:
    """Starts a raw TCP server on a free port that answers with ``reply``; gives its URL."""
    servers: list[asyncio.Server] = []

    async def start(reply: Reply) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reply(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


def _keep_alive(*answers: bytes) -> Reply:
    """Answers each request on a connection with the next of ``answers``."""

    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for answer in answers:
            await _read_request(reader)
            writer.write(answer)
            await writer.drain()
        await reader.read()

    return reply


async def test_content_length_and_keep_alive(raw_server: Callable[[Reply], Awaitable[str]]) -> None:
    """Two answers framed by Content-Length come over one kept-alive connection."""
    ok = b'HTTP/1.1 200 OK\r\nContent-Length: 23\r\n\r\n{"id":1,"online":true}\n'
    url = await raw_server(_keep_alive(ok, ok))
    client = UpstreamClient(url, timeout=2)
    assert await client.get("/objects/1") == (200, b'{"id":1,"online":true}\n')
    assert await client.get("/objects/1") == (200, b'{"id":1,"online":true}\n')
    assert len(client._all) == 1
    await client.close()


async def test_chunked_body(raw_server: Callable[[Reply], Awaitable[str]]) -> None:
    """A chunked body, split across chunks and trailers, is put back together."""
    answer = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'5\r\n{"id"\r\n11;ext=1\r\n:1,"online":true}\r\n0\r\nX-Trailer: 1\r\n\r\n'
    )
    url = await raw_server(_keep_alive(answer))
    client = UpstreamClient(url, timeout=2)
    assert await client.get("/objects/1") == (200, b'{"id":1,"online":true}')
    await client.close()


async def test_body_to_end_of_connection(raw_server: Callable[[Reply], Awaitable[str]]) -> None:
    """An HTTP/1.0 answer without Content-Length ends with the connection."""

    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.0 400 Bad Request\r\n\r\ninvalid id")
        await writer.drain()

    url = await raw_server(reply)
    client = UpstreamClient(url, timeout=2)
    assert await client.get("/objects/x") == (400, b"invalid id")
    assert not client._idle
    await client.close()


async def test_a_stale_pooled_connection_is_replaced(
    raw_server: Callable[[Reply], Awaitable[str]],
) -> None:
    """If the server closed a kept-alive connection, the request goes out on a new one."""
    connections = 0

    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await _read_request(reader)  # then close without answering the second request

    url = await raw_server(reply)
    client = UpstreamClient(url, timeout=2)
    assert await client.get("/a") == (200, b"ok")
    assert await client.get("/b") == (200, b"ok")
    assert connections == 2
    await client.close()


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (b"garbage\r\n\r\n", "bad_response"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "bad_response"),
        (b"", "connection"),
    ],
)
async def test_broken_answers_are_errors(
    raw_server: Callable[[Reply], Awaitable[str]], answer: bytes, reason: str
) -> None:
    """A bad status line, a body cut short, or no answer at all is an HttpError with a reason."""

    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(answer)
        await writer.drain()

    url = await raw_server(reply)
    client = UpstreamClient(url, timeout=2)
    with pytest.raises(HttpError) as caught:
        await client.get("/objects/1")
    assert caught.value.reason == reason
    await client.close()


async def test_timeout_and_refused(raw_server: Callable[[Reply], Awaitable[str]]) -> None:
    """An answer that does not come in time is a timeout; a closed port is a connection error."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    url = await raw_server(silent)
    client = UpstreamClient(url, timeout=0.2)
    with pytest.raises(HttpError) as caught:
        await client.get("/objects/1")
    assert caught.value.reason == "timeout"
    await client.close()
    refused = UpstreamClient("http://127.0.0.1:1", timeout=1)
    with pytest.raises(HttpError) as caught:
        await refused.get("/objects/1")
    assert caught.value.reason == "connection"


async def test_request_has_host_and_path_prefix() -> None:
    """The request line keeps the base URL's path; Host names a non-default port."""
    client = UpstreamClient("http://upstream.example:8080/api/", timeout=1)
    request = client.request_bytes("/objects/7")
    assert request.startswith(b"GET /api/objects/7 HTTP/1.1\r\nHost: upstream.example:8080\r\n")
    assert request.endswith(b"\r\n\r\n")


async def test_interim_answers_are_skipped(raw_server: Callable[[Reply], Awaitable[str]]) -> None:
    """A 100 Continue before the real answer is not taken for the answer."""
    answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    url = await raw_server(_keep_alive(answer))
    client = UpstreamClient(url, timeout=2)
    assert await client.get("/objects/1") == (200, b"ok")
    await client.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nxx\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -5\r\n\r\n",
    ],
)
async def test_bad_framing_is_an_error(
    raw_server: Callable[[Reply], Awaitable[str]], answer: bytes
) -> None:
    """A bad chunk size or a negative Content-Length is a bad response, not a crash."""
    url = await raw_server(_keep_alive(answer))
    client = UpstreamClient(url, timeout=2)
    with pytest.raises(HttpError) as caught:
        await client.get("/objects/1")
    assert caught.value.reason == "bad_response"
    await client.close()
