"""Structured logs: JSON lines in production, readable lines on a terminal."""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from typing import BinaryIO, TextIO

import structlog


def resolved_log_format(log_format: str) -> str:
    """``json`` or ``console``: ``auto`` is console on a terminal."""
    if log_format != "auto":
        return log_format
    return "console" if sys.stderr.isatty() else "json"


class _Unbroken(io.TextIOBase):
    """Standard error that outlives its reader: a process whose log reader died (a worker
    process's parent, a launcher's pipe) still stops in order (and hands its leases back)
    instead of dying of a broken pipe in the middle of its stop."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        with contextlib.suppress(OSError, ValueError):
            self.stream.write(text)
        return len(text)

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def buffer(self) -> BinaryIO:  # a worker process's log is passed on as bytes
        return self.stream.buffer

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self.stream.encoding


def tolerate_lost_stderr() -> None:
    """Makes writes to standard error ignore a reader that went away (see ``_Unbroken``)."""
    sys.stderr = _Unbroken(sys.stderr)


def configure(log_format: str = "auto", level: str = "info") -> None:
    """Sets up structlog (and the standard library's logging, for libraries) once per process."""
    pretty = resolved_log_format(log_format) == "console"
    renderer: structlog.typing.Processor = (
        structlog.dev.ConsoleRenderer() if pretty else structlog.processors.JSONRenderer()
    )
    numeric = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr, force=True)
