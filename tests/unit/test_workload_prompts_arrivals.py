"""Prompt synthesis and absolute-time arrival pacing."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from testbed.errors import WorkloadError
from testbed.workload import (
    TraceRequest,
    arrivals,
    injection_lag_s,
    send_times,
    synthesize_prompt_ids,
)


def test_exact_length_range_and_determinism() -> None:
    for n in (1, 7, 513, 2000):
        ids = synthesize_prompt_ids(n, 32064, seed=5, request_id=9, avoid_ids=[0, 1, 2, 32000])
        assert len(ids) == n and all(isinstance(i, int) for i in ids)
        assert all(0 <= i < 32064 and i not in (0, 1, 2, 32000) for i in ids)
        assert ids == synthesize_prompt_ids(
            n, 32064, seed=5, request_id=9, avoid_ids=[0, 1, 2, 32000]
        )
    assert synthesize_prompt_ids(50, 1000, 5, 1) != synthesize_prompt_ids(50, 1000, 5, 2)
    assert synthesize_prompt_ids(50, 1000, 5, 1) != synthesize_prompt_ids(50, 1000, 6, 1)


def test_avoid_mapping_is_uniform_over_allowed_ids() -> None:
    avoid = [0, 3, 4, 9]
    ids = np.array(synthesize_prompt_ids(50000, 10, 0, 0, avoid_ids=avoid))
    counts = np.bincount(ids, minlength=10)
    assert all(counts[a] == 0 for a in avoid)
    allowed = [i for i in range(10) if i not in avoid]
    assert counts[allowed].min() > 0.9 * 50000 / 6
    # out-of-range and duplicate avoid ids are harmless; nothing left is an error
    assert len(synthesize_prompt_ids(5, 3, 0, 0, avoid_ids=[1, 1, 99, -1])) == 5
    with pytest.raises(WorkloadError, match="no token id left"):
        synthesize_prompt_ids(5, 2, 0, 0, avoid_ids=[0, 1])
    with pytest.raises(WorkloadError):
        synthesize_prompt_ids(0, 10, 0, 0)


def test_shared_prefix_blocks() -> None:
    a = synthesize_prompt_ids(1100, 5000, 1, 0, prefix_hash_ids=[10, 11, 12], block_tokens=512)
    b = synthesize_prompt_ids(600, 5000, 1, 1, prefix_hash_ids=[10, 99], block_tokens=512)
    assert len(a) == 1100 and len(b) == 600
    assert a[:512] == b[:512] and a[512:600] != b[512:600]


def _reqs(times: list[float]) -> list[TraceRequest]:
    return [TraceRequest(i, t, 1, 1, i) for i, t in enumerate(times)]


def test_send_times_absolute() -> None:
    assert send_times(_reqs([0, 0.5, 0.5, 2]), 100.0) == [100.0, 100.5, 100.5, 102.0]
    assert injection_lag_s(100.0, 100.002) == pytest.approx(0.002)


async def test_arrivals_hit_absolute_times_without_drift() -> None:
    times = [0.0, 0.01, 0.01, 0.02, 0.05, 0.06]
    start = time.monotonic() + 0.01
    got = [a async for a in arrivals(_reqs(times), start)]
    assert [a.request.request_id for a in got] == list(range(6))
    for a, t in zip(got, times, strict=True):
        assert a.scheduled_s == start + t
        assert a.released_s >= a.scheduled_s - 1e-9  # never early
        assert a.lag_s < 0.05  # generous: CI machines are shared


async def test_arrivals_spin_never_early() -> None:
    times = [0.0, 0.002, 0.004, 0.004, 0.01]
    start = time.monotonic() + 0.005
    got = [a async for a in arrivals(_reqs(times), start, spin_s=0.001)]
    assert all(0 <= a.lag_s < 0.05 for a in got)
    assert [a.scheduled_s - start for a in got] == pytest.approx(times)


async def test_arrivals_late_consumer_does_not_shift_later_deadlines() -> None:
    fake = [10.0]

    def clock() -> float:
        return fake[0]

    out = []
    async for a in arrivals(_reqs([0.0, 1.0, 2.0]), 10.0, clock=clock):
        out.append(a)
        fake[0] = 12.5  # the consumer took 2.5 s on the first request
    assert [a.scheduled_s for a in out] == [10.0, 11.0, 12.0]
    assert [a.lag_s for a in out] == [0.0, 1.5, 0.5]


async def test_arrivals_cancellable() -> None:
    async def consume() -> None:
        async for _ in arrivals(_reqs([0.0, 60.0]), time.monotonic()):
            pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
