"""Topology files: valid ones load; wrong ones, as a new user writes them, get helpful errors."""

from __future__ import annotations

import pytest

from testbed.errors import ConfigError
from testbed.spec.topology import load_topology
from tests.factories import REPO, topology_dict, write_yaml


@pytest.mark.parametrize("name", ["three-tier.yaml", "tiny.yaml"])
def test_shipped_topologies_load(name):
    topo = load_topology(REPO / "topologies" / name)
    assert [t.name for t in topo.tiers] == ["edge", "fog", "cloud"]
    assert topo.uplink(0) is not None and topo.uplink(2) is None
    for _, node in topo.nodes():
        assert node.device.mem > 0 and node.device.effective_flops > 0


def test_units_are_parsed_once(tmp_path):
    d = topology_dict(bandwidth="25Mbit", delay="7ms")
    d["links"][0].update(jitter="1ms", loss="0.5%")
    topo = load_topology(write_yaml(tmp_path / "t.yaml", d))
    link = topo.uplink(0)
    assert link.bandwidth_bps == 25e6 and link.delay_s == pytest.approx(0.007)
    assert link.jitter_s == pytest.approx(0.001) and link.loss_pct == pytest.approx(0.5)


def test_catalog_override_and_count(tmp_path):
    d = topology_dict()
    d["tiers"][0]["nodes"] = [
        {"name": "e", "device": {"base": "jetson-orin-nano", "mem": "4GiB"}, "count": 3}
    ]
    topo = load_topology(write_yaml(tmp_path / "t.yaml", d))
    nodes = topo.tiers[0].nodes
    assert [n.name for n in nodes] == ["e-1", "e-2", "e-3"]
    assert nodes[0].device.mem == 4 * 2**30 and nodes[0].device.kind == "gpu"


def _mutate(path_keys, value):
    def f(d):
        target = d
        for k in path_keys[:-1]:
            target = target[k]
        target[path_keys[-1]] = value
        return d

    return f


CASES = [
    # (what a user did, mutation, words the message must contain)
    (
        "typo in a link key",
        lambda d: (d["links"][0].update(bandwith=d["links"][0].pop("bandwidth")), d)[1],
        ["links[0]", "bandwith", "did you mean 'bandwidth'"],
    ),
    (
        "rate written as bytes word",
        _mutate(["links", 0, "bandwidth"], "10 megabytes"),
        ["links[0].bandwidth", "unknown rate unit", "100Mbit"],
    ),
    (
        "negative bandwidth",
        _mutate(["links", 0, "bandwidth"], -100),
        ["links[0].bandwidth", ">= 0"],
    ),
    (
        "zero bandwidth",
        _mutate(["links", 0, "bandwidth"], 0),
        ["links[0].bandwidth", "greater than 0"],
    ),
    (
        "delay without unit",
        _mutate(["links", 0, "delay"], "20"),
        ["links[0].delay", "no unit", "20ms"],
    ),
    (
        "link to a tier that does not exist",
        _mutate(["links", 0, "to"], "fgo"),
        ["tier 'fgo' does not exist", "did you mean 'fog'"],
    ),
    ("link skipping a tier", _mutate(["links", 1, "from"], "edge"), ["consecutive"]),
    (
        "missing link",
        lambda d: (d["links"].pop(), d)[1],
        ["no link between consecutive tiers", "fog -> cloud"],
    ),
    (
        "unknown device",
        _mutate(["tiers", 0, "nodes", 0, "device"], "rtx3090"),
        ["tiers[0].nodes[0].device", "did you mean 'rtx-3090'"],
    ),
    (
        "memory in wrong unit",
        _mutate(["tiers", 0, "nodes", 0, "device"], {"base": "a10", "mem": "24G"}),
        ["tiers[0].nodes[0].device.mem", "ambiguous", "GiB"],
    ),
    (
        "duplicate node names",
        _mutate(["tiers", 1, "nodes", 0, "name"], "edge-0"),
        ["unique", "edge-0"],
    ),
    ("no nodes", _mutate(["tiers", 0, "nodes"], []), ["tiers[0].nodes", "at least 1"]),
    (
        "jitter above delay",
        lambda d: (d["links"][0].update(jitter="50ms"), d)[1],
        ["jitter", "<= delay"],
    ),
    (
        "loss above 100%",
        lambda d: (d["links"][0].update(loss="150%"), d)[1],
        ["links[0].loss", "100%"],
    ),
    (
        "unknown top-level key",
        lambda d: (d.update(tier=[]), d)[1],
        ["unknown field 'tier'", "did you mean 'tiers'"],
    ),
    ("missing tiers", lambda d: (d.pop("tiers"), d)[1], ["tiers", "required field is missing"]),
    (
        "bad node name",
        _mutate(["tiers", 0, "nodes", 0, "name"], "Edge Node #1"),
        ["tiers[0].nodes[0].name"],
    ),
]


@pytest.mark.parametrize(("what", "mutate", "words"), CASES, ids=[c[0] for c in CASES])
def test_wrong_topologies_are_explained(tmp_path, what, mutate, words):
    path = write_yaml(tmp_path / "bad.yaml", mutate(topology_dict()))
    with pytest.raises(ConfigError) as info:
        load_topology(path)
    msg = str(info.value)
    assert str(path) in msg, msg
    for w in words:
        assert w in msg, f"{what}: {w!r} not in {msg!r}"
    assert isinstance(info.value, ValueError) and info.value.exit_code == 2


@pytest.mark.parametrize(
    ("content", "words"),
    [("", ["empty"]), ("- a\n- b\n", ["mapping"]), ("tiers: [\n", ["not valid YAML"])],
)
def test_unreadable_files(tmp_path, content, words):
    p = tmp_path / "x.yaml"
    p.write_text(content)
    with pytest.raises(ConfigError) as info:
        load_topology(p)
    for w in words:
        assert w in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_topology(tmp_path / "nope.yaml")


def test_a_bad_node_is_one_problem_not_also_an_empty_tier(tmp_path):
    """pydantic also reports a tuple with a failed item as too short ('Tuple should have at
    least 1 item after validation, not 0'): an echo of the real problem, not a second one."""
    d = topology_dict()
    d["tiers"][0]["nodes"] = [{**d["tiers"][0]["nodes"][0], "step_overhead": "1ms"}]
    with pytest.raises(ConfigError) as info:
        load_topology(write_yaml(tmp_path / "bad.yaml", d))
    msg = str(info.value)
    assert "tiers[0].nodes[0]: unknown field 'step_overhead'" in msg
    assert "problems" not in msg and "at least 1 item" not in msg, msg
    d = topology_dict()
    d["tiers"][0]["nodes"] = []  # an empty tier is still refused as such
    with pytest.raises(ConfigError, match=r"tiers\[0\]\.nodes: .*at least 1"):
        load_topology(write_yaml(tmp_path / "empty.yaml", d))
