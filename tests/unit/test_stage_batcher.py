"""The step queue's batch formation (pure) and continuous batching through a stage server."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from testbed.errors import ConfigError
from testbed.stage.batcher import BatchLimits, Pending, form_batch
from testbed.stage.forward import ForwardRequest


def pending(rid, kind="decode", q=1, priority=0, deadline=math.inf, seq=0, done=0):
    loop = asyncio.new_event_loop()
    try:
        fut = loop.create_future()
    finally:
        loop.close()
    req = ForwardRequest(rid, kind, 0, False, torch.zeros((1, q), dtype=torch.long))
    return Pending(req, priority, deadline, seq, fut, done=done)


def test_batch_respects_rows_tokens_and_chunks():
    ps = [pending(f"d{i}", seq=i) for i in range(5)] + [pending("p", "prefill", 100, seq=9)]
    rows = form_batch(ps, BatchLimits(max_batch=16, max_batch_tokens=40, chunk_tokens=32), 0.0)
    assert [(p.req.request_id, take) for p, take in rows][-1] == ("p", 32)
    rows = form_batch(ps, BatchLimits(max_batch=16, max_batch_tokens=20, chunk_tokens=32), 0.0)
    assert rows[-1][1] == 15  # the prefill gets what the budget leaves
    rows = form_batch(ps, BatchLimits(max_batch=3), 0.0)
    assert [p.req.request_id for p, _ in rows] == ["d0", "d1", "d2"]
    assert form_batch(ps, BatchLimits(chunk_tokens=0), 0.0)[-1][1] == 100  # no chunking
    ps[-1].done = 90
    assert form_batch(ps, BatchLimits(chunk_tokens=32), 0.0)[-1][1] == 10  # the rest of the prompt


def test_batch_order_is_priority_then_deadline_then_arrival():
    ps = [
        pending("late", seq=0, deadline=9.0),
        pending("soon", seq=1, deadline=1.0),
        pending("vip", seq=2, priority=1),
        pending("fifo", seq=3),
    ]
    ps[3].running = True  # already in another batch
    rows = form_batch(ps, BatchLimits(), 0.0)
    assert [p.req.request_id for p, _ in rows] == ["vip", "soon", "late"]


def test_a_step_past_its_deadline_goes_after_those_still_on_time():
    """Plain earliest-deadline-first would batch the overdue decode first; under overload
    that makes the on-time steps miss too (the domino effect), so it waits for them. Priority
    still comes first, and among late steps the earliest deadline."""
    ps = [
        pending("overdue", seq=0, priority=1, deadline=4.0),
        pending("older_overdue", seq=1, priority=1, deadline=3.0),
        pending("on_time", seq=2, priority=1, deadline=6.0),
        pending("low", seq=3, deadline=5.5),
    ]
    rows = form_batch(ps, BatchLimits(max_batch=3), now_s=5.0)
    assert [p.req.request_id for p, _ in rows] == ["on_time", "older_overdue", "overdue"]
    rows = form_batch(ps, BatchLimits(), now_s=2.0)  # earlier: nothing late yet
    assert [p.req.request_id for p, _ in rows] == ["older_overdue", "overdue", "on_time", "low"]


def test_limits_are_checked():
    with pytest.raises(ConfigError, match="max_batch"):
        BatchLimits(max_batch=0)
    with pytest.raises(ConfigError, match="chunk_tokens"):
        BatchLimits(chunk_tokens=-1)


async def test_concurrent_requests_share_batched_steps_on_echo_stages():
    from testbed.broker.echo import echo_stages, echo_token
    from testbed.stage.pipeline import PipelineClient

    async with echo_stages({"a": (0, 2), "b": (2, 4)}, num_blocks=4, compute_s=0.02) as st:
        urls = [st.urls["a"], st.urls["b"]]
        async with PipelineClient(urls) as pipe:
            results = await asyncio.gather(*(pipe.generate([5, 6, 7, 8], 6) for _ in range(8)))
        for r in results:  # the echo's tokens (a function of the length) up to its EOS
            assert list(r.token_ids[4:]) == [echo_token(n) for n in range(4, 7)], r.token_ids
        sizes = st.executor("a").batches
        assert max(sizes) >= 4, sizes  # decodes of concurrent requests ran together
        assert sum(sizes) == st.executor("a").steps


async def test_the_broker_transport_reports_each_steps_batch_size():
    from testbed.broker.echo import echo_stages
    from testbed.broker.http import HttpStageTransport

    async with echo_stages({"a": (0, 4)}, num_blocks=4, compute_s=0.05) as st:
        transport = HttpStageTransport(st.urls)
        await transport.start()
        try:
            results = await asyncio.gather(
                *(
                    transport.forward("a", f"r{i}", "prefill", 0, [5, 6], timeout_s=10)
                    for i in range(6)
                )
            )
        finally:
            await transport.aclose()
    sizes = [r.batch_size for r in results]
    assert all(isinstance(b, int) and b >= 1 for b in sizes) and max(sizes) > 1, sizes
