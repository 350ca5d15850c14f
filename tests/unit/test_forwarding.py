"""Stage-to-stage forwarding (the ``forward`` transport): the route a step carries, how a failure
down the chain comes back, the hop timings the broker records, and the broker against in-process
echo stages (the real stage server, client and tensor port; no mocks)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from typing import Any

import pytest
import torch

from testbed.broker.broker import Broker, BrokerConfig, BrokerResult
from testbed.broker.chain import chain_spans
from testbed.broker.echo import EchoStages, echo_stages, echo_token
from testbed.broker.http import HttpStageTransport
from testbed.broker.layout import Layout, WorkPredictor
from testbed.broker.transport import StepResult
from testbed.errors import ConfigError
from testbed.model.contract import ExecutorInputError
from testbed.net.appshaper import AppShaper, hop_shape_for_link
from testbed.schedule import SCHEDULERS
from testbed.stage.client import StageClient
from testbed.stage.errors import (
    ErrorCode,
    StageProtocolError,
    StageRejectedError,
    StageTimeoutError,
    StageUnreachableError,
    marks_node_down,
)
from testbed.stage.forward import parse_forward, parse_options
from testbed.stage.route import ChainError, RouteHop, chain_error, parse_route, route_to_meta
from testbed.stage.wire import decode, encode
from testbed.workload.request import TraceRequest
from tests.unit.test_broker import _check_consistent, _killing, _prompt, _ranges, _requests, _setup

SHAPE = hop_shape_for_link(50e6, 0.004, 0.001, 0.5, apply_rate=True)


def _bad_loss_hop() -> dict[str, Any]:
    """A hop shape whose loss is not a percentage."""
    hop = route_to_meta([RouteHop("x", "http://h:1", SHAPE)])[0]["hop"]
    hop["forward"]["loss_pct"] = 150.0
    return hop  # type: ignore[no-any-return]


# -- the route a step carries -------------------------------------------------------------------
def test_a_route_survives_the_wire_and_parses_back() -> None:
    route = (
        RouteHop("fog-1", "http://127.0.0.1:8101", SHAPE, 7),
        RouteHop("cloud-1", "http://h:1"),
    )
    meta = {"request_id": "r", "kind": "prefill", "start_pos": 0, "timeout_s": 2.5}
    msg = decode(encode(meta | {"route": route_to_meta(route)}, {"input": torch.ones(1, 3, 8)}))
    req = parse_forward(msg)
    assert req.route == route and req.timeout_s == 2.5
    assert parse_forward(decode(encode(meta, {"input": torch.ones(1, 3, 8)}))).route == ()


@pytest.mark.parametrize(
    "bad",
    [
        "fog-1",
        [{"node": "fog-1"}],
        [{"node": "", "url": "http://h:1"}],
        [{"node": "fog-1", "url": "file:///etc/passwd"}],
        [{"node": "fog-1", "url": "http://h:1", "seed": True}],
        [{"node": "fog-1", "url": "http://h:1", "extra": 1}],
        [{"node": "fog-1", "url": "http://h:1", "hop": {"forward": {}}}],
        [{"node": "fog-1", "url": "http://h:1", "hop": _bad_loss_hop()}],
        [{"node": "n", "url": "http://h:1"}] * 17,
    ],
)
def test_a_malformed_route_is_bad_input(bad: Any) -> None:
    with pytest.raises(ExecutorInputError):
        parse_route(bad)


# -- a failure down the chain -------------------------------------------------------------------
@pytest.mark.parametrize(
    "cause",
    [
        StageUnreachableError("cloud-1", "connection refused"),
        StageTimeoutError("stage cloud-1: no answer within 3s", stage="cloud-1"),
        StageRejectedError("cloud-1", 503, ErrorCode.SHUTTING_DOWN, "stopping"),
        StageRejectedError("cloud-1", 404, ErrorCode.UNKNOWN_REQUEST, "no cache"),
        StageProtocolError("cloud-1", "response meta lacks 'length'"),
    ],
)
def test_a_failure_down_the_chain_comes_back_as_the_same_error(cause: Any) -> None:
    """What the stage before the failed one answers is decoded upstream into the error the
    failed node's own caller saw: same type, code and node, so the broker's rule holds."""
    body = ChainError(cause).body()
    back = chain_error(decode(encode(body)).meta)  # over the wire, as every hop relays it
    assert type(back) is type(cause)
    assert back.stage == "cloud-1"  # type: ignore[union-attr]
    assert marks_node_down(back) == marks_node_down(cause)
    if isinstance(cause, StageRejectedError):
        assert isinstance(back, StageRejectedError)
        assert (back.status, back.code) == (cause.status, cause.code)
    assert chain_error({"status": 400, "error": "x", "code": "bad_input"}) is None


# -- hop timings on the broker's clock ----------------------------------------------------------
def _hop(service: float, queue: float, link: float = 0.0, wall: float = 0.0, fwd: float = 0.0):  # type: ignore[no-untyped-def]
    return StepResult(None, service, queue, link, 100, 1, wall, fwd)


def test_chain_spans_tile_the_step_and_keep_each_hops_numbers() -> None:
    # hop 1 took 0.05 s wall at hop 0's side, of which its compute 0.01, queue 0.005 and its own
    # passing-on 0.02: 0.015 s of round trip, + 0.004 s in the sender's link hook
    hops = [_hop(0.01, 0.0), _hop(0.01, 0.005, 0.004, 0.05, 0.02), _hop(0.02, 0.0, 0.0, 0.02)]
    at = chain_spans(10.0, 10.1, hops)
    assert at[0].start_s == 10.0 and at[-1].compute_end_s == pytest.approx(10.1)
    for a, b in itertools.pairwise(at):
        assert b.start_s == a.compute_end_s
    assert [round(t.compute_s, 9) for t in at] == [0.01, 0.01, 0.02]
    assert at[1].queue_start_s - at[1].start_s == pytest.approx(0.019)
    assert at[1].compute_start_s - at[1].queue_start_s == pytest.approx(0.005)
    assert at[2].queue_start_s == at[2].start_s  # no round trip left over at hop 2
    # hop 0's transfer is what the others leave: 0.1 - 0.019 - 0.015 - 0.03 - 0.0 = 0.036
    assert at[0].queue_start_s - at[0].start_s == pytest.approx(0.036)
    # clock noise never puts a span past the answer
    squeezed = chain_spans(0.0, 0.01, hops)
    assert all(t.compute_end_s <= 0.01 for t in squeezed)


# -- the broker with echo stages ----------------------------------------------------------------
async def _replay(
    stages: EchoStages,
    requests: Sequence[TraceRequest],
    during: Any = None,
    http: HttpStageTransport | None = None,
    **config: Any,  # BrokerConfig fields (default: forward, 5 s call timeout)
) -> tuple[BrokerResult, Broker]:
    topo, cost, plan = _setup()
    layout = Layout.from_plan(plan, topo, stages.urls, cost)
    broker = Broker(
        layout,
        WorkPredictor(layout, cost),
        SCHEDULERS.create("round_robin", {}),
        http or HttpStageTransport(stages.urls),
        _prompt,
        config=BrokerConfig(**({"call_timeout_s": 5.0, "transport": "forward"} | config)),
    )
    async with broker:
        run = asyncio.ensure_future(broker.run(requests))
        if during is not None:
            await during(broker)
        return await run, broker


class _CountingReleases(HttpStageTransport):
    releases = 0

    async def release(self, node: str, request_id: str, *, timeout_s: float) -> None:
        self.releases += 1
        await super().release(node, request_id, timeout_s=timeout_s)


@pytest.mark.parametrize("transport", ["relay", "forward"])
async def test_the_last_step_frees_the_caches_without_release_messages(transport: str) -> None:
    _, _, plan = _setup()
    reqs = _requests(6)
    async with echo_stages(_ranges(plan), num_blocks=4) as stages:
        http = _CountingReleases(stages.urls)
        res, _ = await _replay(stages, reqs, http=http, transport=transport)
        assert all(r.status == "completed" for r in res.records)
        assert all(stages.executor(n).request_ids == [] for n in stages.servers)
    assert http.releases == 0
    with pytest.raises(ExecutorInputError):
        parse_options({"release": "yes"})


async def test_forwarding_completes_every_request_with_per_hop_records() -> None:
    _, _, plan = _setup()
    reqs = _requests(16)
    async with echo_stages(_ranges(plan), num_blocks=4, compute_s=0.002) as stages:
        res, broker = await _replay(stages, reqs)
        assert all(r.status == "completed" for r in res.records), [r.reason for r in res.records]
        _check_consistent(res, reqs)
        for node in stages.servers:
            want = sum(r.output_tokens for r in res.records if node in r.route)
            assert stages.executor(node).steps == want, node
            assert stages.executor(node).request_ids == []  # every cache released
        # the first stage passed every step on itself: the broker sent to edge nodes only
        assert stages.servers["fog-1"].forwarder.busy_retries == 0
        assert stages.servers["edge-1"].forwarder._clients  # it opened a client to fog-1
    for r in res.records:
        assert set(r.hop_transfer_s) == {f"client->{r.route[0]}", f"{r.route[0]}->fog-1",
                                         "fog-1->cloud-1"}  # fmt: skip
        assert set(r.stage_compute_s) == set(r.route)
        assert r.stage_compute_s["cloud-1"] >= 0.002 * r.output_tokens
    assert broker.ledger.in_flight() == 0


async def test_the_sending_stage_shapes_the_link_into_the_next_one() -> None:
    """The hop into cloud-1 is shaped by fog-1 (the broker never sends there): 2 x 15 ms per
    step, paid in the fog-1 -> cloud-1 transfer."""
    _, _, plan = _setup()
    reqs = _requests(3, gap_s=0.0, out=3)
    cloud = AppShaper(hop_shape_for_link(1e9, 0.015, 0.0, 0.0, apply_rate=True), name="cloud-1")
    async with echo_stages(_ranges(plan), num_blocks=4) as stages:
        http = HttpStageTransport(stages.urls, shapers={"cloud-1": cloud})
        res, _ = await _replay(stages, reqs, http=http)
        fog_shaper = stages.servers["fog-1"].forwarder._shapers["cloud-1"]
        assert fog_shaper.messages == sum(r.output_tokens for r in res.records)
    assert cloud.messages == 0  # the broker's own hook is not awaited for a later hop
    for r in res.records:
        assert r.status == "completed"
        assert r.hop_transfer_s["fog-1->cloud-1"] >= 0.030 * r.output_tokens
        assert r.hop_transfer_s[f"{r.route[0]}->fog-1"] < 0.030 * r.output_tokens


@_killing
async def test_a_stage_dying_mid_chain_is_the_node_marked_down() -> None:
    """fog-1, in the middle of every route, stops: the broker learns it from edge's answer and
    marks fog-1 (not the edge that reported it) down; with no other fog node the requests still
    running fail with the reason, none is lost."""
    _, _, plan = _setup()
    reqs = _requests(20, gap_s=0.01, prompt=6, out=6)

    async def kill_fog(broker: Broker) -> None:
        while broker.ledger.book("fog-1").routed_total < 4:  # noqa: ASYNC110 - polls a counter
            await asyncio.sleep(0.002)
        await stages.stop("fog-1")

    async with echo_stages(_ranges(plan), num_blocks=4, compute_s=0.003) as stages:
        res, broker = await _replay(stages, reqs, during=kill_fog, max_retries=1)
    assert [e.node for e in res.node_events] == ["fog-1"]
    assert len(res.records) == len(reqs)
    failed = [r for r in res.records if r.status == "failed"]
    assert failed and all(r.reason for r in failed)
    assert any("fog-1" in (r.reason or "") for r in failed)
    assert broker.ledger.in_flight() == 0
    _check_consistent(res, reqs)


async def test_a_last_stage_shutting_down_is_marked_down_by_its_code() -> None:
    _, _, plan = _setup()
    reqs = _requests(10, gap_s=0.01, prompt=6, out=4)

    async def drain_cloud(broker: Broker) -> None:
        while broker.ledger.book("cloud-1").routed_total < 3:  # noqa: ASYNC110 - polls a counter
            await asyncio.sleep(0.002)
        stages.servers["cloud-1"].stop_admitting()

    async with echo_stages(_ranges(plan), num_blocks=4, compute_s=0.002) as stages:
        res, _ = await _replay(stages, reqs, during=drain_cloud, max_retries=0)
    assert [e.node for e in res.node_events] == ["cloud-1"]
    assert "shutting down" in res.node_events[0].reason
    assert all(r.status == "completed" or "cloud-1" in (r.reason or "") for r in res.records)


@pytest.mark.parametrize("wire", ["http", "tcp"])
async def test_a_rejection_down_the_chain_names_the_stage_that_refused(wire: str) -> None:
    """fog-1 lost the request's cache: the decode through edge-1 fails with fog-1's 404
    ``unknown_request``, whichever wire reached edge-1; edge-1's own cache advanced."""
    _, _, plan = _setup()
    async with echo_stages(_ranges(plan), num_blocks=4) as stages:
        route = [RouteHop(n, stages.urls[n]) for n in ("fog-1", "cloud-1")]
        async with StageClient(stages.urls["edge-1"], transport=wire, name="edge-1") as edge:
            first = await edge.forward("r1", "prefill", 0, [5, 6, 7], route=route)
            assert first.token_id == echo_token(3) and len(first.hops) == 2
            assert [h["node"] for h in first.hops] == ["fog-1", "cloud-1"]
            async with StageClient(stages.urls["fog-1"], name="fog-1") as fog:
                assert await fog.release("r1")
            with pytest.raises(StageRejectedError) as info:
                await edge.forward("r1", "decode", 3, [first.token_id], route=route)
        assert info.value.stage == "fog-1" and info.value.code == ErrorCode.UNKNOWN_REQUEST
        assert not marks_node_down(info.value)
        assert stages.executor("edge-1").steps == 2


async def test_forward_needs_a_transport_that_can_route() -> None:
    class RelayOnly:
        async def start(self) -> None: ...

    _, cost, plan = _setup()
    topo = _setup()[0]
    layout = Layout.from_plan(plan, topo, {n: "http://x" for n in _ranges(plan)}, cost)
    broker = Broker(
        layout,
        WorkPredictor(layout, cost),
        SCHEDULERS.create("round_robin", {}),
        RelayOnly(),  # type: ignore[arg-type]
        _prompt,
        config=BrokerConfig(transport="forward"),
    )
    with pytest.raises(ConfigError, match="transport: relay"):
        await broker.start()
    with pytest.raises(ConfigError):
        BrokerConfig(transport="carrier-pigeon")  # type: ignore[arg-type]


@pytest.mark.parametrize("runtime", ["docker", "swarm"])  # docker: a run without link networks
def test_forward_is_refused_where_tiers_cannot_reach_each_other(runtime: str) -> None:
    from testbed.experiment.replay import broker_config
    from testbed.runtime.base import RunningTestbed

    def tb(name: str) -> RunningTestbed:
        return RunningTestbed("tb00000000", name, "app", "t.yaml", "tiny", "m", {})

    base = BrokerConfig()
    assert broker_config(base, "relay", None, tb(runtime)).transport == "relay"
    assert broker_config(base, "forward", None, tb("local")).transport == "forward"
    assert broker_config(base, "forward", "relay", tb(runtime)).transport == "relay"  # --transport
    with pytest.raises(ConfigError, match="transport: relay"):
        broker_config(base, "relay", "forward", tb(runtime))


def test_the_scenario_names_its_transport() -> None:
    from pydantic import ValidationError

    from testbed.spec.scenario import Scenario
    from tests.factories import scenario_dict

    assert Scenario.model_validate(scenario_dict()).transport == "relay"
    assert Scenario.model_validate(scenario_dict(transport="forward")).transport == "forward"
    with pytest.raises(ValidationError):
        Scenario.model_validate(scenario_dict(transport="pigeon"))


def test_each_forwarded_hop_gets_its_own_block_range():
    from testbed.stage.forward import StepOptions, parse_options

    opts = StepOptions(blocks=(0, 1), route_blocks=((1, 3), (3, 4)))
    meta = opts.to_meta()
    assert meta["blocks"] == [0, 1] and meta["route_blocks"] == [[1, 3], [3, 4]]
    assert parse_options(meta) == opts
    nxt = opts.passed_on()
    assert nxt.blocks == (1, 3) and nxt.route_blocks == ((3, 4),)
    assert nxt.passed_on().blocks == (3, 4) and nxt.passed_on().route_blocks == ()
    assert nxt.passed_on().passed_on().blocks is None  # past the route: names nothing
    assert StepOptions().passed_on() == StepOptions()
    for bad in ([[1, 2, 3]], [[1, True]], "x", [[0, 1]] * 17):
        with pytest.raises(ValueError, match="route_blocks"):
            parse_options({"route_blocks": bad})
