"""The broker's pure parts: per-node ledger and the cost-model predictions it feeds schedulers."""

from __future__ import annotations

import pytest

from testbed.broker.layout import Layout, WorkPredictor
from testbed.cost.model import CostModel
from testbed.cost.planner import make_plan
from testbed.errors import ConfigError, TestbedError
from testbed.partition import PARTITIONERS
from testbed.schedule import SCHEDULERS, NoRouteError, RequestView
from testbed.schedule.ledger import Ledger
from testbed.spec.model_profile import load_model_profile
from testbed.spec.plan import RequestShape
from tests.factories import topology


def _ledger() -> Ledger:
    return Ledger((("a1", "a2"), ("b1",)), {"a1": 1000, "a2": 500, "b1": 2000})


def test_charge_progress_leave_return_exactly_to_zero() -> None:
    led = _ledger()
    led.charge(7, ("a1", "b1"), [0.3, 0.7], [100, 200])
    led.charge(8, ("a2", "b1"), [0.1, 0.2], [50, 60])
    snap = led.snapshot(1.5, (0.01,))
    a1, a2 = snap.stages[0]
    (b1,) = snap.stages[1]
    assert (a1.queue_len, a1.queued_work_s, a1.mem_free_bytes) == (1, 0.3, 900)
    assert (a2.queue_len, a2.mem_free_bytes) == (1, 450)
    assert b1.queue_len == 2 and b1.queued_work_s == pytest.approx(0.9)
    assert b1.mem_free_bytes == 2000 - 260 and snap.hop_s == (0.01,) and snap.now_s == 1.5
    # progress never takes more than the request has left
    assert led.progress(7, 1, 0.5) == pytest.approx(0.5)
    assert led.progress(7, 1, 0.5) == pytest.approx(0.2)
    assert led.book("b1").queued_work_s == pytest.approx(0.2)
    assert led.leave(7) == ("a1", "b1")
    assert led.leave(7) is None  # idempotent
    assert led.book("a1").queue_len == 0 and led.book("a1").queued_work_s == 0.0
    led.leave(8)
    for b in led.books.values():
        assert (b.queue_len, b.queued_work_s, b.kv_used_bytes) == (0, 0.0, 0)
    assert led.in_flight() == 0
    assert led.book("b1").routed_total == 2


def test_charge_rejects_bad_routes_and_double_charge() -> None:
    led = _ledger()
    with pytest.raises(TestbedError, match="not a replica of stage 0"):
        led.charge(1, ("b1", "b1"), [0, 0], [0, 0])
    with pytest.raises(TestbedError, match="2 stages"):
        led.charge(1, ("a1",), [0], [0])
    led.charge(1, ("a1", "b1"), [1, 1], [0, 0])
    with pytest.raises(TestbedError, match="already routed"):
        led.charge(1, ("a2", "b1"), [1, 1], [0, 0])
    assert led.book("a2").queue_len == 0  # a refused charge leaves nothing behind


def test_down_nodes_are_shown_down_and_schedulers_avoid_them() -> None:
    led = _ledger()
    assert led.mark_down("a1", "connection refused") is True
    assert led.mark_down("a1", "again") is False
    assert led.down_nodes() == {"a1": "again"}
    view = RequestView(0, 0.0, 8, 4, {"a1": 0.1, "a2": 5.0, "b1": 1.0}, (10, 10))
    for name in ("arts", "jsq", "round_robin", "heft", "fastest", "random"):
        sched = SCHEDULERS.create(name, {})
        assert sched.route(view, led.snapshot(0.0))[0] == "a2", name
    led.mark_down("a2", "timeout")
    with pytest.raises(NoRouteError):
        SCHEDULERS.create("arts", {}).route(view, led.snapshot(0.0))
    led.mark_up("a1")
    assert led.snapshot(0.0).node("a1").up


def test_arts_sees_the_ledgers_queued_work() -> None:
    """Decide with the ledger's snapshot: ARTS sends the next request to the less loaded replica."""
    led = _ledger()
    arts = SCHEDULERS.create("arts", {"alpha": 0.0})
    view = RequestView(0, 0.0, 8, 4, {"a1": 1.0, "a2": 1.2, "b1": 1.0}, (0, 0))
    first = arts.route(view, led.snapshot(0.0))
    assert first == ("a1", "b1")
    led.charge(0, first, [1.0, 1.0], [0, 0])
    assert arts.route(view, led.snapshot(0.0)) == ("a2", "b1")


# --- layout and predictions ----------------------------------------------------------------------


def _plan_layout(nodes_per_tier: int = 2):
    topo = topology(tiers=3, nodes_per_tier=nodes_per_tier, device="rtx-3090")
    cost = CostModel(load_model_profile("phi-3-mini", dtype="float16"))
    plan = make_plan(topo, cost, PARTITIONERS.create("bsdp", {}), RequestShape())
    urls = {
        n: f"http://127.0.0.1:{9000 + i}"
        for i, n in enumerate(n for st in plan.active_stages() for n in st.nodes)
    }
    return topo, cost, plan, Layout.from_plan(plan, topo, urls, cost)


def test_layout_follows_the_plan() -> None:
    _, cost, plan, layout = _plan_layout()
    assert [(s.start, s.end) for s in layout.stages] == [
        (s.start, s.end) for s in plan.active_stages()
    ]
    assert layout.stages[0].holds_embedding and layout.stages[-1].holds_head
    assert len(layout.hop_links) == len(layout.stages) - 1
    for st in layout.stages:
        for n in st.nodes:
            info = layout.nodes[n]
            assert info.stage == st.index
            weights = st.num_blocks * cost.profile.block_weight_bytes()
            assert info.kv_capacity_bytes <= info.device.mem - weights


def test_layout_rejects_gaps_and_mixed_replicas() -> None:
    topo, cost, plan, _ = _plan_layout()
    urls = {n.name: "http://x" for _, n in topo.nodes()}
    a, b = plan.cuts[1], plan.cuts[2]
    ranges = {"edge-0": (0, a), "edge-1": (0, a), "fog-0": (a, b), "fog-1": (a, b + 1)}
    with pytest.raises(ConfigError, match="different block ranges"):
        Layout.build(topo, ranges, urls, cost)
    ranges = {"edge-0": (0, a), "cloud-0": (b, plan.num_blocks)}
    with pytest.raises(ConfigError, match="contiguously"):
        Layout.build(topo, ranges, urls, cost)
    with pytest.raises(ConfigError, match="not in topology"):
        Layout.build(topo, {"nope": (0, plan.num_blocks)}, {"nope": "http://x"}, cost)


def test_predictions_split_into_prefill_and_decode_steps() -> None:
    _, cost, _, layout = _plan_layout()
    pred = WorkPredictor(layout, cost)
    p = pred.predict(256, 33)
    assert pred.predict(256, 33) is p  # cached
    for name in layout.node_names():
        assert p.work_s[name] > p.prefill_s[name] > 0
        assert p.work_s[name] == pytest.approx(p.prefill_s[name] + 32 * p.decode_step_s[name])
    assert p.kv_bytes == tuple(
        cost.request_kv_bytes(st.num_blocks, 256, 33) for st in layout.stages
    )
    assert len(p.hop_s) == 2 and all(h > 0 for h in p.hop_s)
    one = pred.predict(256, 1)
    assert all(one.decode_step_s[n] == 0.0 for n in layout.node_names())
    # longer prompts cost more everywhere
    big = pred.predict(1024, 33)
    assert all(big.prefill_s[n] > p.prefill_s[n] for n in layout.node_names())


def test_check_route_is_the_one_route_check() -> None:
    from testbed.schedule.ledger import InvalidRouteError

    led = _ledger()
    led.check_route(("a1", "b1"))
    with pytest.raises(InvalidRouteError, match="1 nodes for 2 stages"):
        led.check_route(("a1",))
    with pytest.raises(InvalidRouteError, match="'b1' is not a replica of stage 0"):
        led.check_route(("b1", "a1"))
    led.mark_down("a2", "timeout")
    with pytest.raises(InvalidRouteError, match="'a2' \\(stage 0\\) is down"):
        led.check_route(("a2", "b1"))
    led.check_route(("a2", "b1"), up=False)  # shape only


def test_leave_stage_releases_one_node_then_the_charge() -> None:
    led = _ledger()
    led.charge(3, ("a1", "b1"), [0.5, 0.7], [100, 200])
    led.leave_stage(3, 0)
    led.leave_stage(3, 0)  # idempotent
    assert (led.book("a1").queue_len, led.book("a1").kv_used_bytes) == (0, 0)
    assert led.book("b1").queue_len == 1 and led.is_charged(3)
    assert led.progress(3, 0, 1.0) == 0.0  # nothing left on a node it left
    led.leave_stage(3, 1)
    assert not led.is_charged(3) and led.book("b1").kv_used_bytes == 0


def test_per_stage_template_and_abstract_contract() -> None:
    from dataclasses import dataclass

    from testbed.schedule import ClusterSnapshot, NodeState, PerStageScheduler, Scheduler

    @dataclass
    class Last(PerStageScheduler):
        def choose(self, stage, live, request, snapshot):  # type: ignore[no-untyped-def]
            return live[-1]

    snap = ClusterSnapshot(
        0.0, ((NodeState("b", 0), NodeState("a", 0), NodeState("c", 0, up=False)),)
    )
    view = RequestView(0, 0.0, 1, 1, {})
    assert Last().route(view, snap) == ("b",)  # up replicas, in name order
    with pytest.raises(NoRouteError, match="stage 0"):
        Last().route(view, ClusterSnapshot(0.0, ((NodeState("a", 0, up=False),),)))
    with pytest.raises(TypeError):
        Scheduler()  # type: ignore[abstract]


def test_scheduler_state_is_not_a_parameter() -> None:
    from testbed.errors import ConfigError as _ConfigError

    listed = {d["name"]: {p["name"] for p in d["params"]} for d in SCHEDULERS.describe()}
    assert listed["round_robin"] == set() and listed["jsq"] == {"tie_break", "seed"}
    assert not any(name.startswith("_") for params in listed.values() for name in params)
    with pytest.raises(_ConfigError, match="has no parameter '_rng'"):
        SCHEDULERS.create("random", {"_rng": None})
