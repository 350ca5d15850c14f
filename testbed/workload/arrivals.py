"""Open-loop arrival pacing: request i is released at ``start + arrival_s[i]``.

Every wait targets an absolute deadline on the monotonic clock, so one late wake-up never
shifts the requests after it (no chained sleeps). The lag of each release is measured;
the broker adds its own send time to get the injection lag (send time - scheduled time).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass

from testbed.workload.request import TraceRequest


@dataclass(frozen=True, slots=True)
class Arrival:
    request: TraceRequest
    scheduled_s: float  # absolute deadline on the clock (start + arrival_s)
    released_s: float  # clock reading when the request was handed out

    @property
    def lag_s(self) -> float:
        return self.released_s - self.scheduled_s


def send_times(requests: Iterable[TraceRequest], start_s: float) -> list[float]:
    """Absolute send time of each request: ``start_s + arrival_s``."""
    return [start_s + r.arrival_s for r in requests]


def injection_lag_s(scheduled_s: float, sent_s: float) -> float:
    """How late a request went out (>= 0 unless sent early)."""
    return sent_s - scheduled_s


async def arrivals(
    requests: Iterable[TraceRequest],
    start_monotonic: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    spin_s: float = 0.0,
) -> AsyncIterator[Arrival]:
    """Yield each request at its absolute time. Late requests are yielded at once (their lag
    shows it); requests are expected in arrival order, as workloads produce them.

    asyncio's selector rounds sleeps up to whole milliseconds; with ``spin_s`` > 0 the last
    ``spin_s`` seconds before each deadline are spent yielding to the loop (``sleep(0)``)
    instead, which takes the lag from ~1 ms to tens of microseconds at the cost of CPU.
    ``clock`` must be the clock ``start_monotonic`` was read from (the loop's is monotonic)."""
    for req in requests:
        due = start_monotonic + req.arrival_s
        delay = due - clock() - spin_s
        if delay > 0:
            await asyncio.sleep(delay)
        if spin_s > 0:
            while clock() < due:  # noqa: ASYNC110 - a deadline, not an event
                await asyncio.sleep(0)
        yield Arrival(req, due, clock())
