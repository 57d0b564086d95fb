"""The processes of a ``lastseen serve`` under measurement: its worker processes and their RSS."""

from __future__ import annotations

import contextlib
from typing import Any

import psutil

from lastseen.devtools.launch import ServeProcess


def workers(serve: ServeProcess) -> list[psutil.Process]:
    """The worker processes of ``serve`` (none if it is gone)."""
    with contextlib.suppress(psutil.Error):
        children: list[psutil.Process] = psutil.Process(serve.pid).children()
        return children
    return []


def rss_mib(pid: int) -> dict[str, float]:
    """RSS of ``serve`` and of each of its worker processes, in MiB."""
    try:
        root = psutil.Process(pid)
        found = {"serve": root.memory_info().rss / 2**20}
        for n, child in enumerate(root.children()):
            with contextlib.suppress(psutil.Error):
                found[f"worker{n}"] = child.memory_info().rss / 2**20
        return {k: round(v, 1) for k, v in found.items()}
    except psutil.Error:
        return {}


def rss_growth(samples: list[dict[str, Any]]) -> dict[str, float]:
    """Per process, how much its RSS grew over the second half of ``samples`` (each with an
    ``rss_mib`` of ``rss_mib``'s shape), in MiB."""
    half = samples[len(samples) // 2 :] or samples
    if not half:
        return {}
    first, last = half[0]["rss_mib"], half[-1]["rss_mib"]
    return {name: round(last[name] - first[name], 1) for name in first if name in last}
