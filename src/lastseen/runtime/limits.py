"""What the operating system lets one process hold: open files, and connections to one address.

Every lookup in flight holds a connection to the upstream, so both bound ``LASTSEEN_MAX_LOOKUPS``.

Ephemeral ports. Connections from one host to one address and port each take a local port of
``net.ipv4.ip_local_port_range`` (32768-60999 by default). Linux gives ``connect()`` the ports of
one parity first and searches them one by one, so past about half the range every new
connection costs a scan of the ports in use: measured here, 80 µs of CPU per connect below
13,000 connections, 0.7 to 1.6 ms past 14,000. At 6,000 lookups/s with the reference latency a
worker needs about 14,000 connections; beyond that, connecting took 64 to 72% of its CPU, answers
came late, timeouts closed connections, and the reconnects made it worse: 15,000 timeouts in
20 s and an upstream "outage" that was the worker's own. Below the bound, lookups wait for a slot
instead, at the most the kernel allows cheaply. The ports are the host's, so the worker processes
of one instance split them (``port_share``); instances that share a host and an upstream are for
the operator to size.
"""

from __future__ import annotations

import contextlib
import resource
from pathlib import Path

import structlog

from lastseen.config.settings import Settings

log = structlog.get_logger("lastseen.runtime.limits")

# File descriptors kept for everything but upstream connections: the pool, the listener, clients.
FD_MARGIN = 1024
# Local ports kept for everything else this host connects to one address with (other lookups'
# connections closing, the database, a second worker process's first connections).
PORT_MARGIN = 0.05
PORT_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def raise_open_file_limit() -> int:
    """Raises this process's open-file limit to its hard limit (as far as allowed); returns
    the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


def ephemeral_ports(port_range: Path = PORT_RANGE) -> tuple[int, int] | None:
    """The host's ephemeral port range, where it can be read."""
    try:
        low, high = (int(n) for n in port_range.read_text().split())
    except (OSError, ValueError):
        return None
    return low, high


def fit_lookups(settings: Settings, port_range: Path = PORT_RANGE) -> Settings:
    """Raises this process's open-file limit, and lowers ``max_lookups`` to what that limit
    and the ephemeral ports allow. Said once, naming the value in force and what bounds it:
    as a warning where the operator set ``LASTSEEN_MAX_LOOKUPS`` (they asked for more than
    they get), as information where the default was lowered (nothing to act on)."""
    soft = raise_open_file_limit()
    bounds: dict[str, int] = {}
    if soft != resource.RLIM_INFINITY and soft - FD_MARGIN < settings.max_lookups:
        bounds["open_file_limit"] = soft - FD_MARGIN
    ports = ephemeral_ports(port_range)
    if ports is not None:
        # The ports are the host's: the worker processes of one instance split them.
        cheap = int((ports[1] - ports[0] + 1) // 2 * (1 - PORT_MARGIN)) // settings.port_share
        if cheap < settings.max_lookups:
            bounds["ephemeral_ports"] = cheap
    if not bounds:
        return settings
    using = max(1, min(bounds.values()))
    facts = {
        "using": using,
        "open_file_limit": soft,
        "port_range": None if ports is None else f"{ports[0]}-{ports[1]}",
        "worker_processes": settings.port_share,
    }
    if settings.max_lookups != DEFAULT_MAX_LOOKUPS:
        log.warning(
            "LASTSEEN_MAX_LOOKUPS is above what this host allows one process; using less "
            "(raise the open-file limit with ulimit -n, widen the sysctl "
            "net.ipv4.ip_local_port_range, or run more worker processes)",
            max_lookups=settings.max_lookups,
            **facts,
        )
    else:
        log.info("lookups in flight per process, as this host allows", **facts)
    return settings.replace(max_lookups=using)


DEFAULT_MAX_LOOKUPS: int = Settings.load({}).max_lookups
