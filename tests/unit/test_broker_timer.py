"""The broker's arrival timer (timerfd): wakes at the arrival, never before, without spinning."""

from __future__ import annotations

import asyncio
import sys
import time

import pytest

from testbed.broker.timer import arrival_timer

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="timerfd is Linux's")


@linux
def test_wakes_at_the_due_time_never_before_and_sleeps_meanwhile() -> None:
    async def go() -> tuple[list[float], float]:
        timer = arrival_timer(time.monotonic)
        assert timer is not None
        late = []
        cpu0 = time.process_time()
        try:
            for _ in range(20):
                due = time.monotonic() + 0.01
                await timer.wait_until(due)
                late.append(time.monotonic() - due)
        finally:
            timer.close()
        return late, time.process_time() - cpu0

    late, cpu_s = asyncio.run(go())
    assert min(late) >= 0.0
    assert sorted(late)[10] < 0.005  # median: well under asyncio's millisecond rounding + load
    # 0.2 s of waiting: a spinning wait would burn most of it; a kernel timer almost none
    assert cpu_s < 0.1


@linux
def test_a_past_due_time_returns_at_once_and_the_timer_is_reusable() -> None:
    async def go() -> None:
        timer = arrival_timer(time.monotonic)
        assert timer is not None
        try:
            t0 = time.monotonic()
            await timer.wait_until(t0 - 1.0)
            await timer.wait_until(time.monotonic() + 0.002)
            await timer.wait_until(time.monotonic() + 0.002)
            assert time.monotonic() - t0 < 1.0
        finally:
            timer.close()

    asyncio.run(go())


def test_no_kernel_timer_for_another_clock() -> None:
    async def go() -> None:
        assert arrival_timer(lambda: 0.0) is None

    asyncio.run(go())
