"""The unit layer's own clock and loop (core/clock.py, virtual.py): time passes only as the
test says, and a test that would wait forever fails at once."""

from __future__ import annotations

import asyncio
import time

import pytest

from lastseen.core.clock import ManualClock

from .virtual import Stuck, run


def test_an_hour_of_timers_passes_at_once_and_in_order(clock: ManualClock) -> None:
    fired: list[tuple[str, float]] = []
    start = clock.monotonic()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(3600, lambda: fired.append(("late", clock.monotonic() - start)))
        loop.call_later(5, lambda: fired.append(("early", clock.monotonic() - start)))
        await asyncio.sleep(3601)

    began = time.monotonic()
    run(clock, main())
    assert time.monotonic() - began < 1.0
    assert [name for name, _ in fired] == ["early", "late"]
    assert [at for _, at in fired] == pytest.approx([5, 3600])
    assert clock.monotonic() - start == pytest.approx(3601)


def test_waiting_for_what_nothing_will_do_fails_at_once(clock: ManualClock) -> None:
    async def main() -> None:
        await asyncio.get_running_loop().create_future()

    with pytest.raises(Stuck):
        run(clock, main())


def test_a_task_left_running_fails_the_test(clock: ManualClock) -> None:
    async def main() -> None:
        asyncio.get_running_loop().create_task(asyncio.sleep(10))

    with pytest.raises(AssertionError, match="outlived"):
        run(clock, main())


def test_the_manual_clock_moves_both_readings_and_never_back() -> None:
    clock = ManualClock(wall=100.0, monotonic=5.0)
    clock.advance(2.5)
    assert (clock.wall(), clock.monotonic()) == (102.5, 7.5)
    with pytest.raises(ValueError, match="back"):
        clock.advance(-1)
