"""What the results writer makes of the lookups' outcomes (pipeline/results.py), up to the
batches it hands the database; writing them is test_results.py's, on PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime

from lastseen.core.clock import ManualClock
from lastseen.core.model import DeadLetter, Expired, HeldCallback, Lookup
from lastseen.pipeline.results import ResultWriter
from lastseen.storage.arrays import ResultBatch
from lastseen.telemetry.metrics import Metrics

from .fakes import held, no_database, permanent, sample
from .virtual import run


async def writer(clock: ManualClock, metrics: Metrics, max_batch: int = 100) -> ResultWriter:
    async with no_database() as db:
        return ResultWriter(
            db,
            metrics,
            ttl=10.0,
            max_batch=max_batch,
            interval=0.01,
            on_done=lambda _: None,
            clock=clock,
        )


def at(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)


def rows(batch: ResultBatch) -> list[tuple[int, datetime, bool]]:
    return list(zip(batch.ids, batch.seen_at, batch.online, strict=True))


def test_a_callback_is_done_with_its_last_id_and_after_its_results(
    clock: ManualClock, metrics: Metrics
) -> None:
    """A callback with two ids: done only once both have an outcome, and the done mark goes in
    the batch with the results (never before them)."""
    now = clock.wall()
    callback = held(1, now, distinct=2)

    async def main() -> list[list[ResultBatch]]:
        results = await writer(clock, metrics)
        results.record(Lookup(2, [callback]), True)
        first = results.batches()
        results.record(Lookup(3, [callback]), False)
        return [first, results.batches()]

    first, second = run(clock, main())
    assert [(rows(b), b.completed) for b in first] == [([(2, at(now), True)], [])]
    assert [(rows(b), b.completed) for b in second] == [
        ([(2, at(now), True), (3, at(now), False)], [1])
    ]


def test_the_newest_callback_decides_and_offline_wins_a_tie(
    clock: ManualClock, metrics: Metrics
) -> None:
    """Lookups of one id finish in any order: the result kept is the one for the newest callback
    it served, whichever finished last; of two for the same receive time, offline."""
    now = clock.wall()
    older, newer, same = held(1, now - 5, distinct=2), held(2, now, distinct=3), held(3, now)

    async def main() -> list[ResultBatch]:
        results = await writer(clock, metrics)
        results.record(Lookup(7, [newer]), False)
        results.record(Lookup(7, [older]), True)  # finished last, but older
        results.record(Lookup(8, [older, newer]), True)  # the newest it served
        results.record(Lookup(9, [newer]), True)
        results.record(Lookup(9, [same]), False)
        return results.batches()

    (batch,) = run(clock, main())
    assert rows(batch) == [(7, at(now), False), (8, at(now), True), (9, at(now), False)]
    assert batch.completed == [1, 2, 3]


def test_failures_become_dead_letters_and_expiries_nothing(
    clock: ManualClock, metrics: Metrics
) -> None:
    """A permanent failure is a dead letter for each callback the lookup served, with its
    attempts; an expired id writes nothing but completes its callback, and is counted by the
    last failure's reason; a callback set aside dead-letters every id."""
    now = clock.wall()
    a, b, c, d = held(1, now), held(2, now), held(3, now), HeldCallback(4, at(now), now, 2, 2)
    failure = permanent(5)

    async def main() -> list[ResultBatch]:
        results = await writer(clock, metrics)
        results.record(Lookup(5, [a, b], attempts=2), failure)
        results.record(Lookup(6, [c], attempts=4), Expired("timeout"))
        results.set_aside(d, [8, 9], "poison", "claimed 4 times")
        return results.batches()

    (batch,) = run(clock, main())
    assert rows(batch) == []
    assert batch.dead_letters == [
        DeadLetter(1, 5, at(now), "http_4xx", "scripted", 2),
        DeadLetter(2, 5, at(now), "http_4xx", "scripted", 2),
        DeadLetter(4, 8, at(now), "poison", "claimed 4 times", 0),
        DeadLetter(4, 9, at(now), "poison", "claimed 4 times", 0),
    ]
    assert batch.completed == [1, 2, 3, 4]
    assert sample(metrics, "lastseen_ids_expired_total", reason="timeout") == 1
    assert sample(metrics, "lastseen_dead_letters_total", reason="poison") == 2


def test_results_go_in_batches_of_max_batch_and_the_rest_with_the_last(
    clock: ManualClock, metrics: Metrics
) -> None:
    now = clock.wall()
    callbacks = [held(n, now) for n in range(5)]

    async def main() -> list[ResultBatch]:
        results = await writer(clock, metrics, max_batch=2)
        for n, callback in enumerate(callbacks):
            results.record(Lookup(10 + n, [callback]), True)
        results.record(Lookup(20, [held(9, now)]), permanent(20))
        return results.batches()

    batches = run(clock, main())
    assert [list(b.ids) for b in batches] == [[10, 11], [12, 13], [14]]
    assert [len(b.dead_letters) for b in batches] == [0, 0, 1]
    assert [list(b.completed) for b in batches] == [[], [], [0, 1, 2, 3, 4, 9]]
