"""Reading import sources: files (gzip or not) and standard input, parsed into records a line
at a time, each good record a callback's ids, each bad one a reject with its line and reason.
importer.py stores them."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import io
import math
import re
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import msgspec

from lastseen.core.errors import ImportSourceError, InvalidCallback, TooManyIds
from lastseen.core.parsers import iso_or_epoch
from lastseen.intake.ingest import CallbackBody, ObjectId, decode_callback


class ReplayedCallback(CallbackBody):
    """A JSON line: a callback body, optionally with its original receive time."""

    received_at: datetime | float | None = None


_decoder = msgspec.json.Decoder(ReplayedCallback)


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
    line: int  # its first line
    ids: list[int]
    received_at: float | None  # epoch seconds; None: the time of the import
    rows: int = 1  # source rows it holds (--column groups several)


@dataclasses.dataclass(frozen=True, slots=True)
class Reject:
    line: int
    reason: str
    text: str
    detail: str = ""  # what was wrong, in words, where more can be said than the reason


@dataclasses.dataclass
class Source:
    """One opened source: its lines' bytes, and how far into it the reading is."""

    stream: IO[bytes]
    raw: IO[bytes]
    size: int | None  # bytes, when known
    name: str  # the default source name: the file's name and a digest of its first MiB

    @property
    def position(self) -> int:
        try:
            return self.raw.tell()
        except (OSError, ValueError):
            return 0

    def close(self) -> None:
        self.stream.close()


def open_source(path: str) -> Source:
    """``path`` (``-``: standard input), decompressed if it is gzip."""
    if path == "-":
        raw: IO[bytes] = sys.stdin.buffer
        return _source(raw, None, "stdin")
    try:
        raw = Path(path).open("rb")  # noqa: SIM115 -- Source.close closes it
    except OSError as exc:
        raise ImportSourceError(f"{path}: {exc.strerror}") from None
    digest = hashlib.sha256(raw.read(1 << 20)).hexdigest()[:16]
    raw.seek(0)
    return _source(raw, Path(path).stat().st_size, f"{Path(path).name}@{digest}")


def _source(raw: IO[bytes], size: int | None, name: str) -> Source:
    buffered = io.BufferedReader(raw, 1 << 16)  # type: ignore[type-var]
    if buffered.peek(2)[:2] == b"\x1f\x8b":
        return Source(gzip.GzipFile(fileobj=buffered), raw, size, name)  # type: ignore[arg-type]
    return Source(buffered, raw, size, name)


# A receive time later than now by more than this is refused: a clock a little ahead is
# allowed, a time in 2100 would make an object that never expires and that no later
# "offline" could remove (results are monotonic in the receive time).
FUTURE_ALLOWANCE = 60.0
# PostgreSQL's earliest timestamptz (4713 BC), in epoch seconds.
_EARLIEST = -210_866_803_200.0


def _epoch(value: datetime | float | str | None) -> float | None:
    """A receive time as epoch seconds (None: the time of the import), or ``InvalidCallback``
    (``bad_received_at``) for one that is not a time, not finite, in the future beyond
    ``FUTURE_ALLOWANCE`` or before PostgreSQL's range."""
    if value is None or value == "":
        return None
    try:
        if isinstance(value, str):
            value = iso_or_epoch(value)
        if isinstance(value, datetime):
            if value.tzinfo is None:
                value = value.replace(tzinfo=UTC)
            value = value.timestamp()
    except (ValueError, OverflowError) as exc:
        raise InvalidCallback("bad_received_at", f"received_at: not a time ({exc})") from None
    epoch = float(value)
    if not math.isfinite(epoch):
        raise InvalidCallback("bad_received_at", "received_at: not a finite time")
    if epoch > time.time() + FUTURE_ALLOWANCE:
        detail = f"received_at: more than {FUTURE_ALLOWANCE:g} s in the future"
        raise InvalidCallback("bad_received_at", detail)
    if epoch < _EARLIEST:
        raise InvalidCallback("bad_received_at", "received_at: before PostgreSQL's range")
    return epoch


def _jsonl(lines: Iterator[tuple[int, bytes]], max_ids: int) -> Iterator[Record | Reject]:
    for number, line in lines:
        if not line.strip():
            continue
        try:
            body = decode_callback(line, _decoder)
            if len(body.object_ids) > max_ids:
                raise TooManyIds(len(body.object_ids), max_ids)
            yield Record(number, body.object_ids, _epoch(body.received_at))
        except InvalidCallback as exc:
            yield Reject(number, exc.reason, line.decode(errors="replace").rstrip(), exc.detail)


def _ids(cell: str) -> list[int]:
    """The ids of a cell, held to the bounds POST /callback holds them to (``ObjectId``)."""
    text = cell.strip()
    if text.startswith("["):
        return msgspec.json.decode(text, type=list[ObjectId])
    parts = text.replace(";", " ").replace(",", " ").split()
    bad = [part for part in parts if not _ID.fullmatch(part)]
    if bad:
        raise ValueError(f"not an id: {bad[0]!r}")
    return msgspec.convert([int(part) for part in parts], type=list[ObjectId])


_ID = re.compile(r"[-+]?[0-9]+")


def _csv(
    lines: Iterator[tuple[int, bytes]],
    name: str,
    column: str | None,
    ids_per_callback: int,
    max_ids: int,
) -> Iterator[Record | Reject]:
    header: list[str] | None = None
    group: list[int] = []
    group_line = 0
    for number, raw in lines:
        text = raw.decode(errors="replace").rstrip("\r\n")
        if not text.strip():
            continue
        try:
            row = next(csv.reader([text], strict=True))
        except csv.Error as exc:
            yield Reject(number, "bad_csv", text, str(exc))
            continue
        if header is None:
            header = [name.strip() for name in row]
            wanted = column or "object_ids"
            if column is None and len(header) == 1 and header[0] in ("id", "object_id"):
                column = header[0]  # one id per row, as --column would say
                wanted = column
            if wanted not in header:
                raise ImportSourceError(
                    f"{name}: no {wanted!r} column in the header ({', '.join(header)}); "
                    "name the column of ids with --column"
                )
            index = header.index(wanted)
            times = header.index("received_at") if "received_at" in header else None
            continue
        if len(row) != len(header):
            yield Reject(
                number,
                "wrong_column_count",
                text,
                f"{len(row)} columns, the header has {len(header)}",
            )
            continue
        try:
            if column is None:
                ids = _ids(row[index])
                if len(ids) > max_ids:
                    raise TooManyIds(len(ids), max_ids)
                received = _epoch(row[times]) if times is not None else None
                yield Record(number, ids, received)
                continue
            (object_id,) = _ids(row[index])
        except InvalidCallback as exc:
            yield Reject(number, exc.reason, text, exc.detail)
            continue
        except msgspec.ValidationError as exc:
            yield Reject(number, "id_out_of_range", text, str(exc))
            continue
        except (ValueError, msgspec.DecodeError) as exc:
            yield Reject(number, "invalid_id", text, str(exc))
            continue
        if not group:
            group_line = number
        group.append(object_id)
        if len(group) == ids_per_callback:
            yield Record(group_line, group, None, len(group))
            group = []
    if group:
        yield Record(group_line, group, None, len(group))


def read_records(
    stream: IO[bytes],
    *,
    name: str = "the file",
    fmt: str,
    column: str | None,
    ids_per_callback: int,
    max_ids: int,
) -> Iterator[Record | Reject]:
    """The records of one source, in order, streamed: a line at a time."""
    lines = enumerate(stream, start=1)
    if fmt == "jsonl":
        return _jsonl(lines, max_ids)
    return _csv(lines, name, column, ids_per_callback, max_ids)


def guess_format(path: str) -> str:
    name = path.lower().removesuffix(".gz")
    return "csv" if name.endswith(".csv") else "jsonl"
