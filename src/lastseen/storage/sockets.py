"""TCP connections to PostgreSQL that give up on a server that stopped answering.

A server behind a network that drops packets answers nothing, not even a reset: without this,
a connection waits for the kernel's retransmissions (about 15 minutes) or keepalives (over two
hours by default) before it fails, and holds its pool slot meanwhile. With it, data unacknowledged
for the timeout (TCP_USER_TIMEOUT) or an idle connection whose keepalive probes go unanswered
fails the connection within about that long, and the pool opens a new one.
"""

from __future__ import annotations

import socket

import asyncpg

TCP_TIMEOUT = 10.0  # s: the statement timeout's length
KEEPALIVE_PROBES = 3


def abandon_when_silent(conn: asyncpg.Connection, seconds: float) -> None:
    """Sets keepalive (after ``seconds / 2`` idle, probes ``KEEPALIVE_PROBES`` times in the
    other half) and TCP_USER_TIMEOUT (``seconds``) on ``conn``'s socket; nothing for a Unix
    socket or with ``seconds`` 0."""
    # asyncpg has no setting for these (MagicStack/asyncpg#606); its maintainers point to
    # the transport's socket.
    sock = conn._transport.get_extra_info("socket")
    if seconds <= 0 or sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    idle = max(1, int(seconds / 2))
    interval = max(1, int(seconds / 2 / KEEPALIVE_PROBES))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (
        ("TCP_KEEPIDLE", idle),
        ("TCP_KEEPINTVL", interval),
        ("TCP_KEEPCNT", KEEPALIVE_PROBES),
        ("TCP_USER_TIMEOUT", int(seconds * 1000)),  # milliseconds
    ):
        if hasattr(socket, option):  # Linux's; other systems keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
