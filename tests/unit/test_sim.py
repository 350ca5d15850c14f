"""The discrete-event simulator: exact timings by hand, and policies compared on a known cluster."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from testbed.errors import ConfigError, TestbedError
from testbed.schedule import SCHEDULERS, ClusterSnapshot, RequestView, Route, StageCompletion
from testbed.schedule.base import Scheduler
from testbed.schedule.sim import SimNode, SimRequest, simulate


@dataclass
class Recorder(Scheduler):
    """Wraps a scheduler and keeps every snapshot and completion it sees (test helper)."""

    inner: Scheduler
    snapshots: list[ClusterSnapshot] = field(default_factory=list)
    events: list[StageCompletion] = field(default_factory=list)

    def route(self, request: RequestView, snapshot: ClusterSnapshot) -> Route:
        self.snapshots.append(snapshot)
        return self.inner.route(request, snapshot)

    def on_complete(self, event: StageCompletion) -> None:
        self.events.append(event)
        self.inner.on_complete(event)


def poisson(n: int, rate: float, seed: int) -> list[SimRequest]:
    rng, t, out = random.Random(seed), 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(SimRequest(t, rng.randrange(50, 500), rng.randrange(10, 100)))
    return out


def test_exact_timings_fifo_and_hops() -> None:
    # stage 0 "e" (true speed 2), stage 1 "c"; work 2 s on e (-> 1 s), 3 s on c; hop 0.5 s
    stages = [[SimNode("e", speed=2.0)], [SimNode("c")]]
    reqs = [(0.0, 1, 1), (0.2, 1, 1), (10.0, 1, 1)]
    rec = Recorder(SCHEDULERS.create("round_robin"))
    res = simulate(reqs, stages, rec, {"e": 2.0, "c": 3.0}, hop_s=(0.5,))
    r0, r1, r2 = res.records
    # r0: e 0..1, hop to 1.5, c 1.5..4.5
    assert (r0.start_s, r0.end_s) == ((0.0, 1.5), (1.0, 4.5))
    # r1 waits for e until 1, e 1..2, arrives at c at 2.5, waits until 4.5, c 4.5..7.5
    assert (r1.start_s, r1.end_s) == ((1.0, 4.5), (2.0, 7.5))
    assert r1.latency_s == pytest.approx(7.3)
    # r2 finds everything idle: 1 + 0.5 + 3
    assert r2.latency_s == pytest.approx(4.5)
    assert res.busy_s == pytest.approx({"e": 3.0, "c": 9.0})
    assert res.mean_latency_s == pytest.approx((4.5 + 7.3 + 4.5) / 3)
    # completions carry predicted work and measured service time
    e_events = [ev for ev in rec.events if ev.node == "e"]
    assert [(ev.request_id, ev.predicted_work_s, ev.service_s) for ev in e_events] == [
        (0, 2.0, 1.0),
        (1, 2.0, 1.0),
        (2, 2.0, 1.0),
    ]
    # the second admission (t=0.2) sees r0 still routed to both nodes
    s = rec.snapshots[1]
    assert s.now_s == 0.2 and s.hop_s == (0.5,)
    assert [(n.queue_len, n.queued_work_s) for st in s.stages for n in st] == [(1, 2.0), (1, 3.0)]


def test_slots_serve_in_parallel() -> None:
    stages = [[SimNode("n", slots=2)]]
    res = simulate([(0.0, 1, 1)] * 3, stages, SCHEDULERS.create("jsq"), {"n": 1.0})
    assert [r.end_s[0] for r in res.records] == [1.0, 1.0, 2.0]


def test_callable_work_and_memory_accounting() -> None:
    stages = [
        [SimNode("big", mem_bytes=1000), SimNode("small", mem_bytes=150, speed=4.0, capacity=4.0)]
    ]
    rec = Recorder(SCHEDULERS.create("arts"))
    reqs = [SimRequest(0.0, 100, 0), SimRequest(0.1, 100, 0), SimRequest(0.3, 100, 0)]
    res = simulate(
        reqs,
        stages,
        rec,
        lambda r, _n: r.prompt_tokens / 100,
        kv_bytes=lambda r, _s: r.prompt_tokens,
    )
    # r0 -> small (d = 1/4 < 1); r1: small has 50 B free < 100 -> big; r0 leaves small at 0.25
    # and frees its KV, so r2 (t = 0.3) goes to small again
    assert [r.route for r in res.records] == [("small",), ("big",), ("small",)]
    assert [n.mem_free_bytes for n in rec.snapshots[1].stages[0]] == [1000, 50]
    assert [n.mem_free_bytes for n in rec.snapshots[2].stages[0]] == [900, 150]


def test_arts_beats_round_robin_when_a_replica_is_slower_than_predicted() -> None:
    # edge -> fog (two replicas, fog-b truly 3x slower than its profile says) -> cloud
    stages = [
        [SimNode("edge")],
        [SimNode("fog-a"), SimNode("fog-b", speed=1 / 3)],
        [SimNode("cloud")],
    ]
    per_token = {"edge": 0.0005, "fog-a": 0.008, "fog-b": 0.008, "cloud": 0.001}

    def work(r: SimRequest, node: str) -> float:
        return per_token[node] * (r.prompt_tokens + r.output_tokens)

    reqs = poisson(300, rate=0.35, seed=0)
    mean = {
        label: simulate(
            reqs, stages, SCHEDULERS.create(name, params), work, hop_s=(0.01, 0.02)
        ).mean_latency_s
        for label, name, params in [
            ("arts", "arts", {}),
            ("arts-no-learning", "arts", {"alpha": 0.0}),
            ("round_robin", "round_robin", {}),
            ("random", "random", {}),
        ]
    }
    assert mean["arts"] < 0.25 * mean["round_robin"]
    assert mean["arts"] < 0.25 * mean["random"]
    assert mean["arts"] < mean["arts-no-learning"]  # learning the true speed pays


def test_jsq_balances_a_burst() -> None:
    stages = [[SimNode("a"), SimNode("b"), SimNode("c")]]
    res = simulate(
        [(0.0, 1, 1)] * 10, stages, SCHEDULERS.create("jsq"), {"a": 1.0, "b": 1.0, "c": 1.0}
    )
    assert res.routed() == {"a": 4, "b": 3, "c": 3}
    assert sorted(r.end_s[0] for r in res.records) == [1.0] * 3 + [2.0] * 3 + [3.0] * 3 + [4.0]
    fastest = simulate(
        [(0.0, 1, 1)] * 10, stages, SCHEDULERS.create("fastest"), {"a": 1.0, "b": 1.0, "c": 1.0}
    )
    assert fastest.routed() == {"a": 10, "b": 0, "c": 0}


@pytest.mark.parametrize("name", SCHEDULERS.names())
def test_deterministic(name: str) -> None:
    stages = [[SimNode("x"), SimNode("y", speed=0.5)], [SimNode("z"), SimNode("w", speed=2.0)]]
    reqs = poisson(60, rate=1.0, seed=3)
    work = {"x": 0.5, "y": 0.5, "z": 0.4, "w": 0.4}
    a = simulate(reqs, stages, SCHEDULERS.create(name), work, hop_s=(0.05,))
    b = simulate(reqs, stages, SCHEDULERS.create(name), work, hop_s=(0.05,))
    assert a == b
    assert all(r.latency_s >= 0.75 - 1e-9 for r in a.records)  # x 0.5 + hop 0.05 + w 0.4 / 2


def test_bad_input_and_bad_routes() -> None:
    stages = [[SimNode("a")], [SimNode("b")]]
    with pytest.raises(ConfigError, match="hop_s"):
        simulate(
            [(0.0, 1, 1)], stages, SCHEDULERS.create("jsq"), {"a": 1.0, "b": 1.0}, hop_s=(1.0, 2.0)
        )
    with pytest.raises(ConfigError, match="twice"):
        simulate(
            [(0.0, 1, 1)], [[SimNode("a")], [SimNode("a")]], SCHEDULERS.create("jsq"), {"a": 1.0}
        )

    class Broken(Scheduler):
        def route(self, request: RequestView, snapshot: ClusterSnapshot) -> Route:
            return ("b", "a")

    with pytest.raises(TestbedError, match="stage 0"):
        simulate([(0.0, 1, 1)], stages, Broken(), {"a": 1.0, "b": 1.0})


def test_down_replica_is_never_used() -> None:
    stages = [[SimNode("a", up=False), SimNode("b")]]
    for name in SCHEDULERS.names():
        res = simulate(poisson(20, 2.0, 1), stages, SCHEDULERS.create(name), {"a": 0.1, "b": 0.1})
        assert res.routed() == {"a": 0, "b": 20}
