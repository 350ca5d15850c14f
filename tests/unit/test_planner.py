"""Planner: topology + profile + partitioner -> Plan, and the paper-like topology's behaviour."""

from __future__ import annotations

import pytest

from testbed.cost.model import CostModel
from testbed.cost.planner import build_problem, make_plan
from testbed.errors import InfeasibleError
from testbed.partition import PARTITIONERS
from testbed.spec.model_profile import load_model_profile
from testbed.spec.plan import RequestShape
from testbed.spec.topology import load_topology
from tests.factories import REPO, topology


def _plan(topo, model="phi-3-medium", part="bsdp", **params):
    return make_plan(topo, CostModel(load_model_profile(model)), PARTITIONERS.create(part, params))


@pytest.mark.parametrize("part", ["bsdp", "even", "heft"])
def test_plan_covers_every_block_once_with_replicas_that_fit(part):
    topo = load_topology(REPO / "topologies" / "three-tier.yaml")
    plan = _plan(topo, part=part)
    assert plan.cuts[0] == 0 and plan.cuts[-1] == 40
    blocks = [b for s in plan.stages for b in range(s.start, s.end)]
    assert blocks == list(range(40))
    for s in plan.active_stages():
        assert s.nodes, s
        for name in s.nodes:
            _, node = topo.node(name)
            assert node.device.mem >= s.mem_bytes
        assert s.compute_s == pytest.approx(min(s.node_compute_s.values()))
    assert plan.active_stages()[0].holds_embedding and plan.active_stages()[-1].holds_head


def test_bsdp_beats_even_and_heft_on_the_bottleneck():
    topo = load_topology(REPO / "topologies" / "three-tier.yaml")
    bsdp, even, heft = (_plan(topo, part=p) for p in ("bsdp", "even", "heft"))
    problem, _ = build_problem(topo, CostModel(load_model_profile("phi-3-medium")), RequestShape())
    from testbed.partition import split_cost

    for other in (even, heft):
        assert bsdp.bottleneck_s <= max(split_cost(problem, other.cuts)) + 1e-12
    assert bsdp.bottleneck_s < 0.5 * even.bottleneck_s


def test_weak_node_excluded_from_replicas_when_range_does_not_fit():
    topo = load_topology(REPO / "topologies" / "three-tier.yaml")
    plan = make_plan(
        topo, CostModel(load_model_profile("phi-3-medium")), PARTITIONERS.create("even")
    )
    edge = plan.stages[0]
    assert "edge-nano" not in edge.nodes  # 14 blocks of a 14B model do not fit 6 GiB


def test_model_that_fits_no_split_names_tier_and_shortfall():
    topo = topology(device={"base": "jetson-orin-nano", "mem": "1GiB"})
    with pytest.raises(InfeasibleError) as info:
        _plan(topo, model="llama-3-8b")
    msg = str(info.value)
    assert "short by" in msg or "shortfall" in msg
    assert any(t in msg for t in ("edge", "fog", "cloud"))
    assert isinstance(info.value, ValueError)


def test_slow_uplink_moves_blocks_off_the_tier():
    fast = topology(bandwidth="10Gbit")
    slow = topology(bandwidth="1Mbit")
    a = _plan(fast, model="phi-3-mini")
    b = _plan(slow, model="phi-3-mini")
    assert b.stages[0].num_blocks <= a.stages[0].num_blocks
    assert b.stages[0].transfer_s > a.stages[0].transfer_s
