"""The ground truth of a simulated run: what the producer sent and what the upstream answered.

Two JSON-lines files in the truth directory, one line per event, written as the run goes so
that memory stays flat however long it runs: ``callbacks.jsonl`` (one ``SentCallback`` per POST)
and ``answers.jsonl`` (one upstream ``Answer`` per request for a numeric id). Each file is
flushed at least once a second and on close, so a simulator killed with ``kill -9`` loses at most
its last second. ``lastseen verify`` reads them back.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TypeVar

import msgspec

from lastseen.devtools.simulate.upstream import Answer

CALLBACKS = "callbacks.jsonl"
ANSWERS = "answers.jsonl"

T = TypeVar("T")


class SentCallback(msgspec.Struct, frozen=True):
    """One POST /callback by the producer, and how it ended."""

    sent_at: float  # wall-clock time the request was started
    ids: list[int]  # as sent: duplicates and order included
    acknowledged: bool  # a 202 with a callback id came back in time
    status: int | None  # the reply's HTTP status; None when no reply came
    callback_id: int | None  # from the 202 body
    error: str | None  # "timeout", or the connection error; None when a reply came
    seconds: float  # from sending to the reply or the failure


class TruthWriter:
    """Appends records to one JSON-lines file; flushes every ``flush_every`` seconds."""

    def __init__(self, path: Path, flush_every: float = 1.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.flush_every = flush_every
        # A run owns its files: a truth directory reused by a new run starts over.
        self._file: IO[bytes] | None = open(path, "wb")  # noqa: SIM115 - closed by close()
        self._encoder = msgspec.json.Encoder()
        self._flushed = time.monotonic()
        self.written = 0

    def write(self, record: object) -> None:
        if self._file is None:
            return  # closed: late answers of a stopping upstream are not part of the run
        self._file.write(self._encoder.encode(record) + b"\n")
        self.written += 1
        now = time.monotonic()
        if now - self._flushed >= self.flush_every:
            self._file.flush()
            self._flushed = now

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read(path: Path, kind: type[T]) -> Iterator[T]:
    """The records of one truth file, in order. A torn last line (a killed writer) is skipped."""
    decoder = msgspec.json.Decoder(kind)
    with open(path, "rb") as file:
        for line in file:
            if not line.endswith(b"\n"):
                return
            yield decoder.decode(line)


def read_callbacks(truth_dir: Path) -> Iterator[SentCallback]:
    return read(truth_dir / CALLBACKS, SentCallback)


def read_answers(truth_dir: Path) -> Iterator[Answer]:
    return read(truth_dir / ANSWERS, Answer)
