"""Adaptive re-partitioning: the `repartition:` spec and the pure re-plan decision (measured
links and node speeds in, migrate or not out) with its migration cost."""

from __future__ import annotations

import pytest

from testbed.cost.model import CostModel
from testbed.cost.planner import make_plan
from testbed.cost.replan import (
    MeasuredState,
    decide,
    measured_topology,
    migration_cost,
    range_weight_bytes,
)
from testbed.errors import ConfigError
from testbed.partition.bsdp import BSDP
from testbed.spec.model_profile import load_model_profile
from testbed.spec.plan import RequestShape
from testbed.spec.repartition import split_pair
from testbed.spec.scenario import load_scenario, parse_pair
from testbed.spec.topology import load_topology
from tests.factories import REPO, scenario_dict, topology_dict, write_yaml

TOPO = load_topology(REPO / "topologies" / "three-tier.yaml")
COST = CostModel(load_model_profile("phi-3-medium", dtype="float16"))
SHAPE = RequestShape(prompt_tokens=1024, output_tokens=256, concurrency=8)
STATIC = make_plan(TOPO, COST, BSDP(), SHAPE)


def _links(edge_fog_bps: float = 100e6) -> MeasuredState:
    up0, up1 = TOPO.uplink(0), TOPO.uplink(1)
    assert up0 is not None and up1 is not None
    return MeasuredState((up0.model_copy(update={"bandwidth_bps": edge_fog_bps}), up1))


def test_nothing_changed_keeps_the_plan():
    d = decide(STATIC.cuts, TOPO, COST, SHAPE, _links(), threshold=0.1)
    assert not d.migrate and d.new_cuts == d.old_cuts and "still the best" in d.reason
    assert d.old_bottleneck_s == pytest.approx(STATIC.bottleneck_s)


def test_a_slow_access_link_moves_the_edge_blocks_off_it():
    d = decide(STATIC.cuts, TOPO, COST, SHAPE, _links(10e6), threshold=0.1)
    assert d.migrate and d.new_cuts[1] == 0  # the edge tier is emptied: only token ids cross
    assert d.improvement > 0.5 and "migrate" in d.reason
    # without empty tiers every split ships the same hidden states over the slow link
    kept = decide(STATIC.cuts, TOPO, COST, SHAPE, _links(10e6), threshold=0.1, allow_empty=False)
    assert not kept.migrate


def test_the_threshold_holds_back_small_gains():
    moved = decide(STATIC.cuts, TOPO, COST, SHAPE, _links(10e6), threshold=0.1)
    back = decide(moved.new_cuts, TOPO, COST, SHAPE, _links(100e6), threshold=0.1)
    assert 0 <= back.improvement < 0.1 and not back.migrate and "threshold" in back.reason
    eager = decide(moved.new_cuts, TOPO, COST, SHAPE, _links(100e6), threshold=0.001)
    assert eager.migrate == (eager.improvement >= 0.001) and eager.new_cuts != moved.new_cuts


def test_measured_node_speed_moves_blocks_off_a_slow_tier():
    slow = {n.name: 0.2 for n in TOPO.tiers[2].nodes}  # the cloud runs at a fifth of the model
    d = decide(STATIC.cuts, TOPO, COST, SHAPE, MeasuredState(_links().links, slow), threshold=0.1)
    assert d.migrate and d.new_cuts[2] > STATIC.cuts[2]  # fewer blocks on the cloud


def test_measured_topology_replaces_only_the_link_fields():
    topo = measured_topology(TOPO, _links(10e6).links)
    assert topo.uplink(0).bandwidth_bps == 10e6 and topo.uplink(1) == TOPO.uplink(1)
    assert topo.tiers == TOPO.tiers
    with pytest.raises(ValueError, match="links"):
        measured_topology(TOPO, ())


def test_migration_loads_only_new_blocks_and_holds_the_union():
    p = COST.profile
    old = {"f": (1, 13), "c": (13, 40), "e": (0, 1)}
    new = {"f": (0, 12), "c": (12, 40)}
    m = migration_cost(COST, old, new, load_Bps=1e9)
    assert m.load_bytes["f"] == p.block_weight_bytes() + p.embed_weight_bytes()
    assert m.load_bytes["c"] == p.block_weight_bytes()
    assert m.load_s == pytest.approx(max(m.load_bytes.values()) / 1e9)
    assert m.overlap_weight_bytes["f"] == range_weight_bytes(COST, 0, 13)
    assert m.overlap_weight_bytes["e"] == range_weight_bytes(COST, 0, 1)  # until it drains
    assert range_weight_bytes(COST, 5, 5) == 0
    with pytest.raises(ValueError):
        migration_cost(COST, old, new, load_Bps=0)


# -- the scenario field ------------------------------------------------------------------------
def _load(tmp_path, **over):
    write_yaml(tmp_path / "topo.yaml", topology_dict())
    return load_scenario(write_yaml(tmp_path / "s.yaml", scenario_dict(duration="60s", **over)))


def test_repartition_parses_with_units(tmp_path):
    rp = _load(tmp_path, repartition={"every": "10s", "threshold": "10%"}).spec.repartition
    assert rp is not None and rp.every_s == 10 and rp.threshold == pytest.approx(0.1)
    assert rp.allow_empty and rp.load_bandwidth_Bps == 1e9
    rp = _load(
        tmp_path, repartition={"every": "5s", "threshold": "25%", "load_bandwidth": "2GB/s"}
    ).spec.repartition
    assert rp is not None and rp.load_bandwidth_Bps == 2e9


BAD = [
    ({"every": "10s"}, "repartition.threshold", "required field is missing"),
    ({"every": "10s", "threshold": "0%"}, "repartition.threshold", "greater than 0"),
    ({"every": "90s", "threshold": "10%"}, "repartition.every", "not shorter than the run"),
    ({"every": 10, "threshold": "10%"}, "repartition.every", "no unit"),
    ({"every": "10s", "threshold": "10%", "evry": 1}, "repartition", "evry"),
]


@pytest.mark.parametrize(("block", "field", "text"), BAD)
def test_bad_repartition_names_the_field(tmp_path, block, field, text):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, repartition=block)
    msg = str(err.value)
    assert "s.yaml" in msg and field in msg and text in msg, msg
    assert err.value.exit_code == 2


def test_adaptive_pairs_need_a_repartition_block(tmp_path):
    assert split_pair("bsdp+arts+adaptive") == ("bsdp+arts", True)
    assert split_pair("bsdp+arts") == ("bsdp+arts", False)
    ok = _load(tmp_path, compare=["bsdp+arts", "bsdp+arts+adaptive"],
               repartition={"every": "10s", "threshold": "10%"})  # fmt: skip
    assert ok.spec.compare[1] == "bsdp+arts+adaptive"
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, compare=["bsdp+arts+adaptive"])
    assert "compare[0]" in str(err.value) and "repartition" in str(err.value)
    assert parse_pair("bsdp+arts+adaptive") == ("bsdp", "arts")


def test_a_replay_re_partitions_with_the_block_or_an_adaptive_pair(tmp_path):
    from testbed.experiment.prepare import load_parts, prepare

    loaded = _load(tmp_path, repartition={"every": "10s", "threshold": "10%"})
    parts = load_parts(loaded)
    assert prepare(parts).adaptive and prepare(parts).pair == "bsdp+arts+adaptive"
    assert prepare(parts, "bsdp+arts+adaptive").adaptive
    static = prepare(parts, "bsdp+arts")  # a static pair replays the plan unchanged
    assert static.pair == "bsdp+arts" and not static.adaptive
    with pytest.raises(ConfigError) as err:  # +adaptive needs the block
        prepare(load_parts(_load(tmp_path)), "bsdp+arts+adaptive")
    assert "repartition" in str(err.value) and err.value.exit_code == 2


def test_confirm_waits_for_the_same_split_proposed_in_a_row():
    from testbed.cost.replan import Confirmation

    ok = Confirmation(2)
    checks = [{"reason": "r"} for _ in range(5)]
    assert not ok(True, (0, 0, 1, 4), checks[0])
    assert "1 of 2" in checks[0]["reason"] and checks[0]["migrate"] is False
    assert not ok(True, (0, 0, 2, 4), checks[1])  # another split: counts anew
    assert ok(True, (0, 0, 2, 4), checks[2])
    assert not ok(True, (0, 0, 1, 4), checks[3])
    assert not ok(False, (0, 1, 2, 4), checks[4])  # "keep" resets the count
    assert not ok(True, (0, 0, 1, 4), checks[4])
    assert Confirmation(1)(True, (0, 0, 1, 4), {"reason": ""})


def test_node_speeds_are_relative_to_the_median_and_only_when_clearly_off():
    from testbed.cost.replan import normalized_speed

    got = normalized_speed({"a": 0.05, "b": 0.06, "c": 0.2, "d": 0.01}, ["a", "b", "c", "d", "e"])
    # median 0.055: a, b within 2x -> 1; c 3.6x faster, d 5.5x slower count; e unseen -> 1
    assert got["a"] == got["b"] == got["e"] == 1.0
    assert got["c"] == pytest.approx(0.2 / 0.055) and got["d"] == pytest.approx(0.01 / 0.055)
    assert normalized_speed({}, ["a"]) == {}


def test_the_link_meter_reads_bandwidth_from_prefill_over_decode_transfers():

    from testbed.experiment.adaptive import LinkMeter
    from testbed.metrics.records import Span

    edge, fog = TOPO.tiers[0].nodes[0].name, TOPO.tiers[1].nodes[0].name

    def hops(t: float, prefill_s: float) -> list[Span]:
        spans = [Span("transfer", edge, t, t + prefill_s, 1, 1, "prefill", 0, peer=fog,
                      nbytes=1_000_000)]  # fmt: skip
        return spans + [
            Span("transfer", edge, t, t + 0.010 + 0.001 * (i % 3), 1, 1, "decode", i, peer=fog,
                 nbytes=10_000)
            for i in range(1, 10)
        ]  # fmt: skip

    meter = LinkMeter(TOPO)
    nominal = TOPO.uplink(0).bandwidth_bps  # type: ignore[union-attr]
    links, seen = meter.measure(0.0)  # nothing seen yet: the topology's links
    assert links[0].bandwidth_bps == nominal and [s["measured"] for s in seen] == [False, False]
    meter.observe(hops(1.0, 0.011 + 0.8))  # 990 kB in 0.8 s more than a decode: ~9.9 Mbit/s
    links, seen = meter.measure(0.0)
    assert links[0].bandwidth_bps == pytest.approx(8 * 990_000 / 0.8, rel=0.01)
    assert seen[0]["measured"] and not seen[1]["measured"]
    links, _ = meter.measure(5.0)  # those transfers are too old, none newer: the estimate stays
    assert links[0].bandwidth_bps == pytest.approx(8 * 990_000 / 0.8, rel=0.01)
    meter.observe(hops(6.0, 0.0115))  # within the decode steps' jitter: no slowdown shows
    links, _ = meter.measure(5.0)
    assert links[0].bandwidth_bps == nominal


def test_the_link_meter_sees_a_drop_one_interval_after_it():
    from testbed.experiment.adaptive import LinkMeter
    from testbed.metrics.records import Span

    edge, fog = TOPO.tiers[0].nodes[0].name, TOPO.tiers[1].nodes[0].name

    def hops(t: float, prefill_s: float, prefills: int = 1) -> list[Span]:
        spans = [Span("transfer", edge, t + i, t + i + prefill_s, 1, 1, "prefill", 0, peer=fog,
                      nbytes=1_000_000) for i in range(prefills)]  # fmt: skip
        return spans + [
            Span("transfer", edge, t + i / 10, t + i / 10 + 0.010 + 0.001 * (i % 3), 1, 1,
                 "decode", i, peer=fog, nbytes=10_000)
            for i in range(1, 10)
        ]  # fmt: skip

    nominal = TOPO.uplink(0).bandwidth_bps  # type: ignore[union-attr]
    meter = LinkMeter(TOPO)
    meter.observe(hops(1.0, 0.0115, prefills=3))  # 0-10 s: the link as configured
    meter.observe(hops(11.0, 0.011 + 0.8))  # 10-20 s: dropped, one prefill so far
    links, seen = meter.measure(0.0, recent_s=10.0)
    assert links[0].bandwidth_bps == pytest.approx(8 * 990_000 / 0.8, rel=0.01)
    assert seen[0]["since_s"] == 10.0
    # over both intervals the three fast prefills outvote the slow one: no drop shows
    both = LinkMeter(TOPO)
    both.observe(hops(1.0, 0.0115, prefills=3) + hops(11.0, 0.011 + 0.8))
    links, seen = both.measure(0.0)
    assert links[0].bandwidth_bps == nominal and seen[0]["since_s"] == 0.0
    # no prefill in the last interval: the two-interval window decides
    quiet = LinkMeter(TOPO)
    quiet.observe(hops(1.0, 0.011 + 0.8) + hops(11.0, 0.011 + 0.8, prefills=0))
    links, seen = quiet.measure(0.0, recent_s=10.0)
    assert links[0].bandwidth_bps == pytest.approx(8 * 990_000 / 0.8, rel=0.01)
    assert seen[0]["since_s"] == 0.0


def test_the_link_meter_of_a_dilated_run_measures_on_the_emulated_clock():
    from testbed.experiment.adaptive import LinkMeter
    from testbed.metrics.records import Span

    edge, fog = TOPO.tiers[0].nodes[0].name, TOPO.tiers[1].nodes[0].name
    k = 4.0  # every transfer took k times as long on links k times slower
    spans = [Span("transfer", edge, k * 1.0, k * 1.811, 1, 1, "prefill", 0, peer=fog,
                  nbytes=1_000_000)]  # fmt: skip
    spans += [
        Span("transfer", edge, k * 1.0, k * (1.010 + 0.001 * (i % 3)), 1, 1, "decode", i,
             peer=fog, nbytes=10_000)
        for i in range(1, 10)
    ]  # fmt: skip
    meter = LinkMeter(TOPO, k)
    meter.observe(spans)
    links, _ = meter.measure(0.5)  # since 0.5 s of the emulated clock (2 s of real time)
    assert links[0].bandwidth_bps == pytest.approx(8 * 990_000 / 0.8, rel=0.01)
    _, seen = meter.measure(1.5)  # they started at 1.0 s of the emulated clock: too old now
    assert seen[0]["samples"] == 0


def test_a_replay_refuses_what_it_cannot_re_partition_before_a_testbed_comes_up():
    from testbed.experiment.adaptive import check_adaptive

    check_adaptive("s.yaml", "local")
    check_adaptive("s.yaml", "docker")
    with pytest.raises(ConfigError) as err:
        check_adaptive("s.yaml", "swarm")
    assert "not swarm" in str(err.value) and "s.yaml" in str(err.value)
    assert err.value.exit_code == 2
