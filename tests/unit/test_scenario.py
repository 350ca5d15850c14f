"""Scenario files: the shipped ones load; mistakes are explained with file, field and fix."""

from __future__ import annotations

import pytest

from testbed.errors import ConfigError
from testbed.spec.scenario import load_scenario, parse_pair
from tests.factories import REPO, scenario_dict, topology_dict, write_yaml


def test_shipped_scenarios_load():
    for path in sorted((REPO / "scenarios").glob("*.yaml")):
        scn = load_scenario(path)
        assert scn.topology_path.exists()


def test_valid_scenario_fields(tmp_path):
    write_yaml(tmp_path / "topo.yaml", topology_dict())
    p = write_yaml(
        tmp_path / "s.yaml",
        scenario_dict(
            slo={"ttft": "2s", "tpot": "100ms"},
            duration="2min",
            compare=["bsdp+arts", "even+round_robin"],
        ),
    )
    scn = load_scenario(p)
    assert scn.spec.slo.ttft_s == 2.0 and scn.spec.slo.tpot_s == pytest.approx(0.1)
    assert scn.spec.duration_s == 120 and scn.spec.scheduler.params == {"alpha": 0.3}
    assert scn.workload.kind == "synthetic"


CASES = [
    (
        "unknown partitioner",
        {"partitioner": "bsdq"},
        ["partitioner", "unknown partitioner 'bsdq'", "did you mean 'bsdp'"],
    ),
    (
        "unknown scheduler parameter",
        {"scheduler": {"name": "arts", "params": {"alpah": 1}}},
        ["scheduler", "no parameter 'alpah'", "alpha"],
    ),
    (
        "typo in a key",
        {"sheduler": "arts"},
        ["unknown field 'sheduler'", "did you mean 'scheduler'"],
    ),
    ("slo without unit", {"slo": {"ttft": "2"}}, ["slo.ttft", "no unit"]),
    ("missing topology file", {"topology": "nope.yaml"}, ["topology", "not found"]),
    ("unknown model", {"model": "phi-4-giant"}, ["model", "neither a preset"]),
    ("bad compare pair", {"compare": ["bsdp-arts"]}, ["compare", "PARTITIONER+SCHEDULER"]),
    (
        "unknown policy in compare",
        {"compare": ["bsdp+artz"]},
        ["compare[0]", "did you mean 'arts'"],
    ),
    (
        "workload of unknown kind",
        {"workload": {"kind": "azur", "path": "x.csv"}},
        ["workload", "kind"],
    ),
    ("negative request count", {"requests": -3}, ["requests", "greater than 0"]),
    (
        "unknown runtime",
        {"runtime": "kubernetes"},
        ["runtime", "'kubernetes' is not a runtime", "swarm"],
    ),
]


@pytest.mark.parametrize(("what", "over", "words"), CASES, ids=[c[0] for c in CASES])
def test_wrong_scenarios_are_explained(tmp_path, what, over, words):
    write_yaml(tmp_path / "topo.yaml", topology_dict())
    d = scenario_dict(**over)
    p = write_yaml(tmp_path / "s.yaml", d)
    with pytest.raises(ConfigError) as info:
        load_scenario(p)
    msg = str(info.value)
    assert "s.yaml" in msg, msg
    for w in words:
        assert w in msg, f"{what}: {w!r} not in {msg!r}"


def test_topology_errors_inside_a_scenario_name_the_topology_file(tmp_path):
    bad = topology_dict()
    bad["links"][0]["bandwidth"] = "fast"
    write_yaml(tmp_path / "topo.yaml", bad)
    with pytest.raises(ConfigError, match=r"topo\.yaml: links\[0\]\.bandwidth"):
        load_scenario(write_yaml(tmp_path / "s.yaml", scenario_dict()))


def test_parse_pair():
    assert parse_pair("bsdp+arts") == ("bsdp", "arts")
    with pytest.raises(ConfigError):
        parse_pair("bsdp")
