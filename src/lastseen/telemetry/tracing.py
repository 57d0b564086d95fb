"""Optional OpenTelemetry tracing: a span per ``POST /callback`` with a child span for its
commit, and a span per upstream lookup attempt.

Off unless ``LASTSEEN_OTLP_ENDPOINT`` is set; it then needs the ``tracing`` extra. The spans are
made by wrappers that the composition root puts around the handler, the group commit's submit
and the upstream fetch only when tracing is on, so with tracing off the hot paths are exactly
what they are without this module.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Handler

from lastseen import __version__
from lastseen.core.errors import ConfigError, LookupFailed
from lastseen.core.model import Fetch

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

Submit = Callable[[float, Sequence[int]], Awaitable[int | str]]


def start_tracing(endpoint: str | None) -> tuple[Tracer, Callable[[], None]] | None:
    """The tracer exporting to ``endpoint`` (OTLP over HTTP), and how to flush and stop it;
    None when tracing is off."""
    if endpoint is None:
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise ConfigError(
            "LASTSEEN_OTLP_ENDPOINT", "tracing needs pip install 'lastseen[tracing]'"
        ) from exc
    resource = Resource.create({"service.name": "lastseen", "service.version": __version__})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return provider.get_tracer("lastseen"), provider.shutdown


def traced_handler(handler: Handler, tracer: Tracer) -> Handler:
    """``handler`` inside a server span named for its request."""
    from opentelemetry.trace import SpanKind

    async def handle(request: web.Request) -> web.StreamResponse:
        name = f"{request.method} {request.path}"
        with tracer.start_as_current_span(name, kind=SpanKind.SERVER) as span:
            response = await handler(request)
            span.set_attribute("http.response.status_code", response.status)
            return response

    return handle


def traced_submit(submit: Submit, tracer: Tracer) -> Submit:
    """The group commit's ``submit``, awaited inside a span: the time a callback waits to be
    durable."""

    async def commit(received_at: float, object_ids: Sequence[int]) -> int | str:
        with tracer.start_as_current_span("inbox commit") as span:
            span.set_attribute("lastseen.ids", len(object_ids))
            callback_id = await submit(received_at, object_ids)
            span.set_attribute("lastseen.callback_id", callback_id)
            return callback_id

    return commit


def traced_fetch(fetch: Fetch, tracer: Tracer) -> Fetch:
    """One upstream lookup attempt inside a client span, with its outcome."""
    from opentelemetry.trace import SpanKind

    def lookup(object_id: int, done: Callable[[bool | LookupFailed], None]) -> None:
        attributes = {"lastseen.object_id": object_id}
        span = tracer.start_span("lookup", kind=SpanKind.CLIENT, attributes=attributes)

        def answered(outcome: bool | LookupFailed) -> None:
            if isinstance(outcome, LookupFailed):
                span.set_attribute("lastseen.failure", outcome.reason)
            else:
                span.set_attribute("lastseen.online", outcome)
            span.end()
            done(outcome)

        fetch(object_id, answered)

    return lookup
