"""The processes of a ``lastseen serve`` under measurement: its worker processes and their RSS."""

from __future__ import annotations

import contextlib

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
