"""``lastseen import``: callbacks from files, through the same durable inbox as POST /callback.

Sources: JSON lines of ``{"object_ids": [...]}`` (optionally with ``received_at``, an RFC 3339
time or epoch seconds, for a replay that keeps the original times), or CSV with a header: an
``object_ids`` column (a JSON list, or ids separated by spaces or semicolons) with an optional
``received_at`` column, or ``--column NAME`` for one id per row, grouped into callbacks of
``--ids-per-callback``. Gzip-compressed files are read as they are; ``-`` is standard input.

Records are validated as ``POST /callback`` validates bodies, with the same bounds; a bad
record is skipped and reported (line and reason), never its neighbours. Good records are
stored in chunks, each one durable transaction, and the workers are notified after each.

Idempotent by source position: each stored callback carries ``SOURCE:LINE``, unique in the
inbox, so importing a file again, or resuming an import that was killed, stores nothing twice
(for as long as the callbacks are kept: ``LASTSEEN_AUDIT_RETENTION`` after they are done). The
source is the file's name and a digest of its first MiB, or ``--source``.

Records received more than the TTL ago are stored for the audit; they cost no lookups (the
worker and the reaper complete such callbacks without them).
"""

from __future__ import annotations

import collections
import contextlib
import csv
import dataclasses
import gzip
import hashlib
import io
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import msgspec

from lastseen.errors import ImportSourceError, InvalidCallback, TooManyIds
from lastseen.ingest import CallbackBody, ObjectId, decode_callback
from lastseen.storage.database import Database, id_array

_MAX_ID = 2**63 - 1


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


@dataclasses.dataclass
class Summary:
    read: int = 0  # source records (rows, lines)
    callbacks: int = 0  # callbacks they made (--column groups rows)
    stored: int = 0  # callbacks stored now
    already: int = 0  # callbacks stored by an earlier import
    rejected: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)

    def lines(self) -> list[str]:
        skipped = sum(self.rejected.values())
        by_reason = ", ".join(f"{r}: {n}" for r, n in sorted(self.rejected.items())) or "none"
        made = f" ({self.callbacks} callbacks)" if self.callbacks != self.read - skipped else ""
        return [
            f"{self.read} records read{made}, {self.stored} stored, {self.already} already "
            f"present, {skipped} skipped ({by_reason})"
        ]


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


def _epoch(value: datetime | float | str | None) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, float | int):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


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
            yield Reject(number, exc.reason, line.decode(errors="replace").rstrip())


def _ids(cell: str) -> list[int]:
    text = cell.strip()
    if text.startswith("["):
        return msgspec.json.decode(text, type=list[ObjectId])
    return [int(part) for part in text.replace(";", " ").replace(",", " ").split()]


def _check(ids: list[int]) -> None:
    for i in ids:
        if not -_MAX_ID - 1 <= i <= _MAX_ID:
            raise InvalidCallback("id_out_of_range", f"{i} does not fit 64 bits")


def _csv(
    lines: Iterator[tuple[int, bytes]],
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
            yield Reject(number, "bad_csv", f"{text} ({exc})")
            continue
        if header is None:
            header = [name.strip() for name in row]
            wanted = column or "object_ids"
            if wanted not in header:
                raise ImportSourceError(f"no {wanted!r} column in the header: {', '.join(header)}")
            index = header.index(wanted)
            times = header.index("received_at") if "received_at" in header else None
            continue
        if len(row) != len(header):
            yield Reject(number, "wrong_column_count", text)
            continue
        try:
            if column is None:
                ids = _ids(row[index])
                _check(ids)
                if len(ids) > max_ids:
                    raise TooManyIds(len(ids), max_ids)
                received = _epoch(row[times]) if times is not None else None
                yield Record(number, ids, received)
                continue
            (object_id,) = _ids(row[index])
            _check([object_id])
        except InvalidCallback as exc:
            yield Reject(number, exc.reason, text)
            continue
        except msgspec.ValidationError:
            yield Reject(number, "id_out_of_range", text)
            continue
        except (ValueError, msgspec.DecodeError):
            yield Reject(number, "invalid_id", text)
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
    fmt: str,
    column: str | None,
    ids_per_callback: int,
    max_ids: int,
) -> Iterator[Record | Reject]:
    """The records of one source, in order, streamed: a line at a time."""
    lines = enumerate(stream, start=1)
    if fmt == "jsonl":
        return _jsonl(lines, max_ids)
    return _csv(lines, column, ids_per_callback, max_ids)


def guess_format(path: str) -> str:
    name = path.lower().removesuffix(".gz")
    return "csv" if name.endswith(".csv") else "jsonl"


async def import_records(
    db: Database,
    records: Iterator[Record | Reject],
    source: str,
    *,
    chunk: int,
    summary: Summary,
    on_reject: Callable[[Reject], None],
    on_chunk: Callable[[Summary], None],
) -> None:
    """Stores ``records`` in chunks of ``chunk``, each one durable transaction, and wakes the
    workers after each; counts into ``summary``."""
    pending: list[Record] = []

    async def flush() -> None:
        now = time.time()
        stored = await db.insert_imported_callbacks(
            [now if r.received_at is None else r.received_at for r in pending],
            [id_array(r.ids) for r in pending],
            [f"{source}:{r.line}" for r in pending],
        )
        summary.stored += stored
        summary.already += len(pending) - stored
        summary.callbacks += len(pending)
        pending.clear()
        if stored:
            await db.notify_inbox()
        on_chunk(summary)

    for item in records:
        summary.read += 1 if isinstance(item, Reject) else item.rows
        if isinstance(item, Reject):
            summary.rejected[item.reason] += 1
            on_reject(item)
            continue
        pending.append(item)
        if len(pending) >= chunk:
            await flush()
    if pending:
        await flush()


class ImportProgress:
    """A progress bar with records/s and an estimate on a terminal; otherwise a plain line per
    chunk on standard error."""

    def __init__(self, *, live: bool) -> None:
        self.live = live

    @contextlib.contextmanager
    def file(
        self, path: str, source: Source, before: Summary
    ) -> Iterator[Callable[[Summary], None]]:
        """Shows one file's progress; ``before``: the counts of the files before it."""
        started = time.monotonic()
        read_before = before.read
        stored_before, already_before = before.stored, before.already
        skipped_before = sum(before.rejected.values())

        def line(summary: Summary) -> None:
            rate = (summary.read - read_before) / max(time.monotonic() - started, 1e-9)
            skipped = sum(summary.rejected.values()) - skipped_before
            print(
                f"{path}: {summary.read - read_before} read, {summary.stored - stored_before} "
                f"stored, {summary.already - already_before} already present, {skipped} "
                f"skipped, {rate:,.0f} records/s",
                file=sys.stderr,
                flush=True,
            )

        if not self.live:
            yield line
            return
        from rich.progress import (
            BarColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[records]:,} records, {task.fields[rate]:,.0f}/s"),
            TimeRemainingColumn(),
            transient=False,
        ) as bar:
            task = bar.add_task(path, total=source.size, records=0, rate=0.0)

            def update(summary: Summary) -> None:
                read = summary.read - read_before
                rate = read / max(time.monotonic() - started, 1e-9)
                bar.update(task, completed=source.position, records=read, rate=rate)

            yield update
            bar.update(task, completed=source.size or source.position)
