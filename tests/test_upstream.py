"""The simulated upstream speaks HTTP like the reference: delays, text/plain JSON, 400s."""

from __future__ import annotations

import time

import aiohttp
from helpers.services import StartUpstream


async def test_answers_like_the_reference(start_upstream: StartUpstream) -> None:
    """Even ids online, JSON sent as text/plain after the delay, 400 'invalid id' for a bad id,
    404 elsewhere; one kept-alive connection serves several requests in order."""
    upstream, url = await start_upstream(latency_min=0.05, latency_max=0.05)
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as http:
        started = time.monotonic()
        async with http.get(url + "/objects/4") as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
            assert await response.read() == b'{"id":4,"online":true}'
        assert time.monotonic() - started >= 0.05
        async with http.get(url + "/objects/7") as response:
            assert await response.read() == b'{"id":7,"online":false}'
        async with http.get(url + "/objects/x") as response:
            assert (response.status, await response.read()) == (400, b"invalid id")
        async with http.get(url + "/elsewhere") as response:
            assert response.status == 404
        async with http.get(url + "/objects/2", headers={"Connection": "close"}) as response:
            assert response.status == 200
            assert response.headers["Connection"] == "close"
    assert upstream.stats["requests"] == 5
    assert upstream.stats["ok"] == 3
    assert upstream.in_flight == 0
