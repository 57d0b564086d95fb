"""The simulated producer: timeouts, refusals, open-loop load, id draws, typed flags."""

from __future__ import annotations

import asyncio
import itertools
import random
import socket

import pytest
import structlog
from aiohttp import web
from helpers.services import serve_app
from helpers.waiting import eventually

from lastseen.cli.main import build_parser
from lastseen.devtools.simulate import truth
from lastseen.devtools.simulate.config import SimulatorConfig
from lastseen.devtools.simulate.producer import Producer, ProducerConfig, draw_ids


async def never_answers() -> tuple[asyncio.Server, list[bytes], asyncio.Event]:
    """A server that reads requests and never answers; returns it and the request lines."""
    requests: list[bytes] = []
    release = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            if line.startswith(b"POST "):
                requests.append(line)
            if release.is_set():
                break
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, requests, release


async def test_producer_gives_up_after_1s_never_retries_and_counts_it() -> None:
    """Against a server that never answers, each POST fails after the 1 s timeout, is logged and
    counted as timed out, is sent exactly once, and the next sleep starts only after it ended."""
    server, requests, release = await never_answers()
    port = server.sockets[0].getsockname()[1]
    sent: list[truth.SentCallback] = []
    producer = Producer(
        ProducerConfig(target=f"http://127.0.0.1:{port}/callback", period=0.2, seed=1),
        sent.append,
    )
    with structlog.testing.capture_logs() as logs:
        running = asyncio.create_task(producer.run())
        await eventually(lambda: len(sent) >= 2, timeout=10)
        producer.stop()
        await running
    release.set()
    server.close()
    assert producer.config.timeout == 1.0  # the default, like the reference
    assert len(sent) == producer.stats["sent"] == producer.stats["timeout"] == len(requests)
    for callback in sent:
        assert not callback.acknowledged
        assert (callback.status, callback.callback_id, callback.error) == (None, None, "timeout")
        assert callback.seconds >= 0.99
    for first, second in itertools.pairwise(sent):
        assert second.sent_at - first.sent_at >= 1.0 + 0.2 - 0.02
    failures = [e for e in logs if e["event"] == "callback not acknowledged"]
    assert len(failures) == len(sent)
    assert {e["outcome"] for e in failures} == {"timeout"}


async def test_producer_counts_refused_connections_and_error_replies() -> None:
    """A POST that cannot connect is an error and one answered 503 is rejected; both are
    counted, recorded as not acknowledged, and sent once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    answered = 0

    async def unavailable(request: web.Request) -> web.Response:
        nonlocal answered
        answered += 1
        return web.json_response({"error": "not_stored"}, status=503)

    app = web.Application()
    app.router.add_post("/callback", unavailable)
    runner, url = await serve_app(app)
    try:
        outcomes = {}
        for target in (f"http://127.0.0.1:{closed_port}/callback", url + "/callback"):
            sent: list[truth.SentCallback] = []
            producer = Producer(ProducerConfig(target=target, period=0.05, seed=2), sent.append)
            running = asyncio.create_task(producer.run())

            async def three(sent: list[truth.SentCallback] = sent) -> bool:
                return len(sent) >= 3

            await eventually(three)
            producer.stop()
            await running
            assert not any(s.acknowledged for s in sent)
            outcomes[target] = producer.stats
    finally:
        await runner.cleanup()
    refused, rejected = outcomes.values()
    assert refused["error"] == refused["sent"] >= 3
    assert rejected["rejected"] == rejected["sent"] == answered >= 3


async def test_load_mode_is_open_loop_over_many_connections() -> None:
    """With 100 callbacks/s over 10 connections to a server that takes 0.5 s per reply, the
    producer keeps its schedule (a closed loop would send 20 a second), never has more than 10
    requests on the wire at once, and counts the callbacks that wait past their timeout."""
    busy = 0
    most = 0

    async def slow(request: web.Request) -> web.Response:
        nonlocal busy, most
        busy += 1
        most = max(most, busy)
        try:
            await asyncio.sleep(0.5)
        finally:
            busy -= 1
        return web.json_response({"callback_id": 1}, status=202)

    app = web.Application()
    app.router.add_post("/callback", slow)
    # Cancels the handler when the producer gives up on a request and closes its connection,
    # so that ``busy`` counts the requests on live connections only.
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        producer = Producer(
            ProducerConfig(target=url + "/callback", rate=100, connections=10, seed=3)
        )
        running = asyncio.create_task(producer.run())
        await asyncio.sleep(1.0)
        producer.stop()
        await running
    finally:
        await runner.cleanup()
    stats = producer.stats
    assert stats["sent"] >= 60
    assert stats["acknowledged"] > 0
    assert stats["timeout"] > 0
    assert stats["sent"] == stats["acknowledged"] + stats["timeout"]
    # Requests at once, not ports over time: a timed-out request's connection is replaced.
    assert 1 < most <= 10


def test_ids_are_drawn_like_the_reference() -> None:
    """A callback holds a uniform count of 0 to 199 ids (so empty ones happen), each from 0 to
    99, with duplicates."""
    rng = random.Random(1)
    draws = [draw_ids(rng, 199, 100) for _ in range(3000)]
    counts = [len(ids) for ids in draws]
    assert (min(counts), max(counts)) == (0, 199)
    assert {i for ids in draws for i in ids} == set(range(100))
    assert all(len(set(ids)) < len(ids) for ids in draws if len(ids) > 50)


def test_simulate_flags_build_a_typed_config() -> None:
    """`lastseen simulate` without flags behaves like the reference program; flags set each
    part, and a bad online rule or fault rate is refused."""
    parser = build_parser()
    config = SimulatorConfig.from_arguments(parser.parse_args(["simulate"]))
    assert config.mode == "both"
    assert config.upstream_listen == ("127.0.0.1", 9010)
    assert (config.upstream.latency_min, config.upstream.latency_max) == (0.3, 4.3)
    assert config.upstream.content_type == "text/plain; charset=utf-8"
    assert config.upstream.online(4, 0)
    assert not config.upstream.online(3, 0)
    p = config.producer
    assert (p.target, p.period, p.timeout) == ("http://127.0.0.1:9090/callback", 5.0, 1.0)
    assert (p.max_ids, p.id_universe, p.rate) == (199, 100, 0.0)
    assert config.truth_dir is None

    flags = (
        "--mode upstream --online flip:10 --error-5xx 0.1 --drop 0.01 "
        "--rate 200 --connections 50 --id-universe 10000000 --upstream-listen :0"
    )
    args = parser.parse_args(["simulate", *flags.split()])
    config = SimulatorConfig.from_arguments(args)
    assert (config.runs_upstream, config.runs_producer) == (True, False)
    assert (config.upstream.error_5xx, config.upstream.drop) == (0.1, 0.01)
    assert config.upstream_listen == ("127.0.0.1", 0)
    assert (config.producer.rate, config.producer.connections) == (200.0, 50)
    assert config.producer.id_universe == 10_000_000
    for bad in ("--online odd", "--error-5xx 2", "--mode all"):
        with pytest.raises(SystemExit):
            parser.parse_args(["simulate", *bad.split()])
