"""Per-node max_batch: validated in topology and scenario files, resolved by precedence
(--max-batch > the node's > the scenario's > the component's default), passed by the runtimes
to every stage server, honoured per node by the simulator."""

from __future__ import annotations

from dataclasses import replace

import pytest

from testbed.errors import ConfigError
from testbed.runtime.base import NodeEndpoint, RunningTestbed, stage_serve_argv
from testbed.sim.engine import SimConfig
from testbed.sim.run import SimSetup, prepare_sim, simulate
from testbed.spec.batching import node_max_batch, with_max_batch
from testbed.spec.scenario import load_scenario
from testbed.spec.timeline import TimelineEvent
from testbed.spec.topology import Topology, load_topology, topology_from_dict
from testbed.workload.request import TraceRequest
from tests.factories import REPO, scenario_dict, topology_dict, write_yaml


def _topo_with(value: object) -> dict:
    d = topology_dict()
    d["tiers"][0]["nodes"][1]["max_batch"] = value
    return d


def test_a_node_sets_its_max_batch_and_count_copies_it(tmp_path) -> None:
    d = _topo_with(8)
    d["tiers"][1]["nodes"] = [{"name": "fog", "device": "a10", "count": 2, "max_batch": 2}]
    topo = load_topology(write_yaml(tmp_path / "t.yaml", d))
    got = {n.name: n.max_batch for _, n in topo.nodes()}
    assert got["edge-1"] == 8 and got["edge-0"] is None
    assert got["fog-1"] == got["fog-2"] == 2


@pytest.mark.parametrize("bad", [0, -3, 5000, "8", 2.5, True])
def test_a_bad_node_max_batch_names_file_field_and_fix(tmp_path, bad) -> None:
    path = write_yaml(tmp_path / "t.yaml", _topo_with(bad))
    with pytest.raises(ConfigError) as info:
        load_topology(path)
    msg = str(info.value)
    assert str(path) in msg and "tiers[0].nodes[1].max_batch" in msg, msg
    assert "write e.g. max_batch: 8" in msg and "1 to 4096" in msg, msg
    assert info.value.exit_code == 2


def test_a_bad_scenario_max_batch_is_explained(tmp_path) -> None:
    write_yaml(tmp_path / "topo.yaml", topology_dict())
    path = write_yaml(tmp_path / "s.yaml", scenario_dict(max_batch=0))
    with pytest.raises(ConfigError) as info:
        load_scenario(path)
    msg = str(info.value)
    assert str(path) in msg and "max_batch" in msg and "write e.g." in msg, msg
    assert info.value.exit_code == 2
    ok = load_scenario(write_yaml(tmp_path / "s.yaml", scenario_dict(max_batch=6)))
    assert ok.spec.max_batch == 6


def test_precedence_override_then_node_then_scenario() -> None:
    topo = topology_from(edge_1=8)
    assert node_max_batch(topo)["edge-1"] == 8 and node_max_batch(topo)["edge-0"] is None
    by_default = node_max_batch(topo, default=4)
    assert by_default["edge-1"] == 8 and by_default["edge-0"] == by_default["cloud-1"] == 4
    assert set(node_max_batch(topo, default=4, override=2).values()) == {2}
    written = with_max_batch(topo, default=4)
    assert {n.name: n.max_batch for _, n in written.nodes()} == by_default
    assert written.links == topo.links and written.tier_names == topo.tier_names


def topology_from(**nodes: int) -> Topology:
    """The factory topology with max_batch set on the nodes named (edge_1=8: edge-1)."""
    d = topology_dict()
    for tier in d["tiers"]:
        for n in tier["nodes"]:
            if n["name"].replace("-", "_") in nodes:
                n["max_batch"] = nodes[n["name"].replace("-", "_")]
    return topology_from_dict(d)


def test_stage_server_command_line_carries_the_node_value() -> None:
    argv = stage_serve_argv(["tb"], "/m", (0, 2), host="h", port=1, name="n", max_batch=3)
    assert argv[argv.index("--max-batch") + 1] == "3"
    emulated = stage_serve_argv(
        ["tb"], "/m", (0, 2), host="h", port=1, name="n", extra=["--emulate", "{}"], max_batch=5
    )
    assert "--emulate" in emulated and emulated[emulated.index("--max-batch") + 1] == "5"
    assert "--max-batch" not in stage_serve_argv(["tb"], "/m", (0, 2), host="h", port=1, name="n")


def test_the_endpoint_keeps_it_across_a_saved_state() -> None:
    ep = NodeEndpoint("n", "edge", 0, "http://x:1", 0, 2, "cpu", "x", 1, max_batch=6)
    tb = RunningTestbed("tb1", "local", "app", "t.yaml", "t", "/m", {"n": ep})
    assert RunningTestbed.from_json(tb.to_json()).nodes["n"].max_batch == 6
    old = tb.to_json()
    del old["nodes"]["n"]["max_batch"]  # a state file written before the field
    assert RunningTestbed.from_json(old).nodes["n"].max_batch is None


def test_replay_prepares_the_resolved_topology(tmp_path) -> None:
    """What `replay` hands the runtime: every node's value (its own, else the scenario's)."""
    from testbed.experiment.prepare import prepare

    d = load_yaml_shipped("tiny.yaml")
    d["tiers"][2]["nodes"][0]["max_batch"] = 8  # cloud-1
    write_yaml(tmp_path / "topo.yaml", d)
    sc = scenario_dict(max_batch=2)
    prep = prepare(load_scenario(write_yaml(tmp_path / "s.yaml", sc)))
    got = {n.name: n.max_batch for _, n in prep.topology.nodes()}
    assert got == {"edge-1": 2, "edge-2": 2, "fog-1": 2, "cloud-1": 8}


def load_yaml_shipped(name: str) -> dict:
    import yaml

    return yaml.safe_load((REPO / "topologies" / name).read_text())


# -- the simulator ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> SimSetup:
    d = tmp_path_factory.mktemp("mb")
    topo = load_yaml_shipped("tiny.yaml")
    topo["tiers"][2]["nodes"][0]["max_batch"] = 8  # cloud-1 batches, the others do not
    write_yaml(d / "topo.yaml", topo)
    sc = scenario_dict(partitioner="bsdp", scheduler="round_robin")
    setup = prepare_sim(load_scenario(write_yaml(d / "s.yaml", sc)))
    reqs = tuple(TraceRequest(i, 0.001 * i, 32, 8, source_row=i) for i in range(40))
    return replace(setup, prep=replace(setup.prep, requests=reqs))


def _batched_nodes(out) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """Node -> most steps that shared one compute window (the same start and end)."""
    windows: dict[tuple[str, float, float], int] = {}
    for r in out.records:
        for s in r.spans:
            if s.kind == "compute":
                key = (s.node, s.start_s, s.end_s)
                windows[key] = windows.get(key, 0) + 1
    most: dict[str, int] = {}
    for (node, _, _), k in windows.items():
        most[node] = max(most.get(node, 0), k)
    return most


def test_the_simulator_batches_each_node_up_to_its_own_value(tiny: SimSetup) -> None:
    most = _batched_nodes(simulate(tiny))
    assert 1 < most["cloud-1"] <= 8, most
    assert all(k == 1 for n, k in most.items() if n != "cloud-1"), most


def test_scenario_default_and_cli_override_in_the_simulator(tiny: SimSetup) -> None:
    spec = tiny.prep.loaded.spec.model_copy(update={"max_batch": 3})
    with_default = replace(
        tiny, prep=replace(tiny.prep, loaded=replace(tiny.prep.loaded, spec=spec))
    )
    most = _batched_nodes(simulate(with_default))
    assert 1 < most["cloud-1"] <= 8 and max(most["fog-1"], most["edge-1"]) == 3, most
    forced = _batched_nodes(simulate(with_default, config=SimConfig(max_batch=1)))
    assert set(forced.values()) == {1}, forced  # --max-batch 1 wins over node and scenario


def test_a_timeline_refuses_batching_with_the_fix(tiny: SimSetup) -> None:
    ev = (TimelineEvent.model_validate({"at": 0.01, "link": "edge->fog", "bandwidth": 1e6}),)
    spec = tiny.prep.loaded.spec.model_copy(update={"timeline": ev})
    timed = replace(tiny, prep=replace(tiny.prep, loaded=replace(tiny.prep.loaded, spec=spec)))
    with pytest.raises(ConfigError, match=r"cloud-1.*drop max_batch"):
        simulate(timed)
    assert simulate(timed, config=SimConfig(max_batch=1)).records  # overridden to 1: runs
