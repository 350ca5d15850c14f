"""Hand-checked decisions of the baseline schedulers (round_robin, jsq, random, heft, fastest)."""

from __future__ import annotations

from collections import Counter

import pytest

from testbed.errors import ConfigError
from testbed.schedule import SCHEDULERS, ClusterSnapshot, NodeState, RequestView


def req(work: dict[str, float]) -> RequestView:
    return RequestView(0, 0.0, 10, 5, work)


def test_round_robin_cycles_in_name_order_per_stage() -> None:
    s0 = (NodeState("c", 0), NodeState("a", 0), NodeState("b", 0))
    s1 = (NodeState("y", 1), NodeState("x", 1))
    snap = ClusterSnapshot(0.0, (s0, s1))
    rr = SCHEDULERS.create("round_robin")
    routes = [rr.route(req({}), snap) for _ in range(4)]
    assert routes == [("a", "x"), ("b", "y"), ("c", "x"), ("a", "y")]
    # a down node drops out of the cycle
    down = ClusterSnapshot(0.0, ((NodeState("a", 0), NodeState("b", 0, up=False)),))
    rr = SCHEDULERS.create("round_robin")
    assert [rr.route(req({}), down) for _ in range(2)] == [("a",), ("a",)]


def test_jsq_shortest_queue_ties_by_name_or_seeded_random() -> None:
    nodes = (
        NodeState("b", 0, queue_len=1),
        NodeState("a", 0, queue_len=1),
        NodeState("c", 0, queue_len=2),
    )
    snap = ClusterSnapshot(0.0, (nodes,))
    assert SCHEDULERS.create("jsq").route(req({}), snap) == ("a",)
    picks = [
        SCHEDULERS.create("jsq", {"tie_break": "random", "seed": s}).route(req({}), snap)
        for s in range(20)
    ]
    assert set(picks) == {("a",), ("b",)}  # never c, both tied ones used
    with pytest.raises(ConfigError, match="tie_break"):
        SCHEDULERS.create("jsq", {"tie_break": "first"})


def test_random_is_seeded_and_covers_replicas() -> None:
    snap = ClusterSnapshot(0.0, (tuple(NodeState(n, 0) for n in "abc"),))

    def run(seed: int) -> list[tuple[str, ...]]:
        sched = SCHEDULERS.create("random", {"seed": seed})
        return [sched.route(req({}), snap) for _ in range(300)]

    assert run(1) == run(1)
    assert run(1) != run(2)
    counts = Counter(r[0] for r in run(1))
    assert set(counts) == {"a", "b", "c"} and min(counts.values()) > 60


def test_heft_earliest_finish_by_hand() -> None:
    # stage 0: a idle, finish 0 + 2 = 2; b free at 2/2 = 1, finish 1 + 2/2 = 2 -> tie, name a.
    # stage 1, ready at 2 + hop 0.5 = 2.5: c free at 3, finish 3 + 1 = 4; d finish 2.5 + 2 = 4.5
    s0 = (NodeState("a", 0), NodeState("b", 0, queued_work_s=2.0, capacity=2.0))
    s1 = (NodeState("c", 1, queued_work_s=3.0), NodeState("d", 1))
    snap = ClusterSnapshot(0.0, (s0, s1), hop_s=(0.5,))
    work = {"a": 2.0, "b": 2.0, "c": 1.0, "d": 2.0}
    assert SCHEDULERS.create("heft").route(req(work), snap) == ("a", "c")
    # hop 2.0 and c busy for 6s: ready at 4; c finish max(4, 6) + 1 = 7, d finish 4 + 2 = 6 -> d
    slow_c = (NodeState("c", 1, queued_work_s=6.0), NodeState("d", 1))
    snap2 = ClusterSnapshot(0.0, (s0, slow_c), hop_s=(2.0,))
    assert SCHEDULERS.create("heft").route(req(work), snap2) == ("a", "d")


def test_heft_uses_now_for_node_availability() -> None:
    s0 = (NodeState("a", 0, queued_work_s=1.0), NodeState("b", 0))
    snap = ClusterSnapshot(100.0, (s0,))
    # a: 100 + 1 + 1 = 102, b: 100 + 1.5 = 101.5
    assert SCHEDULERS.create("heft").route(req({"a": 1.0, "b": 1.5}), snap) == ("b",)


def test_fastest_ignores_queues() -> None:
    s0 = (NodeState("a", 0, queued_work_s=100.0, capacity=4.0), NodeState("b", 0))
    snap = ClusterSnapshot(0.0, (s0,))
    assert SCHEDULERS.create("fastest").route(req({"a": 2.0, "b": 1.0}), snap) == ("a",)  # 0.5 < 1
