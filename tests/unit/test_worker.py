"""The worker's decisions (pipeline/worker.py, pipeline/leases.py): what it does with each
claimed callback, and how many distinct ids it may hold (the claim budget). Claiming itself, and
the leases, are the database's: test_failures.py and test_durability.py."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from lastseen.core.clock import ManualClock
from lastseen.core.model import Claimed, HeldCallback
from lastseen.pipeline.leases import HeldCallbacks, Leases
from lastseen.pipeline.worker import Worker
from lastseen.telemetry.metrics import Metrics

from .fakes import held, no_database, sample
from .virtual import run

TTL = 10.0


class Calls:
    """What the worker handed on, in order."""

    def __init__(self) -> None:
        self.looked_up: list[tuple[int, int]] = []  # (callback, id)
        self.done: list[int] = []
        self.set_aside: list[tuple[int, list[int], str]] = []
        self.finished = 0

    def look_up(self, callback: HeldCallback, object_id: int) -> None:
        self.looked_up.append((callback.id, object_id))

    def put_aside(self, callback: HeldCallback, ids: list[int], reason: str, _: str) -> None:
        self.set_aside.append((callback.id, ids, reason))


async def worker(clock: ManualClock, metrics: Metrics, calls: Calls, **settings: Any) -> Worker:
    """A worker on its own; its database is never reached by what these tests do."""
    options: dict[str, Any] = dict(
        max_active_ids=10_000, min_active_ids=100, max_claims=3, ttl=TTL, poll_interval=1.0
    )
    options.update(settings)
    held_callbacks = HeldCallbacks(metrics, on_finished=lambda: None)
    async with no_database() as db:
        leases = Leases(db, held_callbacks, "test-worker", lease=2.0, batch=10)
        return Worker(
            db,
            leases,
            held_callbacks,
            asyncio.Event(),
            look_up=calls.look_up,
            done=calls.done.append,
            set_aside=calls.put_aside,
            metrics=metrics,
            clock=clock,
            **options,
        )


def claimed(callback_id: int, received_ts: float, ids: list[int], claims: int = 1) -> Claimed:
    return Claimed(callback_id, datetime.fromtimestamp(received_ts, UTC), ids, claims)


def test_each_distinct_id_of_a_claimed_callback_is_looked_up_once(
    clock: ManualClock, metrics: Metrics
) -> None:
    calls = Calls()

    async def main() -> Worker:
        w = await worker(clock, metrics, calls)
        w.start(claimed(1, clock.wall(), [6, 7, 6, 6]))
        return w

    w = run(clock, main())
    assert calls.looked_up == [(1, 6), (1, 7)]
    assert (len(w.held), w.held.ids) == (1, 2)
    assert calls.done == []


def test_a_callback_older_than_the_ttl_is_done_without_a_lookup(
    clock: ManualClock, metrics: Metrics
) -> None:
    """Handed back after its TTL (a backlog, a crashed worker's lease), a callback could create
    no row: it is done at once and counted; one exactly TTL old is still looked up; one without
    ids is done, and not counted as expired."""
    calls = Calls()
    now = clock.wall()

    async def main() -> None:
        w = await worker(clock, metrics, calls)
        w.start(claimed(1, now - TTL - 0.001, [2, 4]))
        w.start(claimed(2, now - TTL, [6]))
        w.start(claimed(3, now, []))

    run(clock, main())
    assert calls.looked_up == [(2, 6)]
    assert calls.done == [1, 3]
    assert sample(metrics, "lastseen_callbacks_expired_total") == 1


def test_a_callback_claimed_too_often_is_set_aside(clock: ManualClock, metrics: Metrics) -> None:
    """Claimed more than max_claims times (each earlier claim ended by a crash), its ids are set
    aside as poison instead of being looked up; at max_claims it is still worked on."""
    calls = Calls()

    async def main() -> None:
        w = await worker(clock, metrics, calls, max_claims=3)
        w.start(claimed(1, clock.wall(), [2, 4, 2], claims=4))
        w.start(claimed(2, clock.wall(), [8], claims=3))

    run(clock, main())
    assert calls.set_aside == [(1, [2, 4], "poison")]
    assert calls.looked_up == [(2, 8)]


def test_a_callback_claimed_again_while_held_is_not_worked_on_twice(
    clock: ManualClock, metrics: Metrics
) -> None:
    """Our lease lapsed and we claimed it again: we are still on it."""
    calls = Calls()

    async def main() -> Worker:
        w = await worker(clock, metrics, calls)
        w.start(claimed(1, clock.wall(), [6]))
        w.start(claimed(1, clock.wall(), [6], claims=2))
        return w

    w = run(clock, main())
    assert calls.looked_up == [(1, 6)]
    assert (len(w.held), w.held.ids) == (1, 1)


def finish(w: Worker, first_id: int, ids: int) -> None:
    """``ids`` distinct ids finish, in callbacks of 10."""
    callbacks = [held(first_id + n, w.clock.wall(), distinct=10) for n in range(ids // 10)]
    for callback in callbacks:
        w.held.add(callback)
    w.held.finish([callback.id for callback in callbacks])


def test_the_claim_budget_is_what_the_worker_finishes_in_half_a_ttl(
    clock: ManualClock, metrics: Metrics
) -> None:
    """At least min_active_ids while nothing has finished; then the rate of finished ids,
    measured over a second or more and smoothed, times half the TTL; at most
    max_active_ids."""
    calls = Calls()

    async def main() -> list[int]:
        w = await worker(clock, metrics, calls, min_active_ids=100, max_active_ids=5_000)
        budgets = [w.budget()]
        finish(w, 0, 500)
        clock.advance(0.5)
        budgets.append(w.budget())  # under a second: not measured yet
        clock.advance(0.5)
        budgets.append(w.budget())  # 500 ids a second: 2,500 in half a TTL
        finish(w, 1000, 1000)
        clock.advance(1.0)
        budgets.append(w.budget())  # 0.7 * 500 + 0.3 * 1,000 a second
        finish(w, 2000, 9000)
        clock.advance(1.0)
        budgets.append(w.budget())  # 3,155 a second: capped
        for _ in range(30):
            clock.advance(1.0)
            budgets.append(w.budget())  # nothing finishes: down to the floor
        return budgets

    budgets = run(clock, main())
    assert budgets[:5] == [100, 100, 2_500, 3_250, 5_000]
    assert budgets[-1] == 100
    assert budgets[5:] == sorted(budgets[5:], reverse=True)


def test_the_held_callbacks_count_their_distinct_ids(clock: ManualClock, metrics: Metrics) -> None:
    """What the budget is compared with: ids held, ids finished, and the callbacks that finish
    make room (``on_finished``); an unknown id finishing changes nothing."""
    rooms = []
    callbacks = HeldCallbacks(metrics, on_finished=lambda: rooms.append(len(callbacks)))
    callbacks.add(held(1, clock.wall(), distinct=3))
    callbacks.add(held(2, clock.wall(), distinct=5))
    assert (len(callbacks), callbacks.ids, callbacks.finished_ids) == (2, 8, 0)
    callbacks.finish([1, 99])
    assert (len(callbacks), callbacks.ids, callbacks.finished_ids) == (1, 5, 3)
    assert rooms == [1]
    assert sample(metrics, "lastseen_callbacks_active") == 1
