"""The upstream client a process opens from its settings."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from lastseen.config.settings import Settings
from lastseen.upstream.client import UpstreamClient


@contextlib.asynccontextmanager
async def upstream_client(settings: Settings) -> AsyncIterator[UpstreamClient]:
    """The one upstream client of a process, closed on exit. Lookups cap its concurrency."""
    client = UpstreamClient(
        settings.objects_url,
        timeout=settings.lookup_timeout,
        max_idle=settings.max_lookups,
        ca_file=settings.upstream_ca_file,
        client_cert=settings.upstream_client_cert,
        client_key=settings.upstream_client_key,
        header=settings.upstream_header,
    )
    try:
        yield client
    finally:
        await client.close()
