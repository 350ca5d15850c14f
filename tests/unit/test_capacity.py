"""Plan capacity, bottleneck utilisation, the stable-load helper, and the ablation pairs."""

from __future__ import annotations

import math

import pytest

from testbed.cost.capacity import bottleneck_utilisation, plan_capacity, stable_load
from testbed.cost.model import CostModel
from testbed.partition import PARTITIONERS
from testbed.spec.model_profile import load_model_profile
from testbed.spec.plan import Plan, RequestShape, StagePlan
from testbed.spec.topology import load_topology
from tests.factories import REPO, scenario_dict, topology_dict, write_yaml


def stage(tier: str, j: int, a: int, b: int, times: dict[str, float], transfer: float) -> StagePlan:
    return StagePlan(
        tier=tier,
        tier_index=j,
        start=a,
        end=b,
        nodes=tuple(times),
        holds_embedding=a == 0 < b,
        holds_head=b == 6 and a < b,
        compute_s=min(times.values()) if times else 0.0,
        node_compute_s=times,
        transfer_s=transfer,
        link_delay_s=0.01,
        mem_bytes=1,
        mem_available_bytes=2,
    )


def make(stages: list[StagePlan], include_transfer: bool = True) -> Plan:
    return Plan(
        topology="t",
        model="m",
        dtype="float16",
        num_blocks=6,
        partitioner={"name": "x", "params": {}},
        shape=RequestShape(),
        cost_source="roofline",
        include_transfer=include_transfer,
        cuts=(0, *(s.end for s in stages)),
        stages=tuple(stages),
        bottleneck_s=0.0,
        bottleneck_tier=stages[0].tier,
    )


def test_replicas_serve_side_by_side_and_links_do_not():
    plan = make(
        [
            stage("edge", 0, 0, 2, {"e1": 2.0}, 0.25),
            stage("fog", 1, 2, 4, {"f1": 1.0, "f2": 1.0, "f3": 2.0}, 0.5),  # 1 + 1 + 0.5 req/s
            stage("cloud", 2, 4, 6, {"c1": 0.5}, 0.0),
        ]
    )
    cap = plan_capacity(plan)
    assert cap.resources_rps == {
        "tier edge": 0.5,
        "link edge->fog": 4.0,
        "tier fog": 2.5,
        "link fog->cloud": 2.0,
        "tier cloud": 2.0,
    }
    assert cap.capacity_rps == 0.5 and cap.bottleneck == "tier edge"
    assert cap.bottleneck_time_s == 2.0
    assert bottleneck_utilisation(plan, 0.4) == pytest.approx(0.8)
    # an even dispatcher is limited by the slowest replica: 3 / 2 s
    assert plan_capacity(plan, even_dispatch=True).resources_rps["tier fog"] == 1.5


def test_two_identical_replicas_double_the_capacity_and_a_link_can_bind():
    one = make([stage("edge", 0, 0, 3, {"a": 1.0}, 0.4), stage("cloud", 1, 3, 6, {"c": 1.0}, 0)])
    two = make(
        [stage("edge", 0, 0, 3, {"a": 1.0, "b": 1.0}, 0.4), stage("cloud", 1, 3, 6, {"c": 0.2}, 0)]
    )
    assert plan_capacity(one).capacity_rps == 1.0
    assert plan_capacity(two).capacity_rps == pytest.approx(2.0)  # edge 2 req/s, link 2.5
    slow_link = make(
        [stage("edge", 0, 0, 3, {"a": 0.1}, 0.8), stage("cloud", 1, 3, 6, {"c": 0.1}, 0)]
    )
    cap = plan_capacity(slow_link)
    assert cap.bottleneck == "link edge->cloud" and cap.capacity_rps == pytest.approx(1.25)


def test_empty_tiers_are_skipped_and_utilisation_checks_its_input():
    plan = make(
        [
            stage("edge", 0, 0, 0, {}, 0.0),
            stage("fog", 1, 0, 6, {"f": 3.0}, 0.0),
            stage("cloud", 2, 6, 6, {}, 0.0),
        ]
    )
    cap = plan_capacity(plan)
    assert cap.resources_rps == {"tier fog": pytest.approx(1 / 3)}
    assert cap.to_dict()["capacity_rps"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="rate_rps"):
        bottleneck_utilisation(plan, -1.0)


def test_stable_load_on_three_tier_phi3_medium():
    topo = load_topology(REPO / "topologies" / "three-tier.yaml")
    cost = CostModel(load_model_profile("phi-3-medium"))
    sl = stable_load(topo, cost, ["bsdp", "even", "heft", "min_latency"], utilisation=0.8)
    by = {r.label: r for r in sl.plans}
    assert set(by) == {"bsdp", "even", "heft", "min_latency"}
    caps = {k: r.capacity.capacity_rps for k, r in by.items()}
    # the numbers the README quotes
    want = {"bsdp": 1.153, "even": 0.2292, "heft": 0.08445, "min_latency": 0.8231}
    assert caps == pytest.approx(want, rel=1e-3)
    assert by["bsdp"].plan.bottleneck_tier == "fog"  # one effective node per tier ...
    assert by["bsdp"].capacity.bottleneck == "tier cloud"  # ... but the fog has 3 replicas
    # bsdp balances: the highest capacity; heft keeps 38 blocks on the edge: the lowest
    assert max(caps, key=lambda k: caps[k]) == "bsdp"
    assert sl.limited_by == "heft" and by["heft"].capacity.bottleneck == "tier edge"
    assert sl.max_rate_rps == pytest.approx(0.8 * caps["heft"])
    for r in sl.plans:  # at that rate every plan is at most 80 % busy
        assert bottleneck_utilisation(r.plan, sl.max_rate_rps) <= 0.8 + 1e-12
    assert sl.rates([0.5, 1.0]) == pytest.approx([sl.max_rate_rps / 2, sl.max_rate_rps])
    # labels may carry parameters
    two = stable_load(
        topo,
        cost,
        {
            "heft": PARTITIONERS.create("heft"),
            "heft-nocomm": PARTITIONERS.create("heft", {"include_transfer": False}),
        },
    )
    assert [r.label for r in two.plans] == ["heft", "heft-nocomm"]
    assert two.plans[1].capacity.capacity_rps > two.plans[0].capacity.capacity_rps
    with pytest.raises(ValueError, match="unique"):
        stable_load(topo, cost, ["bsdp", "bsdp"])
    with pytest.raises(ValueError, match="utilisation"):
        stable_load(topo, cost, ["bsdp"], utilisation=1.5)
    assert math.isfinite(sl.max_rate_rps)


ABLATIONS = [
    "bsdp+round_robin",
    "even+arts",
    "bsdp+arts",
    "even+round_robin",
    "heft+heft",
    "min_latency+arts",
]


@pytest.mark.parametrize("pair", ABLATIONS)
def test_ablation_pairs_parse(pair):
    from testbed.schedule import SCHEDULERS
    from testbed.spec.scenario import parse_pair

    part, sched = parse_pair(pair)
    PARTITIONERS.create(part)
    SCHEDULERS.create(sched)


def test_ablation_pairs_valid_in_a_scenarios_compare_list(tmp_path):
    from testbed.spec.scenario import load_scenario

    write_yaml(tmp_path / "topo.yaml", topology_dict())
    p = write_yaml(tmp_path / "s.yaml", scenario_dict(compare=ABLATIONS))
    assert list(load_scenario(p).spec.compare) == ABLATIONS
