"""`testbed plan / list / check` as a user runs them (in-process, through the real entry point)."""

from __future__ import annotations

import json

import pytest

from testbed.cli.main import main
from tests.factories import REPO, topology_dict, write_yaml


def run(capsys, *argv):
    code = 0
    try:
        main(list(argv))
    except SystemExit as exc:
        code = exc.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_table(capsys):
    code, out, _ = run(
        capsys, "plan", str(REPO / "topologies/three-tier.yaml"), "--model", "phi-3-medium"
    )
    assert code == 0
    for word in ("edge", "fog", "cloud", "bottleneck", "replicas", "memory used / available"):
        assert word in out


def test_plan_json_matches_partitioner(capsys):
    code, out, _ = run(
        capsys,
        "plan",
        str(REPO / "topologies/tiny.yaml"),
        "--model",
        "tiny",
        "--json",
        "--partitioner",
        "even",
    )
    assert code == 0
    data = json.loads(out)
    assert data["partitioner"]["name"] == "even"
    assert [s["end"] - s["start"] for s in data["stages"]] == [2, 1, 1]
    assert data["cuts"] == [0, 2, 3, 4]


def test_plan_param(capsys):
    code, out, _ = run(
        capsys,
        "plan",
        str(REPO / "topologies/tiny.yaml"),
        "--model",
        "tiny",
        "--json",
        "-p",
        "include_transfer=false",
    )
    assert code == 0 and json.loads(out)["include_transfer"] is False


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["plan", "nope.yaml"], ["not found"]),
        (["plan", "{topo}", "--partitioner", "gpipe"], ["unknown partitioner 'gpipe'", "even"]),
        (["plan", "{topo}", "-p", "allow_empty"], ["KEY=VALUE"]),
        (["plan", "{topo}", "-p", "speed=3"], ["no parameter 'speed'"]),
        (["plan", "{bad}"], ["links[0].delay"]),
        (["plan", "{topo}", "--model", "llama-3-8b"], ["fits memory"]),
        (["list", "widgets"], ["cannot list"]),
    ],
)
def test_bad_input_exits_2_with_message(capsys, tmp_path, argv, words):
    small = topology_dict(device={"base": "cpu-core", "mem": "64MiB"})
    write_yaml(tmp_path / "topo.yaml", small)
    bad = topology_dict()
    bad["links"][0]["delay"] = "soon"
    write_yaml(tmp_path / "bad.yaml", bad)
    argv = [a.format(topo=tmp_path / "topo.yaml", bad=tmp_path / "bad.yaml") for a in argv]
    code, out, err = run(capsys, *argv)
    assert code == 2, (out, err)
    for w in words:
        assert w in err, err
    assert "Traceback" not in err


def test_list_registries(capsys):
    code, out, _ = run(capsys, "list", "--json")
    assert code == 0
    data = json.loads(out)
    assert {"bsdp", "even", "heft"} <= {p["name"] for p in data["partitioners"]}
    assert {"arts", "round_robin", "jsq", "random", "heft"} <= {
        s["name"] for s in data["schedulers"]
    }
    assert "phi-3-medium" in data["models"]


def test_check_scenario(capsys):
    code, out, _ = run(capsys, "check", str(REPO / "scenarios/tiny-azure.yaml"))
    assert code == 0 and "ok scenario tiny-azure" in out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["plan"], "Missing argument"),
        (["plan", "topologies/tiny.yaml", "--bogus"], "No such option: --bogus"),
        (["nosuch"], "No such command 'nosuch'"),
        (["plan", "topologies/tiny.yaml", "--prompt-tokens", "0"], "--prompt-tokens"),
        (["model"], "Missing command"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(capsys, argv, needle):
    code, _out, err = run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: testbed") and needle in lines[0]
    assert "Traceback" not in err


@pytest.mark.parametrize("argv", [[], ["--help"], ["plan", "--help"]])
def test_help_exits_0(capsys, argv):
    code, out, _ = run(capsys, *argv)
    assert code == 0
    assert "Usage" in out


def test_plan_reports_capacity_and_says_what_the_bottleneck_counts(capsys):
    topo = str(REPO / "topologies/three-tier.yaml")
    code, out, _ = run(capsys, "plan", topo, "--model", "phi-3-medium", "--json")
    assert code == 0
    cap = json.loads(out)["capacity"]
    assert cap["bottleneck"] == "tier cloud" and 0 < cap["capacity_rps"] < 10
    assert cap["capacity_rps"] == min(v for v in cap["resources_rps"].values() if v is not None)
    code, out, _ = run(capsys, "plan", topo, "--model", "phi-3-medium")
    text = " ".join(out.split())  # rich wraps the caption
    assert "(compute + transfer;" in text and "capacity " in text and "req/s" in text
    code, out, _ = run(
        capsys, "plan", topo, "--model", "phi-3-medium", "-p", "include_transfer=false"
    )
    text = " ".join(out.split())
    assert code == 0 and "compute + transfer" not in text
    assert "(compute only: this partitioner did not count transfer)" in text
