"""The broker against in-process echo stages: the real stage server and wire format with a
model-free executor (no mocks of the broker, the client or the server)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from testbed.broker.broker import Broker, BrokerConfig, BrokerResult
from testbed.broker.echo import EOS_ID, EchoStages, echo_stages, echo_token
from testbed.broker.http import HttpStageTransport
from testbed.broker.layout import Layout, WorkPredictor
from testbed.cost.model import CostModel
from testbed.cost.planner import make_plan
from testbed.partition import PARTITIONERS
from testbed.schedule import SCHEDULERS
from testbed.spec.model_profile import load_model_profile
from testbed.spec.plan import RequestShape
from testbed.spec.topology import load_topology
from testbed.workload.prompts import synthesize_prompt_ids
from testbed.workload.request import TraceRequest

REPO = Path(__file__).resolve().parents[2]
VOCAB = 512


def _setup() -> tuple[Any, CostModel, Any]:
    topo = load_topology(REPO / "topologies" / "tiny.yaml")
    cost = CostModel(load_model_profile("tiny", dtype="float32"))
    plan = make_plan(
        topo,
        cost,
        PARTITIONERS.create("bsdp", {}),
        RequestShape(prompt_tokens=128, output_tokens=16, concurrency=8),
    )
    return topo, cost, plan


def _ranges(plan: Any) -> dict[str, tuple[int, int]]:
    return {n: (st.start, st.end) for st in plan.active_stages() for n in st.nodes}


def _requests(n: int, gap_s: float = 0.004, prompt: int = 12, out: int = 5) -> list[TraceRequest]:
    return [
        TraceRequest(i, i * gap_s, prompt + i % 3, out + i % 4, source_row=i + 2) for i in range(n)
    ]


def _prompt(req: TraceRequest) -> list[int]:
    return synthesize_prompt_ids(req.prompt_tokens, VOCAB, 0, req.request_id, (0, 1, 2, 3))


async def _replay(
    stages: EchoStages,
    requests: Sequence[TraceRequest],
    scheduler: str = "round_robin",
    params: dict[str, Any] | None = None,
    config: BrokerConfig | None = None,
    prompt: Any = _prompt,
    during: Any = None,
) -> tuple[BrokerResult, Broker]:
    topo, cost, plan = _setup()
    layout = Layout.from_plan(plan, topo, stages.urls, cost)
    broker = Broker(
        layout,
        WorkPredictor(layout, cost),
        SCHEDULERS.create(scheduler, params or {}),
        HttpStageTransport(stages.urls),
        prompt,
        config=config or BrokerConfig(call_timeout_s=5.0),
    )
    async with broker:
        if during is None:
            return await broker.run(requests), broker
        run = asyncio.ensure_future(broker.run(requests))
        try:
            await during(broker)
            return await run, broker
        finally:
            if not run.done():
                run.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await run


def _check_consistent(res: BrokerResult, requests: Sequence[TraceRequest]) -> None:
    assert [r.request_id for r in res.records] == [q.request_id for q in requests]
    for rec, req in zip(res.records, requests, strict=True):
        assert rec.prompt_tokens == req.prompt_tokens and rec.output_tokens == req.output_tokens
        if rec.status != "completed":
            assert rec.reason
            continue
        assert len(rec.token_times_s) == req.output_tokens  # forced length, EOS ignored
        assert len(rec.itl_s) == req.output_tokens - 1
        assert 0 <= rec.ttft_s <= rec.e2e_s  # type: ignore[operator]
        assert rec.injection_lag_s is not None and rec.injection_lag_s >= 0
        assert list(rec.token_times_s) == sorted(rec.token_times_s)
        stages = len(rec.route)
        computes = [s for s in rec.spans if s.kind == "compute"]
        if rec.retries == 0:
            assert len(computes) == stages * req.output_tokens
            assert {s.node for s in computes} == set(rec.route)
        else:  # the abandoned attempts' work stays on record (it used the nodes)
            assert len(computes) >= stages * req.output_tokens
            assert set(rec.route) <= {s.node for s in computes}
        for s in rec.spans:
            assert s.start_s <= s.end_s + 1e-9
        assert rec.end_s == rec.token_times_s[-1]


async def test_replay_completes_every_request_and_releases_every_cache() -> None:
    _, _, plan = _setup()
    reqs = _requests(24)
    async with echo_stages(_ranges(plan), num_blocks=4) as stages:
        res, broker = await _replay(stages, reqs)
        assert all(r.status == "completed" for r in res.records)
        _check_consistent(res, reqs)
        # round robin alternates the two edge replicas; one node each on fog and cloud
        edges = [r.route[0] for r in res.records]
        assert edges.count("edge-1") == edges.count("edge-2") == 12
        # each node served exactly the steps of the requests routed through it
        for node in stages.servers:
            want = sum(r.output_tokens for r in res.records if node in r.route)
            assert stages.executor(node).steps == want, node
            assert stages.executor(node).request_ids == []  # every cache released
        for b in broker.ledger.books.values():
            assert (b.queue_len, b.queued_work_s, b.kv_used_bytes) == (0, 0.0, 0)
        assert res.routed == {"edge-1": 12, "edge-2": 12, "fog-1": 24, "cloud-1": 24}
        assert res.node_events == () and res.not_admitted == 0


async def test_tokens_are_fed_back_even_after_eos() -> None:
    """The echo's last stage returns EOS every third position; the broker keeps going, feeding
    back whatever came (a decode at the wrong position or a missing route would be a 409/404)."""
    _, _, plan = _setup()
    reqs = [TraceRequest(0, 0.0, 5, 9, source_row=2)]
    assert EOS_ID in [echo_token(5 + k) for k in range(1, 9)]
    async with echo_stages(_ranges(plan), num_blocks=4) as stages:
        res, _ = await _replay(stages, reqs)
    (rec,) = res.records
    assert rec.status == "completed" and len(rec.token_times_s) == 9


async def test_admission_follows_trace_times() -> None:
    _, _, plan = _setup()
    reqs = [TraceRequest(i, t, 8, 2, source_row=i) for i, t in enumerate((0.0, 0.15, 0.3))]
    async with echo_stages(_ranges(plan), num_blocks=4) as stages:
        res, _ = await _replay(stages, reqs)
    sends = [min(s.start_s for s in r.spans) for r in res.records]
    for sent, req, rec in zip(sends, reqs, res.records, strict=True):
        assert sent == pytest.approx(req.arrival_s, abs=0.03)
        assert rec.injection_lag_s < 0.03  # type: ignore[operator]


async def test_backpressure_caps_calls_per_node_and_records_queueing() -> None:
    _, _, plan = _setup()
    reqs = _requests(8, gap_s=0.0, prompt=4, out=2)
    cfg = BrokerConfig(call_timeout_s=5.0, max_inflight_per_node=1)
    async with echo_stages(_ranges(plan), num_blocks=4, compute_s=0.01) as stages:
        res, _ = await _replay(stages, reqs, config=cfg)
    assert all(r.status == "completed" for r in res.records)
    # with one call at a time per node, compute spans on a node never overlap
    for node in ("fog-1", "cloud-1"):
        spans = sorted(
            (s.start_s, s.end_s)
            for r in res.records
            for s in r.spans
            if s.kind == "compute" and s.node == node
        )
        assert all(b[0] >= a[1] - 1e-6 for a, b in itertools.pairwise(spans)), node
    assert sum(r.queueing_s for r in res.records) > 0.05


async def test_a_stage_rejection_fails_the_request_with_its_reason() -> None:
    _, _, plan = _setup()
    reqs = _requests(4)

    def bad_prompt(req: TraceRequest) -> list[int]:
        ids = _prompt(req)
        if req.request_id == 2:
            ids[0] = VOCAB + 7  # outside the vocabulary: the first stage answers 400
        return ids

    async with echo_stages(_ranges(plan), num_blocks=4) as stages:
        res, broker = await _replay(stages, reqs, prompt=bad_prompt)
        assert all(stages.executor(n).request_ids == [] for n in stages.servers)
    status = {r.request_id: (r.status, r.reason) for r in res.records}
    assert status[2][0] == "failed" and "HTTP 400" in (status[2][1] or "")
    assert all(status[i][0] == "completed" for i in (0, 1, 3))
    assert broker.ledger.in_flight() == 0
    assert res.node_events == ()  # a bad request is not a bad node


async def test_a_stage_answering_shutting_down_is_marked_down_by_its_code() -> None:
    """edge-1 stops admitting (503 shutting_down, as while it stops): the code, not the text,
    marks it down and its requests move to edge-2."""
    _, _, plan = _setup()
    reqs = _requests(20, gap_s=0.01, prompt=6, out=4)

    async def drain_edge1(broker: Broker) -> None:
        while broker.ledger.book("edge-1").routed_total < 3:  # noqa: ASYNC110 - polls a counter
            await asyncio.sleep(0.002)
        stages.servers["edge-1"].stop_admitting()

    async with echo_stages(_ranges(plan), num_blocks=4, compute_s=0.002) as stages:
        res, _ = await _replay(stages, reqs, during=drain_edge1)
    assert all(r.status == "completed" for r in res.records), [r.reason for r in res.records]
    assert [e.node for e in res.node_events] == ["edge-1"]
    assert "shutting down" in res.node_events[0].reason
    _check_consistent(res, reqs)


# Stopping a stage server mid-run (our stand-in for a crash) can leave sockets it had just
# accepted to the garbage collector (aiohttp's server shutdown), which warns; not the broker's.
_SERVER_KILL_WARNINGS = (
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
)


def _killing(fn: Any) -> Any:
    for m in _SERVER_KILL_WARNINGS:
        fn = m(fn)
    return fn


@_killing
async def test_a_dead_replica_is_marked_down_and_its_requests_rerouted() -> None:
    _, _, plan = _setup()
    reqs = _requests(30, gap_s=0.01, prompt=6, out=6)

    async def kill_edge1(broker: Broker) -> None:
        while broker.ledger.book("edge-1").routed_total < 3:  # noqa: ASYNC110 - polls a counter
            await asyncio.sleep(0.002)
        await stages.stop("edge-1")

    async with echo_stages(_ranges(plan), num_blocks=4, compute_s=0.002) as stages:
        res, broker = await _replay(stages, reqs, scheduler="round_robin", during=kill_edge1)
        assert all(stages.executor(n).request_ids == [] for n in ("edge-2", "fog-1", "cloud-1"))
    _check_consistent(res, reqs)
    assert all(r.status == "completed" for r in res.records), [r.reason for r in res.records]
    assert [e.node for e in res.node_events] == ["edge-1"]
    down_at = res.node_events[0].at_s
    assert sum(r.retries for r in res.records) >= 1
    for r in res.records:
        assert r.route[0] == "edge-2" or (r.retries == 0 and r.token_times_s[-1] <= down_at)
    assert broker.ledger.in_flight() == 0


@_killing
async def test_without_any_replica_left_requests_fail_with_a_reason_none_lost() -> None:
    _, _, plan = _setup()
    reqs = _requests(12, gap_s=0.01, prompt=6, out=4)

    async def kill_edges(broker: Broker) -> None:
        while broker.ledger.book("edge-2").routed_total < 2:  # noqa: ASYNC110 - polls a counter
            await asyncio.sleep(0.002)
        await stages.stop("edge-1")
        await stages.stop("edge-2")

    async with echo_stages(_ranges(plan), num_blocks=4, compute_s=0.002) as stages:
        res, _ = await _replay(stages, reqs, during=kill_edges)
    assert len(res.records) == 12
    failed = [r for r in res.records if r.status == "failed"]
    assert failed and all(r.reason for r in failed)
    assert any("no route" in (r.reason or "") for r in failed)
    _check_consistent(res, reqs)


async def test_arts_learns_capacity_from_reported_service_times() -> None:
    """edge-1 is 30x slower than edge-2 in truth, the profile says they are alike: the service
    times the stages report teach ARTS, and it sends most requests to edge-2. (The roofline
    predicts microseconds for the tiny model, so the capacity floor is lowered.)"""
    _, _, plan = _setup()
    reqs = _requests(24, gap_s=0.02, prompt=6, out=3)
    compute = {"edge-1": 0.03, "edge-2": 0.001, "fog-1": 0.0, "cloud-1": 0.0}
    async with echo_stages(_ranges(plan), num_blocks=4, compute_s=compute) as stages:
        res, broker = await _replay(
            stages, reqs, scheduler="arts", params={"alpha": 0.5, "min_capacity": 1e-6}
        )
    assert all(r.status == "completed" for r in res.records)
    c_hat = broker.scheduler._c_hat  # type: ignore[attr-defined]
    assert c_hat["edge-2"] > 2 * c_hat["edge-1"]
    edges = [r.route[0] for r in res.records[8:]]
    assert edges.count("edge-2") > edges.count("edge-1")


async def test_request_classes_travel_with_the_steps_and_reach_the_records() -> None:
    from testbed.metrics.summary import SLO, summarize
    from testbed.spec.classes import RequestClass, class_of

    classes = (
        RequestClass.model_validate(
            {"name": "chat", "share": 0.5, "slo": {"ttft": "5s", "tpot": "1s"}, "priority": 1}
        ),
        RequestClass.model_validate({"name": "batch", "share": 0.5, "slo": {"e2e": "30s"}}),
    )
    _, _, plan = _setup()
    reqs = _requests(12, gap_s=0.0, prompt=4, out=3)
    cfg = BrokerConfig(call_timeout_s=5.0, classes=classes, class_seed=3)
    async with echo_stages(_ranges(plan), num_blocks=4, compute_s=0.01) as stages:
        res, _ = await _replay(stages, reqs, scheduler="slo", config=cfg)
    assert all(r.status == "completed" for r in res.records)
    want = [class_of(r.request_id, classes, 3).name for r in reqs]  # type: ignore[union-attr]
    assert [r.slo_class for r in res.records] == want and set(want) == {"chat", "batch"}
    batches = [s.batch for r in res.records for s in r.spans if s.kind == "compute"]
    assert all(b is not None and b >= 1 for b in batches) and max(batches) > 1  # type: ignore[operator]
    slos = {c.name: SLO(c.slo.ttft_s, c.slo.tpot_s, c.slo.e2e_s) for c in classes}
    summary = summarize(res.records, classes=slos)
    assert summary.classes["chat"]["slo_attainment"] == 1.0
    assert summary.classes["batch"]["requests"] == want.count("batch")
