"""The broker through failures (timelines): a request cut off by a crash resumes on another
replica from its prompt + the tokens generated so far; a node that answers again is probed and
re-admitted; a partitioned node (app level) is cut off and heals. Real echo stage servers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from testbed.broker.broker import Broker, BrokerConfig
from testbed.broker.echo import EchoExecutor, echo_stages, echo_token
from testbed.broker.gate import GatedTransport
from testbed.broker.http import HttpStageTransport
from testbed.broker.layout import Layout, WorkPredictor
from testbed.schedule import SCHEDULERS
from testbed.stage.errors import StageTimeoutError
from testbed.workload.request import TraceRequest
from tests.unit.test_broker import _check_consistent, _killing, _prompt, _ranges, _setup


def _broker(stages: Any, transport: Any = None, **cfg: Any) -> Broker:
    topo, cost, plan = _setup()
    layout = Layout.from_plan(plan, topo, stages.urls, cost)
    return Broker(
        layout,
        WorkPredictor(layout, cost),
        SCHEDULERS.create("round_robin", {}),
        transport or HttpStageTransport(stages.urls),
        _prompt,
        config=BrokerConfig(call_timeout_s=2.0, probe_interval_s=0.05, **cfg),
    )


@_killing
async def test_a_crash_mid_request_resumes_from_prompt_plus_tokens_so_far() -> None:
    _, _, plan = _setup()
    reqs = [TraceRequest(i, i * 0.01, 6, 12, source_row=i) for i in range(6)]
    async with echo_stages(_ranges(plan), num_blocks=4, compute_s=0.003) as stages:
        broker = _broker(stages)
        async with broker:
            run = asyncio.ensure_future(broker.run(reqs))
            while not any(  # noqa: ASYNC110 - polls the trackers until tokens came from edge-1
                len(t.tokens) >= 3 and t.route[:1] == ("edge-1",)
                for t in list(broker._trackers.values())
            ):
                await asyncio.sleep(0.002)
            await stages.stop("edge-1")
            res = await run
    _check_consistent(res, reqs)
    assert all(r.status == "completed" for r in res.records), [r.reason for r in res.records]
    resumed = [r for r in res.records if r.retries]
    assert resumed
    for rec in resumed:
        assert rec.route[0] == "edge-2"
        # the new route's first step is a prefill at the step where the old one stopped: after
        # the tokens the old route gave (none for a request cut before its first token)
        pre = [s for s in rec.spans if s.kind == "compute" and s.phase == "prefill"]
        again = min((s for s in pre if s.node == "edge-2"), key=lambda s: s.start_s)
        last = len(rec.route) - 1
        given = {
            s.step
            for s in rec.spans
            if s.kind == "compute" and s.stage == last and s.end_s <= again.start_s
        }
        assert again.step == len(given), (again, sorted(given))
        # and the tokens are the ones an uninterrupted run gives (positions carried on)
        assert len(rec.token_times_s) == rec.output_tokens
    # the broker waited for a request with 3 tokens on edge-1: it resumed mid-request
    assert any(
        s.step >= 3 and s.node == "edge-2" and s.phase == "prefill" and s.kind == "compute"
        for rec in resumed
        for s in rec.spans
    )
    assert broker.ledger.in_flight() == 0
    assert echo_token(7) != echo_token(8)  # the echo's tokens depend on the position


@_killing
async def test_a_node_that_answers_again_is_re_admitted() -> None:
    from testbed.stage.server import StageConfig, StageServer

    _, _, plan = _setup()
    reqs = [TraceRequest(i, i * 0.05, 6, 4, source_row=i) for i in range(60)]  # 3 s of arrivals
    async with echo_stages(_ranges(plan), num_blocks=4, compute_s=0.002) as stages:
        broker = _broker(stages)
        old = stages.servers["edge-1"]
        port = old.port
        a, b = _ranges(plan)["edge-1"]
        async with broker:
            run = asyncio.ensure_future(broker.run(reqs))
            while broker.ledger.book("edge-1").routed_total < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.002)
            await stages.stop("edge-1")
            while broker.ledger.book("edge-1").up:  # noqa: ASYNC110 - until the broker sees it
                await asyncio.sleep(0.002)
            routed_down = broker.ledger.book("edge-1").routed_total
            cfg = StageConfig(model_dir="echo", start=a, end=b, name="edge-1", port=port)
            srv = StageServer(cfg, executor=EchoExecutor(a, b, num_blocks=4, compute_s=0.002))
            await srv.start()  # restarted: same address, a new tensor port
            try:
                res = await run
            finally:
                await srv.aclose()
    assert all(r.status == "completed" for r in res.records), [r.reason for r in res.records]
    ups = [e for e in res.node_events if e.node == "edge-1"]
    assert [e.up for e in ups] == [False, True]
    assert broker.ledger.book("edge-1").routed_total > routed_down  # back in rotation
    _check_consistent(res, reqs)


async def test_a_partitioned_node_gets_no_answer_until_healed() -> None:
    _, _, plan = _setup()
    cut = {"fog-1"}
    async with echo_stages(_ranges(plan), num_blocks=4) as stages:
        gated = GatedTransport(HttpStageTransport(stages.urls), lambda n: n in cut)
        await gated.start()
        try:
            assert not await gated.health("fog-1", timeout_s=0.1)
            assert await gated.health("edge-1", timeout_s=2.0)
            with pytest.raises(StageTimeoutError, match="partitioned"):
                await gated.release("fog-1", "x", timeout_s=0.1)

            async def heal() -> None:
                await asyncio.sleep(0.1)
                cut.clear()

            healer = asyncio.ensure_future(heal())
            assert await gated.health("fog-1", timeout_s=2.0)  # held, then delivered
            await healer
        finally:
            await gated.aclose()


async def test_with_every_replica_of_a_stage_cut_off_requests_fail_with_a_reason() -> None:
    _, _, plan = _setup()
    reqs = [TraceRequest(i, i * 0.01, 6, 4, source_row=i) for i in range(5)]
    cut: set[str] = set()
    async with echo_stages(_ranges(plan), num_blocks=4, compute_s=0.002) as stages:
        gated = GatedTransport(HttpStageTransport(stages.urls), lambda n: n in cut)
        broker = _broker(stages, gated)
        broker.config = BrokerConfig(call_timeout_s=0.3, probe_interval_s=0.05)
        async with broker:
            cut.add("fog-1")  # the only fog replica
            res = await broker.run(reqs)
    assert len(res.records) == 5
    assert all(r.status == "failed" and r.reason for r in res.records)
    assert any("fog-1" in (r.reason or "") for r in res.records)
