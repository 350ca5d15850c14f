"""The multi-SLO scheduler: predictions by hand, cheapest feasible route, least violation."""

from __future__ import annotations

import pytest

from testbed.schedule import SCHEDULERS, ClusterSnapshot, NodeState, RequestView
from testbed.schedule.slo import SloAware, predict


def req(work, out=10, **slo) -> RequestView:
    return RequestView(0, 0.0, 16, out, work, **slo)


def test_prediction_by_hand() -> None:
    a = NodeState("a", 0, queue_len=3, capacity=2.0, batch_speedup=2.0)
    p = predict(req({"a": 4.0}), (a,), hop_s=0.1)
    # work 4 / c 2 = 2 s over 10 steps: step 0.2; iteration (3 + 1) * 0.2 / 2 = 0.4
    assert p.tpot_s == pytest.approx(0.4 + 0.1)
    assert p.ttft_s == pytest.approx(0.4 + 0.4 + 0.1)
    assert p.e2e_s == pytest.approx(p.ttft_s + 9 * p.tpot_s)
    assert p.cost_s == pytest.approx(2.0)


def test_cheapest_route_that_meets_the_slo_else_least_violation() -> None:
    fast_busy = NodeState("fast", 0, queue_len=9, capacity=4.0)
    slow_idle = NodeState("slow", 0, queue_len=0, capacity=1.0)
    snap = ClusterSnapshot(0.0, ((fast_busy, slow_idle),))
    work = {"fast": 1.0, "slow": 1.0}
    # fast: step 0.025, iteration 0.25 -> TPOT 0.25; slow: step 0.1, iteration 0.1 -> TPOT 0.1
    assert SloAware().route(req(work, tpot_slo_s=0.3), snap) == ("fast",)  # both meet: cheaper
    assert SloAware().route(req(work, tpot_slo_s=0.2), snap) == ("slow",)  # only slow meets
    assert SloAware().route(req(work, tpot_slo_s=0.01), snap) == ("slow",)  # less violation
    assert SloAware().route(req(work), snap) == ("slow",)  # no targets: least E2E


def test_routes_combine_stages_and_fall_back_per_stage() -> None:
    s0 = (NodeState("a", 0), NodeState("b", 0, queue_len=5))
    s1 = (NodeState("c", 1, up=False), NodeState("d", 1))
    snap = ClusterSnapshot(0.0, (s0, s1), hop_s=(0.01,))
    work = {n: 1.0 for n in "abcd"}
    assert SloAware().route(req(work, ttft_slo_s=1.0), snap) == ("a", "d")
    assert SloAware(max_routes=1).route(req(work, ttft_slo_s=1.0), snap) == ("a", "d")
    assert "slo" in SCHEDULERS.names()


def test_speeds_are_learned_from_measured_steps() -> None:
    """Both nodes look equal in the profile; x measures 10x slower: the route moves to y, and
    with alpha 0 (no learning) it stays on the profile's tie-break."""
    from testbed.schedule.base import StageCompletion

    snap = ClusterSnapshot(0.0, ((NodeState("x", 0), NodeState("y", 0)),))
    r = req({"x": 1.0, "y": 1.0}, tpot_slo_s=0.5)
    learner, fixed = SloAware(), SloAware(alpha=0.0)
    assert learner.route(r, snap) == fixed.route(r, snap) == ("x",)  # tie: names
    for s in (learner, fixed):
        s.on_complete(StageCompletion("x", 0, predicted_work_s=0.1, service_s=1.0, now_s=1.0))
        s.on_complete(StageCompletion("y", 1, predicted_work_s=0.1, service_s=0.1, now_s=1.0))
    assert learner.capacity(snap.stages[0][0]) == pytest.approx(0.1)
    assert learner.route(r, snap) == ("y",)
    assert fixed.route(r, snap) == ("x",)
    with pytest.raises(ValueError, match="alpha"):
        SloAware(alpha=1.5)
