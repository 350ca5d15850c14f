"""ARTS decisions checked against hand computations."""

from __future__ import annotations

import pytest

from testbed.errors import ConfigError
from testbed.schedule import SCHEDULERS, ClusterSnapshot, NodeState, RequestView, StageCompletion
from testbed.schedule.arts import Arts


def snap(*nodes: NodeState, now_s: float = 0.0) -> ClusterSnapshot:
    return ClusterSnapshot(now_s, (tuple(nodes),))


def req(work: dict[str, float], kv: tuple[int, ...] = (), i: int = 0) -> RequestView:
    return RequestView(i, 0.0, 10, 5, work, kv)


def test_queued_work_over_capacity() -> None:
    a = NodeState("a", 0, queued_work_s=5.0)
    b = NodeState("b", 0, queued_work_s=1.0)
    # d_a = (5 + 1) / 1 = 6, d_b = (1 + 1) / 1 = 2
    assert Arts().route(req({"a": 1.0, "b": 1.0}), snap(a, b)) == ("b",)
    # a four times as fast: d_a = 6 / 4 = 1.5 < d_b = 2
    a4 = NodeState("a", 0, queued_work_s=5.0, capacity=4.0)
    assert Arts().route(req({"a": 1.0, "b": 1.0}), snap(a4, b)) == ("a",)
    # the request's own work counts: d_a = (5 + 1) / 4 = 1.5, d_b = (1 + 0.75) / 1 = 1.75 -> a;
    # with b's work 0.4: d_b = 1.4 -> b
    assert Arts().route(req({"a": 1.0, "b": 0.75}), snap(a4, b)) == ("a",)
    assert Arts().route(req({"a": 1.0, "b": 0.4}), snap(a4, b)) == ("b",)


def test_ewma_refines_capacity_by_hand() -> None:
    arts = Arts(alpha=0.2)
    a, b = NodeState("a", 0), NodeState("b", 0)
    arts.route(req({"a": 1.0, "b": 1.0}), snap(a, b))  # sees priors 1.0
    arts.on_complete(StageCompletion("b", 0, predicted_work_s=2.0, service_s=6.0, now_s=6.0))
    assert arts.capacity(b) == pytest.approx(0.8 * 1.0 + 0.2 * (1 / 3))  # 0.8666...
    arts.on_complete(StageCompletion("b", 1, predicted_work_s=1.0, service_s=3.0, now_s=9.0))
    c2 = 0.8 * (0.8 + 0.2 / 3) + 0.2 / 3
    assert arts.capacity(b) == pytest.approx(c2)  # 0.7600...
    # zero/negative service times are ignored; absurd speeds are clamped
    arts.on_complete(StageCompletion("b", 2, 1.0, 0.0, 9.0))
    arts.on_complete(StageCompletion("b", 3, 1.0, -1.0, 9.0))
    assert arts.capacity(b) == pytest.approx(c2)
    arts.on_complete(StageCompletion("a", 4, 1.0, 1e-9, 9.0))
    assert arts.capacity(a) == pytest.approx(0.8 * 1.0 + 0.2 * arts.max_capacity)


def test_ewma_starts_from_the_snapshot_prior() -> None:
    arts = Arts(alpha=0.5)
    a = NodeState("a", 0, capacity=2.0)
    arts.route(req({"a": 1.0}), snap(a))
    arts.on_complete(StageCompletion("a", 0, 1.0, 1.0, 1.0))  # observed speed 1.0
    assert arts.capacity(a) == pytest.approx(0.5 * 2.0 + 0.5 * 1.0)


def test_learning_moves_traffic_away_from_a_slow_node() -> None:
    arts, frozen = Arts(alpha=0.2), Arts(alpha=0.0)
    # equal priors, b slightly less loaded: both pick b at first
    a = NodeState("a", 0, queued_work_s=1.2)
    b = NodeState("b", 0, queued_work_s=1.0)
    work = {"a": 1.0, "b": 1.0}
    assert arts.route(req(work), snap(a, b)) == ("b",) == frozen.route(req(work), snap(a, b))
    # b turns out 3x slower than predicted: after one completion C_b = 0.8667,
    # d_b = 2 / 0.8667 = 2.31 > d_a = 2.2 -> a; the non-learning variant keeps choosing b
    for learner in (arts, frozen):
        learner.on_complete(StageCompletion("b", 0, 1.0, 3.0, 3.0, finished=True))
    assert arts.route(req(work), snap(a, b)) == ("a",)
    assert frozen.route(req(work), snap(a, b)) == ("b",)


def test_memory_filter_and_fallback() -> None:
    fast = NodeState("fast", 0, capacity=10.0, mem_free_bytes=100)
    slow = NodeState("slow", 0, capacity=1.0, mem_free_bytes=1000)
    work = {"fast": 1.0, "slow": 1.0}
    assert Arts().route(req(work, kv=(500,)), snap(fast, slow)) == ("slow",)
    assert Arts(use_memory_filter=False).route(req(work, kv=(500,)), snap(fast, slow)) == ("fast",)
    # exactly enough headroom passes the filter
    assert Arts().route(req(work, kv=(100,)), snap(fast, slow)) == ("fast",)
    # no replica has headroom: fall back to all up replicas, best delay wins
    assert Arts().route(req(work, kv=(5000,)), snap(fast, slow)) == ("fast",)
    # no kv_bytes given: no filtering
    assert Arts().route(req(work), snap(fast, slow)) == ("fast",)


def test_memory_filter_is_per_stage() -> None:
    s0 = (NodeState("a", 0, mem_free_bytes=10), NodeState("b", 0, queued_work_s=3.0))
    s1 = (NodeState("c", 1, mem_free_bytes=10), NodeState("d", 1, queued_work_s=3.0))
    work = {n: 1.0 for n in "abcd"}
    route = Arts().route(req(work, kv=(5, 50)), ClusterSnapshot(0.0, (s0, s1)))
    assert route == ("a", "d")


def test_ties_prefer_larger_capacity_then_name() -> None:
    # d_x = (1 + 1) / 1 = 2, d_y = (3 + 1) / 2 = 2: tie on delay, y has the larger C_hat
    x = NodeState("x", 0, queued_work_s=1.0, capacity=1.0)
    y = NodeState("y", 0, queued_work_s=3.0, capacity=2.0)
    assert Arts().route(req({"x": 1.0, "y": 1.0}), snap(x, y)) == ("y",)
    # full tie: the smaller name, whatever the snapshot order
    p, q = NodeState("p", 0), NodeState("q", 0)
    assert Arts().route(req({"p": 1.0, "q": 1.0}), snap(q, p)) == ("p",)


def test_down_nodes_are_skipped() -> None:
    a = NodeState("a", 0, up=False)
    b = NodeState("b", 0, queued_work_s=100.0)
    assert Arts().route(req({"a": 1.0, "b": 1.0}), snap(a, b)) == ("b",)


@pytest.mark.parametrize(
    "params",
    [
        {"alpha": 1.5},
        {"alpha": -0.1},
        {"min_capacity": 0.0},
        {"min_capacity": 5.0, "max_capacity": 1.0},
    ],
)
def test_bad_parameters_are_config_errors(params: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="arts"):
        SCHEDULERS.create("arts", params)


def test_unknown_parameter_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="alpha"):
        SCHEDULERS.create("arts", {"alhpa": 0.1})


def test_batch_aware_rate_divides_the_delay_and_speedup_one_is_the_original() -> None:
    a = NodeState("a", 0, queued_work_s=5.0)
    b = NodeState("b", 0, queued_work_s=1.0)
    assert Arts().route(req({"a": 1.0, "b": 1.0}), snap(a, b)) == ("b",)
    # a batches its queue 4x faster: d_a = 6 / 4 = 1.5 < d_b = 2
    a_batch = NodeState("a", 0, queued_work_s=5.0, batch_speedup=4.0)
    assert Arts().route(req({"a": 1.0, "b": 1.0}), snap(a_batch, b)) == ("a",)
