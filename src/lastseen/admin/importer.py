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
import dataclasses
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from lastseen.admin.import_sources import (
    Record,
    Reject,
    Source,
    guess_format,
    open_source,
    read_records,
)
from lastseen.config.settings import Settings
from lastseen.core.errors import ImportSourceError
from lastseen.storage.arrays import id_array
from lastseen.storage.database import Database

SHOWN_REJECTS = 10  # the first skipped records are named on standard error


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
        stored = await db.insert_keyed_callbacks(
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


async def run(
    settings: Settings,
    files: Sequence[str],
    *,
    fmt: str,
    column: str | None,
    ids_per_callback: int,
    chunk: int,
    source: str | None,
    rejects: Path | None,
    allow_rejects: bool,
) -> int:
    """``lastseen import``: every file in turn; the exit status (1 if a record was rejected,
    unless ``allow_rejects``)."""
    from lastseen.storage.connect import database

    summary = Summary()
    rejected_to = rejects.open("w", encoding="utf-8") if rejects else None
    progress = ImportProgress(live=sys.stderr.isatty())
    try:
        async with database(settings) as db:
            await db.migrate()
            for path in files:
                opened = open_source(path)
                name = source or opened.name
                if path == "-" and not source:
                    # Nothing names standard input: without --source it cannot be resumed.
                    name = f"stdin-{uuid.uuid4().hex[:12]}"
                    print("lastseen import: reading standard input without --source: "
                          "a second import would store it again", file=sys.stderr)  # fmt: skip
                records = read_records(
                    opened.stream,
                    name=path,
                    fmt=guess_format(path) if fmt == "auto" else fmt,
                    column=column,
                    ids_per_callback=ids_per_callback,
                    max_ids=settings.max_ids,
                )

                def rejected(reject: Reject, path: str = path) -> None:
                    if rejected_to is not None:
                        # The text last: it is the only column that may hold a tab.
                        print(f"{path}:{reject.line}\t{reject.reason}\t{_one_line(reject.detail)}"
                              f"\t{reject.text}", file=rejected_to)  # fmt: skip
                    shown = sum(summary.rejected.values())
                    if shown <= SHOWN_REJECTS:
                        why = f" ({_one_line(reject.detail)})" if reject.detail else ""
                        print(f"lastseen import: {path}:{reject.line}: skipped, {reject.reason}"
                              f"{why}", file=sys.stderr)  # fmt: skip
                    if shown == SHOWN_REJECTS + 1 and rejected_to is None:
                        print("lastseen import: more records skipped; --rejects FILE lists "
                              "them all", file=sys.stderr)  # fmt: skip

                with progress.file(path, opened, summary) as update:
                    try:
                        await import_records(
                            db,
                            records,
                            name,
                            chunk=chunk,
                            summary=summary,
                            on_reject=rejected,
                            on_chunk=update,
                        )
                    except (OSError, EOFError) as exc:
                        # A file that cannot be read to its end (a corrupt or cut gzip stream):
                        # what was stored stays, and a rerun resumes after it.
                        for line in summary.lines():
                            print(line)
                        raise ImportSourceError(f"{path}: cannot read on: {exc}") from None
                    finally:
                        opened.close()
    finally:
        if rejected_to is not None:
            rejected_to.close()
    for line in summary.lines():
        print(line)
    if summary.rejected and not allow_rejects:
        return 1
    return 0


def _one_line(text: str) -> str:
    return " ".join(text.split())
