"""Optional OpenTelemetry tracing: spans for a callback, its commit and its lookups."""

from __future__ import annotations

import asyncpg
from helpers.services import StartService, StartUpstream
from helpers.waiting import all_done
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from lastseen.telemetry.tracing import start_tracing


async def test_a_callback_its_commit_and_its_lookups_are_spans(
    start_service: StartService, start_upstream: StartUpstream, sql: asyncpg.Connection
) -> None:
    """POST /callback is a server span with its status; the commit it waits for is a child
    span with the callback id; each lookup attempt is a client span with its id and answer."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _, url = await start_upstream()
    service = await start_service(objects_url=url, ttl=30, tracer=provider.get_tracer("test"))
    _, answer = await service.post('{"object_ids": [2, 3]}')
    await all_done(sql, 1)
    spans = exporter.get_finished_spans()
    (post,) = [s for s in spans if s.name == "POST /callback"]
    (commit,) = [s for s in spans if s.name == "inbox commit"]
    assert post.attributes is not None
    assert post.attributes["http.response.status_code"] == 202
    assert commit.parent is not None
    assert commit.parent.span_id == post.context.span_id
    assert commit.attributes is not None
    assert commit.attributes["lastseen.callback_id"] == answer["callback_id"]
    lookups = {
        s.attributes["lastseen.object_id"]: s.attributes["lastseen.online"]
        for s in spans
        if s.name == "lookup" and s.attributes is not None
    }
    assert lookups == {2: True, 3: False}


def test_tracing_is_off_without_an_endpoint() -> None:
    """No endpoint, no tracer; with one, a tracer and a way to stop it."""
    assert start_tracing(None) is None
    started = start_tracing("http://127.0.0.1:9/v1/traces")
    assert started is not None
    tracer, stop = started
    assert tracer is not None
    stop()
