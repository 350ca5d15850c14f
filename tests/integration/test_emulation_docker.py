"""`execution: emulated` in Docker: the paper scenario's topology (Phi-3-medium on Jetsons, RTX
3090s, A10, A100s) for a few short requests; every request completes, the results carry the
pacing fidelity (time dilation 10, recorded), and overruns stay rare.

The issue's target is under 1 % of windows. On this project's 2-core machine, at dilation 10,
9 of 96 windows overran (9.4 %: each node's first steps pay torch's lazy initialisation), so
this test only guards against a broken pacer (most windows overrunning: 76 % was seen without
dilation under load); benchmarks/bench_emulation.py reports the figure against the 1 % target,
and the gap is open work (a warm-up step before a stage reports healthy)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from testbed.experiment.replay import ReplayOptions, replay_scenario
from testbed.spec.scenario import load_scenario

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.docker, pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(900)]


def _docker() -> None:
    docker = pytest.importorskip("docker")
    try:
        docker.from_env(timeout=30).ping()
    except docker.errors.DockerException as exc:
        pytest.skip(f"Docker not reachable: {exc}")
    if os.geteuid() != 0:
        pytest.skip("shaping container namespaces needs root")


def test_emulated_replay_through_containers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    _docker()
    monkeypatch.setenv("TESTBED_STATE_DIR", str(tmp_path / "state"))
    data = yaml.safe_load((REPO / "scenarios" / "paper-phi3-medium.yaml").read_text())
    data["topology"] = str(REPO / "topologies" / "three-tier.yaml")
    data["workload"]["path"] = str(REPO / "scenarios" / "traces" / "azure-conv-2023-head1000.csv")
    # 4 short requests as recorded (time_scale 1); time dilation 10 gives a 2-core host ten
    # times the real time per emulated step (the results are on the emulated clock)
    data["workload"].update(max_requests=4, max_output_tokens=8, time_scale=1.0)
    data["dilation"] = 10
    data["output"] = str(tmp_path / "results")
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(data))
    loaded = load_scenario(path)
    opts = ReplayOptions(up=True, progress=False, health_timeout_s=600)  # 8 containers
    run = asyncio.run(replay_scenario(loaded, opts, Console(stderr=True)))
    assert run.summary.completed == 4, [r.reason for r in run.records]
    em = run.emulation
    assert em is not None
    # one paced window per step, or per continuous batch of steps
    steps = sum(r.output_tokens for r in run.records) * len(run.records[0].route)
    assert 0 < em["steps"] <= steps
    assert em["dilation"] == 10
    # warmed-up stages at dilation 10: 0 of 96 windows overran here under load 7 (9.4 % before
    # the warm-up); allow 2 for a noisy host, the target of 1 % is the benchmark's
    assert em["overrun_fraction"] < 0.03, em
    summary = json.loads((run.out_dir / "summary.json").read_text())
    assert summary["emulation"]["steps"] == em["steps"]
    assert summary["load"]["bottleneck_utilisation"] < 1
    cfg = json.loads((run.out_dir / "config.json").read_text())
    assert cfg["scenario"]["execution"] == "emulated"
    assert all(n["device"].startswith("emulated ") for n in cfg["testbed"]["nodes"])
    import docker

    run_id = cfg["testbed"]["run_id"]
    left = docker.from_env().containers.list(all=True, filters={"label": f"testbed.run={run_id}"})
    assert left == [], [c.name for c in left]
