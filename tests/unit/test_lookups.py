"""The lookups' decisions (pipeline/lookups.py): coalescing, retries and their backoff, letting go
of what aged past the TTL, outages and their end; on a manual clock, with a scripted upstream."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest

from lastseen.core.clock import ManualClock
from lastseen.core.errors import LookupFailed
from lastseen.core.model import Expired
from lastseen.pipeline.lookups import OUTAGE_FAILURES, OUTAGE_SILENCE, PROBES, Lookups
from lastseen.telemetry.metrics import Metrics

from .fakes import HOLD, Answer, Deliveries, FakeUpstream, Hold, held, permanent, sample, transient
from .virtual import run, until

EPS = 1e-6


def build(
    clock: ManualClock, metrics: Metrics, upstream: FakeUpstream, **settings: Any
) -> tuple[Lookups, Deliveries]:
    delivered = Deliveries(clock)
    options: dict[str, Any] = dict(
        max_in_flight=100, rate=0.0, ttl=60.0, retry_base=0.1, retry_max=1.0
    )
    options.update(settings)
    lookups = Lookups(upstream.fetch, metrics, delivered, clock=clock, **options)
    return lookups, delivered


def test_callbacks_received_before_the_request_share_it(
    clock: ManualClock, metrics: Metrics
) -> None:
    """Five callbacks naming one id, all received before its request went out (a backlog
    claimed together), cost one request, whose answer serves them all."""
    upstream = FakeUpstream(clock)
    lookups, delivered = build(clock, metrics, upstream)
    t0 = clock.wall()

    async def main() -> None:
        for n in range(5):
            lookups.add(held(n, t0 - n), 4)
        await asyncio.sleep(1)

    run(clock, main())
    assert upstream.sent(4) == [t0]
    assert [(d.object_id, sorted(d.callbacks), d.outcome) for d in delivered] == [
        (4, [0, 1, 2, 3, 4], True)
    ]
    assert sample(metrics, "lastseen_lookups_coalesced_total") == 4


def test_a_callback_received_after_the_request_went_out_gets_one_of_its_own(
    clock: ManualClock, metrics: Metrics
) -> None:
    """A callback received while its id's request is in flight cannot use that answer: a second
    request goes out while the first is still in flight; a callback received before that second
    request, but claimed later, joins it."""
    upstream = FakeUpstream(clock, latency=0.05)
    lookups, delivered = build(clock, metrics, upstream)
    t0 = clock.wall()

    async def main() -> None:
        lookups.add(held(1, t0), 8)
        await asyncio.sleep(0.01)
        lookups.add(held(2, clock.wall()), 8)
        lookups.add(held(3, t0 + 0.005), 8)
        await asyncio.sleep(1)

    run(clock, main())
    assert upstream.sent(8) == pytest.approx([t0, t0 + 0.01])
    assert upstream.most_in_flight == 2
    assert [d.callbacks for d in delivered] == [[1], [2, 3]]
    assert sample(metrics, "lastseen_lookups_coalesced_total") == 1


def test_a_lookup_waiting_for_its_rate_slot_takes_any_callback(
    clock: ManualClock, metrics: Metrics
) -> None:
    """At 10 requests a second, requests go out 0.1 s apart; until its request goes out, a
    lookup takes callbacks received at any time, and once it is out, a later one waits for a
    slot of its own."""
    upstream = FakeUpstream(clock, latency=0.01)
    lookups, delivered = build(clock, metrics, upstream, rate=10.0)
    t0 = clock.wall()

    async def main() -> None:
        for object_id in (1, 2, 3):
            lookups.add(held(object_id, t0), object_id)
        await asyncio.sleep(0.15)
        lookups.add(held(4, clock.wall()), 3)  # 3 is not sent yet: joins
        lookups.add(held(5, clock.wall()), 2)  # 2 went out at 0.1: a request of its own
        await asyncio.sleep(1)

    run(clock, main())
    assert upstream.sent(1) == pytest.approx([t0])
    assert upstream.sent(2) == pytest.approx([t0 + 0.1, t0 + 0.3])
    assert upstream.sent(3) == pytest.approx([t0 + 0.2])
    assert sorted(d.callbacks for d in delivered.of(3)) == [[3, 4]]


def test_a_transient_failure_is_retried_after_a_growing_backoff_without_holding_a_slot(
    clock: ManualClock, metrics: Metrics
) -> None:
    """Each retry waits base * 2^(n-1) up to the cap, jittered into its upper half; meanwhile
    the only slot serves another id; the answer comes on the fifth attempt."""
    upstream = FakeUpstream(clock, latency=0.01)
    upstream.script[1] = [*[transient(1)] * 4, True]
    lookups, delivered = build(
        clock, metrics, upstream, max_in_flight=1, retry_base=0.1, retry_max=0.3
    )
    t0 = clock.wall()

    async def main() -> None:
        lookups.add(held(1, t0), 1)
        lookups.add(held(2, t0), 2)
        await asyncio.sleep(2)

    run(clock, main())
    sent = upstream.sent(1)
    assert upstream.sent(2) == pytest.approx([sent[0] + 0.01])  # the slot, as soon as 1 failed
    waits = [later - (earlier + 0.01) for earlier, later in itertools.pairwise(sent)]
    for wait, longest in zip(waits, [0.1, 0.2, 0.3, 0.3], strict=True):
        assert longest / 2 - EPS <= wait <= longest + EPS
    assert [(d.outcome, d.attempts) for d in delivered.of(1)] == [(True, 5)]
    assert sample(metrics, "lastseen_lookup_retries_total", reason="http_5xx") == 4


def test_a_permanent_failure_is_delivered_at_once(clock: ManualClock, metrics: Metrics) -> None:
    upstream = FakeUpstream(clock)
    failure = permanent(3)
    upstream.script[3] = [failure]
    lookups, delivered = build(clock, metrics, upstream)

    async def main() -> None:
        lookups.add(held(1, clock.wall()), 3)
        await asyncio.sleep(5)

    run(clock, main())
    assert len(upstream.sent(3)) == 1
    assert [(d.outcome, d.attempts) for d in delivered] == [(failure, 1)]
    assert sample(metrics, "lastseen_lookups_total", outcome="failed") == 1
    assert sample(metrics, "lastseen_lookup_retries_total", reason="http_4xx") == 0


def test_the_upstream_s_latency_counts_requests_that_reached_it(
    clock: ManualClock, metrics: Metrics
) -> None:
    """A refused connect takes microseconds and says nothing of the upstream: the latency
    histogram counts the answers (a 5xx too), not the connects that failed."""
    upstream = FakeUpstream(clock)
    upstream.script[3] = [transient(3, "connection"), transient(3, "connection"), True]
    upstream.script[5] = [transient(5, "http_5xx"), True]
    lookups, _ = build(clock, metrics, upstream)

    async def main() -> None:
        lookups.add(held(1, clock.wall()), 3)
        lookups.add(held(2, clock.wall()), 5)
        await asyncio.sleep(5)

    run(clock, main())
    assert (len(upstream.sent(3)), len(upstream.sent(5))) == (3, 2)
    assert sample(metrics, "lastseen_lookup_seconds_count") == 3  # 3's answer, 5's two


def test_an_attempt_that_crashes_is_retried(clock: ManualClock, metrics: Metrics) -> None:
    """A bug in sending must not strand the callbacks: it counts as a transient failure."""
    upstream = FakeUpstream(clock)
    calls = []

    def fetch(object_id: int, reply: Any) -> None:
        calls.append(object_id)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        upstream.fetch(object_id, reply)

    delivered = Deliveries(clock)
    lookups = Lookups(
        fetch,
        metrics,
        delivered,
        max_in_flight=4,
        rate=0,
        ttl=60,
        retry_base=0.1,
        retry_max=1,
        clock=clock,
    )

    async def main() -> None:
        lookups.add(held(1, clock.wall()), 2)
        await asyncio.sleep(1)

    run(clock, main())
    assert calls == [2, 2]
    assert [(d.outcome, d.attempts) for d in delivered] == [(True, 2)]
    assert sample(metrics, "lastseen_lookup_retries_total", reason="internal_error") == 1


def test_each_callback_is_retried_for_as_long_as_its_own_ttl(
    clock: ManualClock, metrics: Metrics
) -> None:
    """An id that always fails: the callback that started its lookup is let go as expired (with
    the last failure's reason) once older than the TTL; one that joined half a TTL later is
    retried half a TTL longer; then no request more."""
    upstream = FakeUpstream(clock, latency=0.0)
    upstream.default = lambda object_id: object_id == 0 or transient(object_id)
    lookups, delivered = build(clock, metrics, upstream, ttl=1.0, retry_base=0.1, retry_max=0.2)
    t0 = clock.wall()

    async def answering() -> None:
        # Another id keeps answering: the upstream works, and no outage holds this id.
        for n in itertools.count():
            lookups.add(held(1000 + n, clock.wall()), 0)
            await asyncio.sleep(0.25)

    async def main() -> None:
        other = asyncio.create_task(answering())
        lookups.add(held(1, t0), 5)
        await asyncio.sleep(0.5)  # the lookup is between attempts: it takes the second one
        lookups.add(held(2, clock.wall()), 5)
        await asyncio.sleep(5)
        assert not lookups.outage
        other.cancel()

    run(clock, main())
    first, second = delivered.of(5)
    sent = upstream.sent(5)
    # Let go by the first failure after its TTL, or by the retry after it, whichever comes
    # first; the first callback's retry still goes out, for the second.
    assert (first.callbacks, first.outcome) == ([1], Expired("http_5xx"))
    assert t0 + 1.0 <= first.at <= t0 + 1.2 + EPS
    assert first.at in sent
    assert (second.callbacks, second.outcome) == ([2], Expired("http_5xx"))
    assert t0 + 1.5 <= second.at <= t0 + 1.7 + EPS
    assert max(sent) <= second.at
    assert sample(metrics, "lastseen_lookups_total", outcome="expired") == 1


def test_lookups_that_waited_past_the_ttl_for_a_slot_cost_no_request(
    clock: ManualClock, metrics: Metrics
) -> None:
    """With the only slot taken for longer than the TTL, the lookups queued behind it are let
    go as expired when their turn comes, without a request; a fresh one behind them is sent."""
    upstream = FakeUpstream(clock)
    upstream.script[1] = [HOLD]
    lookups, delivered = build(clock, metrics, upstream, max_in_flight=1, ttl=1.0)
    t0 = clock.wall()

    async def main() -> None:
        for object_id in (1, 2, 3, 4):
            lookups.add(held(object_id, t0), object_id)
        await asyncio.sleep(1.5)
        lookups.add(held(6, clock.wall()), 6)
        upstream.release(1, False)
        await asyncio.sleep(1)

    run(clock, main())
    assert [object_id for object_id, _ in upstream.requests] == [1, 6]
    assert [(d.object_id, d.outcome) for d in delivered] == [
        (1, False),
        (2, Expired("")),
        (3, Expired("")),
        (4, Expired("")),
        (6, True),
    ]
    assert sample(metrics, "lastseen_lookups_total", outcome="expired") == 3


class Switchable:
    """An upstream's answers as one switch: down, every request fails; up, each id's answer."""

    def __init__(self, upstream: FakeUpstream) -> None:
        self.down = False
        self.hang_next = 0  # requests that hang, once the upstream is up again
        upstream.default = self.answer

    def answer(self, object_id: int) -> Answer | Hold:
        if self.down:
            return transient(object_id)
        if self.hang_next:
            self.hang_next -= 1
            return HOLD
        return True


IDS = range(20)


async def enter_outage(
    clock: ManualClock, lookups: Lookups, switch: Switchable, received: float
) -> float:
    """Answers once, then fails every lookup of ``IDS`` until the outage is declared; when."""
    for object_id in IDS:
        lookups.add(held(object_id, received), object_id)
    await asyncio.sleep(0.1)
    switch.down = True
    for object_id in IDS:
        lookups.add(held(100 + object_id, clock.wall()), object_id)
    await until(lambda: lookups.outage, within=5)
    return clock.wall()


def test_an_upstream_that_answers_nothing_is_an_outage_that_ends_with_its_first_answer(
    clock: ManualClock, metrics: Metrics
) -> None:
    """Many failures are not an outage until no success came for OUTAGE_SILENCE; then lookups
    are held (new ones too) and PROBES of them sent per retry interval, however long each id's
    backoff had grown, and the outage names the last failure's cause; the first success
    releases every held lookup at once."""
    upstream = FakeUpstream(clock, latency=0.01)
    switch = Switchable(upstream)
    lookups, delivered = build(clock, metrics, upstream, retry_base=0.1, retry_max=30.0)
    t0 = clock.wall()

    async def main() -> tuple[float, float]:
        began = await enter_outage(clock, lookups, switch, t0)
        assert sum(1 for _, at in upstream.requests if at < t0 + 1) >= 2 * OUTAGE_FAILURES
        assert sample(metrics, "lastseen_upstream_outage") == 1
        assert lookups.failure == "http_5xx: scripted"
        assert sample(metrics, "lastseen_upstream_failure", cause="http_5xx: scripted") == 1
        lookups.add(held(999, clock.wall()), 50)  # held, not sent
        assert upstream.sent(50) == []
        await asyncio.sleep(2)
        switch.down = False
        up = clock.wall()
        await until(lambda: not lookups.outage, within=5)
        await asyncio.sleep(0.05)
        return began, up

    began, up = run(clock, main())
    # The last success was at t0 + 0.01; the failures after it are far more than enough, but
    # the outage waits for the silence (and for the next failure after it: each id's backoff
    # has grown to at most 1.6 s by then).
    assert t0 + 0.01 + OUTAGE_SILENCE <= began <= t0 + 0.01 + OUTAGE_SILENCE + 1.6 + 0.02
    # Besides the probes, an id whose backoff was running when the outage began fails once
    # more before it is held.
    probed = [at for _, at in upstream.requests if began < at < up]
    assert 0 < len(probed) <= PROBES * (2 / 0.1 + 1) + len(IDS)
    assert all(probed.count(at) <= PROBES for at in probed)
    answered = {d.object_id: d.at for d in delivered if d.outcome is True and d.at > up}
    assert sorted(answered) == [*IDS, 50]
    assert max(answered.values()) <= up + 0.1 + 3 * upstream.latency + EPS
    assert sample(metrics, "lastseen_upstream_outage") == 0
    assert lookups.failure is None
    assert sample(metrics, "lastseen_upstream_failure", cause="http_5xx: scripted") == 0


def test_an_upstream_that_answers_some_ids_is_not_in_an_outage(
    clock: ManualClock, metrics: Metrics
) -> None:
    """Most ids fail for seconds, one keeps answering: each failing id keeps its own backoff,
    and nothing is held."""
    upstream = FakeUpstream(clock, latency=0.01)
    upstream.default = lambda object_id: True if object_id == 0 else transient(object_id)
    lookups, _ = build(clock, metrics, upstream, retry_base=0.05, retry_max=0.2)
    t0 = clock.wall()

    async def main() -> None:
        for object_id in range(1, 20):
            lookups.add(held(object_id, t0), object_id)
        for n in range(20):
            lookups.add(held(100 + n, clock.wall()), 0)
            await asyncio.sleep(0.25)
            assert not lookups.outage
        lookups.close()

    run(clock, main())
    assert len(upstream.sent(7)) >= 5 / 0.2 - 5
    assert sample(metrics, "lastseen_upstream_outage") == 0


def test_probes_that_hang_do_not_stall_the_recovery(clock: ManualClock, metrics: Metrics) -> None:
    """The upstream answers again, but the first round of probes hangs: the next round, a retry
    interval later, gets the answer that ends the outage."""
    upstream = FakeUpstream(clock, latency=0.01)
    switch = Switchable(upstream)
    lookups, _ = build(clock, metrics, upstream, retry_base=0.1, retry_max=30.0)

    async def main() -> float:
        await enter_outage(clock, lookups, switch, clock.wall())
        await asyncio.sleep(2)  # every id held: only probes go out
        switch.down = False
        switch.hang_next = PROBES
        up = clock.wall()
        await until(lambda: not lookups.outage, within=5)
        assert upstream.in_flight >= PROBES  # the hung ones, still hanging
        lookups.close()
        return clock.wall() - up

    # A round goes out within a retry interval and hangs; the next, one interval later, is
    # answered (0.01 s), and the test sees it within its 0.01 s poll.
    assert 0.1 + 0.01 <= run(clock, main()) <= 2 * 0.1 + 0.01 + 0.01 + EPS


def test_held_callbacks_that_age_past_the_ttl_are_let_go_without_a_request(
    clock: ManualClock, metrics: Metrics
) -> None:
    """An outage that outlasts the TTL: each held lookup is let go as expired once what it
    serves is older than the TTL, and then nothing is probed any more."""
    upstream = FakeUpstream(clock, latency=0.01)
    switch = Switchable(upstream)
    lookups, delivered = build(clock, metrics, upstream, ttl=3.0, retry_base=0.1, retry_max=30)
    t0 = clock.wall()

    async def main() -> None:
        await enter_outage(clock, lookups, switch, t0)
        await asyncio.sleep(10)

    run(clock, main())
    expired = [d for d in delivered if isinstance(d.outcome, Expired)]
    assert sorted(d.object_id for d in expired) == list(IDS)
    assert {d.outcome for d in expired} == {Expired("http_5xx")}
    assert all(t0 + 0.1 + 3.0 <= d.at <= t0 + 0.1 + 3.0 + 0.1 + 0.02 for d in expired)
    assert max(at for _, at in upstream.requests) <= max(d.at for d in expired)
    assert not any(isinstance(d.outcome, LookupFailed) for d in delivered)
