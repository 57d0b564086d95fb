"""The upstream HTTP client against real sockets: framing, keep-alive, failures."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from lastseen.upstream.client import UpstreamClient
from lastseen.upstream.connection import MAX_RESPONSE, Answer, Connection, Exchange, HttpError

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


class _NullTransport(asyncio.Transport):
    """A transport that swallows the request: the tests below feed the answer by hand."""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pass

    def close(self) -> None:
        pass


async def _feed(answer: bytes, segment: int, max_response: int) -> tuple[int, bytes]:
    """Parses ``answer`` delivered in segments of ``segment`` bytes."""
    conn = Connection(lambda _, exchange, result: exchange.on_answer(result), max_response)
    conn.connection_made(_NullTransport())
    done: asyncio.Future[Answer | HttpError] = asyncio.get_running_loop().create_future()
    conn.send(Exchange(b"GET / HTTP/1.1\r\n\r\n", lambda s, b: True, done.set_result, 0.0))
    for start in range(0, len(answer), segment):
        conn.data_received(answer[start : start + segment])
    result = await done
    if isinstance(result, HttpError):
        raise result
    return result


def _one_byte_chunks(count: int) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    return head + b"1\r\nx\r\n" * count + b"0\r\n\r\n"


async def test_segmentation_costs_linear_time() -> None:
    """A chunked answer of one-byte chunks, delivered one byte per segment, parses right, and
    four times the chunks cost about four times the CPU, not sixteen (the parser never goes
    back over what it has seen)."""
    assert await _feed(_one_byte_chunks(3), 1, 1 << 20) == (200, b"xxx")

    async def cpu(count: int) -> float:
        answer = _one_byte_chunks(count)
        started = time.process_time()
        assert await _feed(answer, 1, 1 << 20) == (200, b"x" * count)
        return time.process_time() - started

    small = min([await cpu(2_000) for _ in range(3)])
    large = min([await cpu(8_000) for _ in range(3)])
    assert large < 8 * small + 0.05, (small, large)


async def test_thousands_of_interim_answers_neither_recurse_nor_pass_the_cap() -> None:
    """Interim answers are skipped in a loop (5,000 of them parse, no RecursionError); with the
    default cap, which counts them too, so many are a bad response."""
    answer = b"HTTP/1.1 100 Continue\r\n\r\n" * 5_000
    answer += b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    assert await _feed(answer, 4096, 1 << 20) == (200, b"ok")
    with pytest.raises(HttpError) as caught:
        await _feed(answer, 4096, MAX_RESPONSE)
    assert caught.value.reason == "bad_response"


async def test_an_oversized_answer_fails_at_once(
    raw_server: Callable[[Reply], Awaitable[str]],
) -> None:
    """A 50 MB Content-Length trickled slowly is refused as soon as its head arrives, not
    waited for until the timeout."""

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 50000000\r\n\r\n")
        for _ in range(600):
            writer.write(b"x")
            await writer.drain()
            await asyncio.sleep(0.05)

    url = await raw_server(trickle)
    client = UpstreamClient(url, timeout=30)
    with pytest.raises(HttpError) as caught:
        await client.get("/objects/1")
    assert caught.value.reason == "bad_response"
    assert "Content-Length" in caught.value.detail
    await client.close()


async def test_bytes_beyond_the_answer_retire_the_connection(
    raw_server: Callable[[Reply], Awaitable[str]],
) -> None:
    """An answer followed by bytes nobody asked for is used, but its connection is not reused:
    the next answer on it could belong to another request."""
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n"
    url = await raw_server(_keep_alive(answer))
    client = UpstreamClient(url, timeout=2)
    assert await client.get("/objects/1") == (200, b"ok")
    assert not client._idle
    await client.close()


async def test_connects_are_capped_and_the_rest_wait(
    raw_server: Callable[[Reply], Awaitable[str]],
) -> None:
    """Twenty requests at once with no pooled connection open at most ``max_connecting``
    connections at a time; the others wait for a connect to finish, and every one is answered."""
    url = await raw_server(_keep_alive(*[b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"] * 20))
    client = UpstreamClient(url, timeout=5, max_connecting=3)
    answers = [asyncio.ensure_future(client.get(f"/objects/{n}")) for n in range(20)]
    await asyncio.sleep(0)
    assert (len(client._connecting), len(client._queued)) == (3, 17)
    assert await asyncio.gather(*answers) == [(200, b"ok")] * 20
    await client.close()
