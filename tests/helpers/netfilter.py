"""Packets dropped by the kernel (iptables), as a network that loses them does: nothing is
refused or reset, the peer just never answers, and TCP retransmits into the void."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator

import pytest


def _rule(port: int) -> list[str]:
    return ["INPUT", "-i", "lo", "-p", "tcp", "--dport", str(port), "-j", "DROP"]


def can_drop() -> str | None:
    """Why packets cannot be dropped here (no iptables, not allowed to set rules), or None."""
    exe = shutil.which("iptables")
    if exe is None:
        return "no iptables here to drop packets with"
    listed = subprocess.run([exe, "-L", "INPUT", "-n"], capture_output=True, text=True)
    if listed.returncode != 0:
        return f"cannot set packet filter rules here: {listed.stderr.strip()}"
    return None


@contextlib.contextmanager
def dropping(port: int) -> Iterator[None]:
    """Every packet to loopback ``port`` dropped while inside; skips the test where that cannot
    be done."""
    why = can_drop()
    if why is not None:
        pytest.skip(why)
    exe = shutil.which("iptables") or "iptables"
    subprocess.run([exe, "-I", *_rule(port)], check=True, capture_output=True)
    try:
        yield
    finally:
        subprocess.run([exe, "-D", *_rule(port)], check=True, capture_output=True)
