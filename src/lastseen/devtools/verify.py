"""``lastseen verify``: checks a simulated run against its ground truth and the database.

The ground truth is what ``lastseen simulate --truth-dir`` recorded: every callback the producer
sent (and whether it was acknowledged, with its callback id) and every upstream answer. The
database is read in one REPEATABLE READ transaction, so every check sees one moment, ``now``.

1. Callbacks. Every acknowledged callback is stored with the ids that were sent (the same
   distinct ids), and is processed: ``done_at`` is set, which lastseen does only once each of its
   ids has a result or a dead letter. One older than the audit retention may have been pruned;
   it is counted, not checked.
2. Objects. For each id, ``L`` is the newest ``received_at`` of a processed callback naming it
   whose lookup of it was not dead-lettered (a dead letter leaves the row as it was). The id's
   status is what the upstream answered after ``L``: the lookup that decided it was sent after
   ``L``, so it is among those answers (this holds for every online rule; should they disagree,
   as ``flip`` can make them, either status is accepted). ``objects`` must hold exactly the ids
   that are online with ``now - L < ttl``, each with ``last_seen = L``. Each such id must also
   have an answer after ``L`` at all: otherwise it was never looked up.

Deletions. An id online after its newest callback ``L``, with ``now - L`` past the TTL edge and
no row, was deleted by the TTL: counted as "expired", each checked (its row is gone). An id
whose answers after ``L`` all say offline, and that some earlier answer said online (so it had
a row), was deleted by offline: counted as "went offline", each checked (no row). Asked to
``expect`` deletions (the demo's story does), a run that has none of a kind fails: it did not
exercise that branch. Dead letters retried (callbacks whose ``retry_of`` is set) are counted,
and those not processed are already ``not_processed``.

The TTL edge: the reaper deletes expired rows every ``reap_interval``, so a row may outlive its
TTL by that much. An id whose ``now - L`` lies within ``[ttl - edge, ttl + reap_interval + edge]``
is accepted with or without its row, and counted as "at the edge".

Assumptions: the simulator and lastseen share a clock (one host); the database holds this run's
callbacks only (earlier rows older than the TTL do no harm); and the service is still running
when this runs, since a stopped service's reaper no longer deletes what expires.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import asyncpg

from lastseen.config.settings import Settings
from lastseen.core.errors import LastseenError
from lastseen.devtools import database as devdb
from lastseen.devtools.simulate import truth
from lastseen.devtools.simulate.upstream import parse_online_rule
from lastseen.storage.database import Database, Q
from lastseen.storage.errors import translate

PROBLEMS = {
    "not_stored": "acknowledged callbacks that are not in the callbacks table",
    "ids_differ": "callbacks stored with other ids than were sent",
    "not_processed": "callbacks not processed (done_at is NULL)",
    "not_looked_up": "ids of processed callbacks with no upstream answer after the callback",
    "missing_row": "online ids seen within the TTL without a row in objects",
    "unexpected_row": "rows in objects that should not be there",
    "wrong_last_seen": "rows whose last_seen is not the receive time of their newest callback",
    "no_expired": "objects deleted by the TTL, and the run was expected to have some",
    "no_offline": "objects deleted for going offline, and the run was expected to have some",
}
EXPECTABLE = ("expired", "offline")

ONLINE = 1
OFFLINE = 2


class TruthMissing(LastseenError):
    """The truth directory lacks what a verification needs."""


def fingerprint(ids: list[int]) -> str:
    """The md5 of the distinct ids in order, as the query ``callback_fingerprints`` computes it
    from what is stored (PostgreSQL prints an array as ``{1,2,3}``): comparing these keeps a long
    run's ids out of memory."""
    text = "{" + ",".join(map(str, sorted(set(ids)))) + "}"
    return hashlib.md5(text.encode()).hexdigest()


@dataclasses.dataclass
class Report:
    """What a verification found; ``ok`` when nothing is wrong."""

    truth_dir: Path
    now: datetime | None = None
    ttl: float = 0.0
    sent: int = 0
    acknowledged: int = 0
    processed: int = 0
    pruned: int = 0
    stored: int = 0
    stored_unacknowledged: int = 0
    answers: int | None = None
    online_rule: str | None = None
    rows: int = 0
    expected_rows: int = 0
    edge: int = 0
    ambiguous: int = 0
    skipped_pending: int = 0
    expired: int = 0  # deleted by the TTL, checked
    went_offline: int = 0  # deleted for going offline, checked
    retried: int = 0  # callbacks made by retrying dead letters
    retried_done: int = 0
    expect: tuple[str, ...] = ()  # kinds of deletion the run must show
    dead_letters: dict[str, int] = dataclasses.field(default_factory=dict)
    counts: Counter[str] = dataclasses.field(default_factory=Counter)
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    max_examples: int = 5

    def problem(self, kind: str, example: str) -> None:
        self.counts[kind] += 1
        listed = self.examples.setdefault(kind, [])
        if len(listed) < self.max_examples:
            listed.append(example)

    @property
    def ok(self) -> bool:
        return not self.counts

    @property
    def all_processed(self) -> bool:
        return not (self.counts["not_stored"] or self.counts["not_processed"])

    def lines(self) -> list[str]:
        verdict = "PASS" if self.ok else f"FAIL: {sum(self.counts.values())} discrepancies"
        answers = (
            f"{self.answers} upstream answers"
            if self.answers is not None
            else f"no upstream answers; online rule assumed: {self.online_rule}"
        )
        lines = [
            f"lastseen verify: {verdict}",
            f"  ground truth: {self.truth_dir} ({self.sent} callbacks sent, "
            f"{self.acknowledged} acknowledged; {answers})",
        ]
        callbacks = f"  callbacks: {self.stored} stored, {self.processed} processed"
        if self.pruned:
            callbacks += f"; {self.pruned} acknowledged ones pruned (older than audit retention)"
        if self.retried:
            callbacks += f"; {self.retried} made by retrying dead letters"
        # A retry's callback was never sent by the producer: it is no mystery.
        unacknowledged = self.stored_unacknowledged - self.retried
        if unacknowledged > 0:
            callbacks += (
                f"; {unacknowledged} stored but not acknowledged to this producer "
                "(a reply after its timeout, or another producer)"
            )
        lines.append(callbacks)
        objects = (
            f"  objects: {self.rows} rows; {self.expected_rows} ids must have one (online, seen "
            f"within TTL {self.ttl:g} s)"
        )
        if self.edge:
            objects += f", {self.edge} at the TTL edge may"
        if self.ambiguous:
            objects += f"; {self.ambiguous} whose status changed during their last lookup"
        if self.skipped_pending:
            objects += f"; {self.skipped_pending} not checked (named by a pending callback)"
        lines.append(objects)
        lines.append(
            f"  deletions: expired: {self.expired} checked (online, last seen over the TTL "
            f"ago, no row); offline: {self.went_offline} checked (online before, offline after "
            "their newest callback, no row)"
            + (f"; required: {' and '.join(self.expect)}" if self.expect else "")
        )
        letters = ", ".join(f"{reason}: {n}" for reason, n in self.dead_letters.items())
        total = sum(self.dead_letters.values())
        lines.append(
            f"  dead letters: {total}"
            + (f" ({letters})" if letters else "")
            + (
                f"; {self.retried} retried, {self.retried_done} of them processed"
                if self.retried
                else ""
            )
        )
        checked = self.acknowledged - self.pruned
        if self.all_processed:
            lines.append(f"  all {checked} acknowledged callbacks were processed")
        else:
            missing = self.counts["not_stored"]
            lines.append(
                f"  NOT all acknowledged callbacks were processed: {missing} not stored, "
                f"{self.counts['not_processed']} stored callbacks pending"
            )
        for kind, count in self.counts.items():
            lines.append(f"  {kind}: {count} {PROBLEMS[kind]}, e.g.")
            lines.extend(f"    {example}" for example in self.examples[kind])
        return lines


@dataclasses.dataclass(frozen=True)
class _Acked:
    sent_at: float
    fingerprint: str


def _read_truth(report: Report, truth_dir: Path) -> dict[int, _Acked]:
    acked: dict[int, _Acked] = {}
    for sent in truth.read_callbacks(truth_dir):
        report.sent += 1
        if sent.acknowledged and sent.callback_id is not None:
            report.acknowledged += 1
            acked[sent.callback_id] = _Acked(sent.sent_at, fingerprint(sent.ids))
    return acked


async def verify(
    db: Database,
    truth_dir: Path,
    *,
    ttl: float,
    reap_interval: float,
    audit_retention: float,
    edge: float = 0.25,
    online_rule: str | None = None,
    seed: int = 0,
    max_examples: int = 5,
    expect: tuple[str, ...] = (),
) -> Report:
    """Checks the run recorded in ``truth_dir`` against the database behind ``db``.

    ``online_rule`` stands in for the upstream's answers when none were recorded (the run used
    another upstream); only rules that do not change over time can. ``expect`` names the kinds
    of deletion (``EXPECTABLE``) the run must have shown.
    """
    report = Report(truth_dir, ttl=ttl, max_examples=max_examples, expect=expect)
    if not (truth_dir / truth.CALLBACKS).exists():
        raise TruthMissing(f"no {truth.CALLBACKS} in {truth_dir}: was the producer run?")
    has_answers = (truth_dir / truth.ANSWERS).exists()
    rule: Callable[[int, float], bool] | None = None
    if not has_answers:
        if online_rule is None or online_rule.startswith("flip"):
            raise TruthMissing(
                f"no {truth.ANSWERS} in {truth_dir} (was the upstream simulated?): pass "
                "--online even or --online random:P to say which objects are online"
            )
        rule = parse_online_rule(online_rule, seed)
        report.online_rule = online_rule
    acked = _read_truth(report, truth_dir)
    try:
        async with (
            db.pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            now: datetime = await conn.fetchval(Q["now"])
            report.now = now
            pruned_before = now - timedelta(seconds=audit_retention)
            await _check_callbacks(report, conn, acked, pruned_before)
            newest = {r[0]: r[1] for r in await conn.fetch(Q["newest_processed_receipts"])}
            pending = {r[0] for r in await conn.fetch(Q["pending_ids"])}
            rows = {r[0]: r[1] for r in await conn.fetch(Q["all_objects"])}
            report.dead_letters = {r[0]: r[1] for r in await conn.fetch(Q["count_dead_letters"])}
            report.retried, report.retried_done = await conn.fetchrow(devdb.Q["count_retries"])
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
        raise translate("verify", exc) from exc
    ever_online: set[int] = set()
    if rule is not None:
        status = {i: ONLINE if rule(i, 0.0) else OFFLINE for i in newest}
    else:
        status = _statuses(report, truth_dir, newest, ever_online)
    _check_objects(
        report, newest, status, pending, rows, now, ttl, reap_interval, edge, ever_online
    )
    if "expired" in expect and not report.expired:
        report.problem("no_expired", "no object was deleted by the TTL")
    if "offline" in expect and not report.went_offline:
        report.problem("no_offline", "no object was deleted for going offline")
    return report


async def _check_callbacks(
    report: Report, conn: asyncpg.Connection, acked: dict[int, _Acked], pruned_before: datetime
) -> None:
    unmatched = dict(acked)
    async for callback_id, received_at, done, digest in conn.cursor(
        Q["callback_fingerprints"], prefetch=5000
    ):
        report.stored += 1
        sent = unmatched.pop(callback_id, None)
        if sent is None:
            report.stored_unacknowledged += 1
        elif digest != sent.fingerprint:
            report.problem("ids_differ", f"callback {callback_id}: stored ids are not those sent")
        if done:
            report.processed += 1
        else:
            whose = "acknowledged" if sent is not None else "not acknowledged to this producer"
            report.problem(
                "not_processed",
                f"callback {callback_id} ({whose}), received {received_at.isoformat()}",
            )
    for callback_id, sent in unmatched.items():
        if sent.sent_at < pruned_before.timestamp():
            report.pruned += 1
        else:
            report.problem("not_stored", f"callback {callback_id}, acknowledged, is not stored")


def _statuses(
    report: Report, truth_dir: Path, newest: dict[int, datetime], ever_online: set[int]
) -> dict[int, int]:
    """Per id, which statuses the upstream answered after its newest callback (bit flags);
    ``ever_online`` gets the ids it answered online to at any time."""
    after = {i: seen.timestamp() for i, seen in newest.items()}
    status: dict[int, int] = {}
    report.answers = 0
    for answer in truth.read_answers(truth_dir):
        report.answers += 1
        since = after.get(answer.object_id)
        if answer.kind == "ok" and answer.online:
            ever_online.add(answer.object_id)
        if answer.kind != "ok" or since is None or answer.at < since:
            continue
        flag = ONLINE if answer.online else OFFLINE
        status[answer.object_id] = status.get(answer.object_id, 0) | flag
    return status


def _check_objects(
    report: Report,
    newest: dict[int, datetime],
    status: dict[int, int],
    pending: set[int],
    rows: dict[int, datetime],
    now: datetime,
    ttl: float,
    reap_interval: float,
    edge: float,
    ever_online: set[int],
) -> None:
    report.rows = len(rows)
    early, late = ttl - edge, ttl + reap_interval + edge
    for object_id in sorted(newest.keys() | rows.keys()):
        if object_id in pending:
            report.skipped_pending += 1
            continue
        row = rows.get(object_id)
        seen = newest.get(object_id)
        if seen is None:
            assert row is not None
            report.problem(
                "unexpected_row",
                f"object {object_id}: row (last_seen {row.isoformat()}) but no processed "
                "callback names it",
            )
            continue
        age = (now - seen).total_seconds()
        found = status.get(object_id, 0)
        if not found:
            report.problem(
                "not_looked_up",
                f"object {object_id}: named by a callback received {seen.isoformat()} "
                "but no upstream answer came after it",
            )
            continue
        if found == ONLINE | OFFLINE:
            report.ambiguous += 1
            online: bool | None = None
        else:
            online = found == ONLINE
        at_edge = early <= age <= late
        if online and age < early:
            report.expected_rows += 1
        if online is not False and at_edge:
            report.edge += 1
        if row is None:
            if online and age < early:
                report.problem(
                    "missing_row",
                    f"object {object_id}: online, last seen {age:.3f} s ago "
                    f"({seen.isoformat()}), but no row",
                )
            elif online and age > late:
                report.expired += 1
            elif online is False and object_id in ever_online:
                report.went_offline += 1
            continue
        if online is False:
            report.problem(
                "unexpected_row",
                f"object {object_id}: the upstream said offline after {seen.isoformat()}",
            )
        elif age > late:
            report.problem(
                "unexpected_row",
                f"object {object_id}: expired, last seen {age:.3f} s ago with TTL {ttl:g} s",
            )
        elif row != seen:
            report.problem(
                "wrong_last_seen",
                f"object {object_id}: last_seen {row.isoformat()}, expected {seen.isoformat()}",
            )


async def run(
    settings: Settings,
    truth_dir: Path,
    *,
    edge: float,
    online_rule: str | None,
    seed: int,
    max_examples: int,
    expect: tuple[str, ...] = (),
) -> int:
    """``lastseen verify``: prints the report; 0 when it passes, 1 on any discrepancy."""
    from lastseen.storage.connect import database

    async with database(settings) as db:
        report = await verify(
            db,
            truth_dir,
            ttl=settings.ttl,
            reap_interval=settings.reap_interval,
            audit_retention=settings.audit_retention,
            edge=edge,
            online_rule=online_rule,
            seed=seed,
            max_examples=max_examples,
            expect=expect,
        )
    print("\n".join(report.lines()))
    return 0 if report.ok else 1
