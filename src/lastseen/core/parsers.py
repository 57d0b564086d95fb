"""Parsers of setting and flag values, shared by the settings and the simulator's flags, and
of the numbers in requests.

Each takes the text of a flag or an environment variable and returns the value or raises
``ValueError`` saying what was expected. Numbers must be finite: a ``nan`` interval would
compare false with everything and an ``inf`` one would never end.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import msgspec

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# The most rows one page of a list reply holds (objects, dead letters).
PAGE_LIMIT = 1000
_INTEGER = re.compile("-?[0-9]+")
_EPOCH = re.compile(r"[0-9]+(\.[0-9]+)?")


def integer(value: str) -> int:
    """A decimal integer as the OpenAPI document's integers are written: Python's ``int()``
    also takes ``" 7"``, ``"7_000"``, ``"+7"`` and other scripts' digits."""
    if not _INTEGER.fullmatch(value):
        raise ValueError(f"expected an integer, got {value!r}")
    return int(value)


def integral_floats(body: bytes) -> bytes | None:
    """The JSON ``body`` with numbers written as floats with no fraction (``7.0``, ``1e3``:
    integers to JSON Schema, and what some producers' encoders write) as integers; None if it
    has none. For a body a strict decoder refused, so the common path decodes once."""
    found = False

    def fixed(value: Any) -> Any:
        nonlocal found
        if isinstance(value, float) and value.is_integer():
            found = True
            return int(value)
        if isinstance(value, list):
            return [fixed(item) for item in value]
        if isinstance(value, dict):
            return {key: fixed(item) for key, item in value.items()}
        return value

    rewritten = fixed(msgspec.json.decode(body))
    return msgspec.json.encode(rewritten) if found else None


def host_port(value: str, default_host: str = "0.0.0.0") -> tuple[str, int]:
    """``host:port`` (``:port`` means ``default_host``); IPv6 hosts may be in brackets."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port, got {value!r}")
    return host.strip("[]") or default_host, int(port)


def loopback_host_port(value: str) -> tuple[str, int]:
    """``host:port``, where ``:port`` means loopback."""
    return host_port(value, "127.0.0.1")


def http_url(value: str) -> str:
    """An http(s) URL, without a trailing slash."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"expected an http(s) URL, got {value!r}")
    return value.rstrip("/")


def boolean(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean, got {value!r}")


def at_least(
    kind: Callable[[str], Any], low: float, *, strict: bool = False
) -> Callable[[str], Any]:
    """A finite number of ``kind`` that is at least ``low`` (greater than it, if ``strict``)."""

    def parse(value: str) -> Any:
        parsed = kind(value)
        if not math.isfinite(parsed):
            raise ValueError(f"must be a finite number, got {value!r}")
        if parsed < low or (strict and parsed == low):
            relation = "greater than" if strict else "at least"
            raise ValueError(f"must be {relation} {low:g}, got {value!r}")
        return parsed

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    return at_least(kind, 0, strict=True)


def non_negative(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    return at_least(kind, 0)


def share(value: str) -> float:
    """A probability, from 0 to 1."""
    parsed = float(value)
    if not 0.0 <= parsed <= 1.0:
        raise ValueError(f"expected a probability from 0 to 1, got {value!r}")
    return parsed


def choice(*choices: str) -> Callable[[str], str]:
    def parse(value: str) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    return parse


def iso_or_epoch(text: str) -> datetime:
    """A time as the API, the CLI and the import take it: epoch seconds (digits, and a
    fraction: not 1e5, nan or inf), or ISO 8601 (UTC where it names no zone). ValueError
    (OverflowError for a huge number) for anything else;
    a date-time whose UTC falls off the calendar (0001-01-01T00:00+05:00) is the calendar's
    edge, which compares the same."""
    if _EPOCH.fullmatch(text):
        return datetime.fromtimestamp(float(text), UTC)
    parsed = datetime.fromisoformat(text)
    try:
        return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    except OverflowError:
        edge = datetime.min if parsed.year == 1 else datetime.max
        return edge.replace(tzinfo=UTC)
