"""The multi-SLO scheduler: predictions by hand, the feasible route that finishes first, least
violation, and queues counted by priority."""

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


def test_route_that_meets_the_slo_and_finishes_first_else_least_violation() -> None:
    fast_busy = NodeState("fast", 0, queue_len=9, capacity=4.0)
    slow_idle = NodeState("slow", 0, queue_len=0, capacity=1.0)
    snap = ClusterSnapshot(0.0, ((fast_busy, slow_idle),))
    work = {"fast": 1.0, "slow": 1.0}
    # fast: step 0.025, iteration 0.25 -> TPOT 0.25; slow: step 0.1, iteration 0.1 -> TPOT 0.1
    # both meet: the one predicted to finish first, not the one cheaper in device time (that
    # piled every loose-SLO request onto the fastest replica and lengthened the run's tail)
    assert SloAware().route(req(work, tpot_slo_s=0.3), snap) == ("slow",)
    idle = ClusterSnapshot(0.0, ((NodeState("fast", 0, capacity=4.0), slow_idle),))
    assert SloAware().route(req(work, tpot_slo_s=0.3), idle) == ("fast",)  # idle: fast first
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


def test_lower_priority_requests_do_not_count_as_queue_ahead() -> None:
    """The stages batch by priority, so a chat request is not delayed by the batch requests
    queued on the fast replica: it is routed there, while a batch request (which waits behind
    all of them) and a scheduler that did not route them (no counts) pick the idle slow one."""
    from testbed.schedule.base import StageCompletion

    work = {"fast": 1.0, "slow": 1.0}
    only_fast = ClusterSnapshot(
        0.0, ((NodeState("fast", 0, capacity=4.0), NodeState("slow", 0, up=False)),)
    )
    s = SloAware()
    for i in range(8):  # 8 batch requests (priority 0) while the slow replica is down
        r = RequestView(100 + i, 0.0, 16, 10, work, priority=0, e2e_slo_s=30.0)
        assert s.route(r, only_fast) == ("fast",)
    fast = NodeState("fast", 0, queue_len=8, capacity=4.0)
    snap = ClusterSnapshot(0.0, ((fast, NodeState("slow", 0, capacity=1.0)),))
    assert s.lower(fast, 1) == 8 and s.lower(fast, 0) == 0
    chat = RequestView(1, 0.0, 16, 10, work, priority=1, ttft_slo_s=0.3, tpot_slo_s=0.2)
    # fast for chat: step 0.025, none ahead -> iteration 0.025; slow: iteration 0.1
    assert predict(chat, (fast,), 0.0, lower=lambda n: 8).tpot_s == pytest.approx(0.025)
    assert s.route(chat, snap) == ("fast",)
    batch = RequestView(2, 0.0, 16, 10, work, priority=0, e2e_slo_s=30.0)
    assert s.route(batch, snap) == ("slow",)  # fast: (8 + 1) x 0.025 = 0.225 per iteration
    assert SloAware().route(chat, snap) == ("slow",)  # no counts: the whole queue is ahead
    # the counts are capped by the node's queue, and follow requests leaving and re-routing
    assert predict(chat, (fast,), 0.0, lower=lambda n: 50).tpot_s == pytest.approx(0.025)
    for i in range(8):
        s.on_complete(StageCompletion("fast", 100 + i, 0.0, 0.0, 1.0, finished=True))
    assert s.lower(fast, 1) == 0
    s.route(RequestView(1, 0.0, 16, 10, work, priority=1), only_fast)  # chat re-routed
    assert s.lower(fast, 2) == 1  # counted once, not once per routing
    assert s.lower(snap.stages[0][1], 2) == 1  # the batch request on slow
