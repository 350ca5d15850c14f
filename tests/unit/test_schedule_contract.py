"""Contract tests that every registered scheduler must pass (parametrised from the registry)."""

from __future__ import annotations

import copy
import random

import pytest

from testbed.schedule import (
    SCHEDULERS,
    ClusterSnapshot,
    NodeState,
    NoRouteError,
    RequestView,
    StageCompletion,
)

NAMES = SCHEDULERS.names()


def make_snapshot(
    rng: random.Random, replicas: tuple[int, ...], down: frozenset[str] = frozenset()
):
    stages = tuple(
        tuple(
            NodeState(
                name=f"s{s}n{k}",
                stage=s,
                up=f"s{s}n{k}" not in down,
                queue_len=rng.randrange(5),
                queued_work_s=rng.uniform(0, 3),
                capacity=rng.choice((0.5, 1.0, 2.0)),
                mem_free_bytes=rng.randrange(0, 2000),
            )
            for k in range(count)
        )
        for s, count in enumerate(replicas)
    )
    hops = tuple(rng.uniform(0, 0.1) for _ in range(len(replicas) - 1))
    return ClusterSnapshot(now_s=rng.uniform(0, 100), stages=stages, hop_s=hops)


def make_request(rng: random.Random, i: int, snap: ClusterSnapshot) -> RequestView:
    work = {n.name: rng.uniform(0.1, 2.0) for st in snap.stages for n in st}
    kv = tuple(rng.randrange(0, 1500) for _ in snap.stages)
    return RequestView(i, snap.now_s, rng.randrange(1, 500), rng.randrange(1, 100), work, kv)


def drive(
    name: str, seed: int, replicas: tuple[int, ...], steps: int = 40
) -> list[tuple[str, ...]]:
    """Route ``steps`` random requests through a fresh scheduler, feeding a completion after each."""
    sched = SCHEDULERS.create(name)
    rng = random.Random(seed)
    routes = []
    for i in range(steps):
        down = frozenset(
            f"s{s}n{rng.randrange(c)}"
            for s, c in enumerate(replicas)
            if c > 1 and rng.random() < 0.3
        )
        snap = make_snapshot(rng, replicas, down)
        req = make_request(rng, i, snap)
        before = copy.deepcopy((snap, req))
        route = sched.route(req, snap)
        assert (snap, req) == before, "route() must not mutate its inputs"
        assert len(route) == len(snap.stages)
        for s, node in enumerate(route):
            up = {n.name for n in snap.stages[s] if n.up}
            assert node in up, f"stage {s}: {node!r} is not an up replica ({sorted(up)})"
        routes.append(route)
        node = route[rng.randrange(len(route))]
        sched.on_complete(StageCompletion(node, i, 1.0, rng.uniform(0.2, 4.0), snap.now_s, True))
    return routes


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("replicas", [(3, 2, 4), (1, 1, 1), (1,), (5,), (2, 1, 3)])
def test_route_picks_one_up_replica_per_stage(name: str, replicas: tuple[int, ...]) -> None:
    drive(name, seed=7, replicas=replicas)


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_for_same_inputs(name: str) -> None:
    assert drive(name, seed=3, replicas=(3, 2, 4)) == drive(name, seed=3, replicas=(3, 2, 4))


@pytest.mark.parametrize("name", NAMES)
def test_no_route_when_a_stage_is_all_down(name: str) -> None:
    rng = random.Random(1)
    snap = make_snapshot(rng, (2, 2), down=frozenset({"s1n0", "s1n1"}))
    with pytest.raises(NoRouteError, match="stage 1"):
        SCHEDULERS.create(name).route(make_request(rng, 0, snap), snap)


@pytest.mark.parametrize("name", NAMES)
def test_single_replica_stages_take_everything(name: str) -> None:
    rng = random.Random(2)
    sched = SCHEDULERS.create(name)
    for i in range(10):
        snap = make_snapshot(rng, (1, 1, 1))
        assert sched.route(make_request(rng, i, snap), snap) == ("s0n0", "s1n0", "s2n0")


@pytest.mark.parametrize("name", NAMES)
def test_ignores_odd_completions_and_describes_itself(name: str) -> None:
    sched = SCHEDULERS.create(name)
    for service in (0.0, -1.0, 1e-12, 1e12):  # zero/negative service, absurd speeds
        sched.on_complete(StageCompletion("s0n0", 0, 1.0, service, 0.0))
    sched.on_complete(StageCompletion("unknown-node", 0, 0.0, 1.0, 0.0))
    rng = random.Random(4)
    snap = make_snapshot(rng, (2, 2))
    assert len(sched.route(make_request(rng, 0, snap), snap)) == 2
    desc = sched.describe()
    assert desc["name"] == name
    assert set(desc["params"]) == {p.name for p in SCHEDULERS.params(name) if p.init}


@pytest.mark.parametrize("name", NAMES)
def test_instances_do_not_share_state(name: str) -> None:
    a, b = SCHEDULERS.create(name), SCHEDULERS.create(name)
    rng = random.Random(5)
    snap = make_snapshot(rng, (3,))
    req = make_request(rng, 0, snap)
    first_b = b.route(req, snap)
    for _ in range(5):
        a.route(req, snap)
        a.on_complete(StageCompletion(first_b[0], 0, 1.0, 50.0, 0.0, True))
    assert SCHEDULERS.create(name).route(req, snap) == first_b


def test_registry_lists_the_issue_schedulers() -> None:
    assert {"arts", "round_robin", "jsq", "random", "heft"} <= set(NAMES)
