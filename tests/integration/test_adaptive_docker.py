"""Adaptive re-partitioning in a replay on containers (the Docker runtime, kernel shaping): the
edge -> fog link drops, the run re-plans around it, every stage loads its new range beside
the old one over the same HTTP call as locally, and every request completes."""

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


def test_an_adaptive_replay_on_containers_re_plans_and_completes_every_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docker = pytest.importorskip("docker")
    try:
        docker.from_env(timeout=30).ping()
    except docker.errors.DockerException as exc:
        pytest.skip(f"Docker not reachable: {exc}")
    if os.geteuid() != 0:
        pytest.skip("shaping container namespaces needs root")
    monkeypatch.setenv("TESTBED_STATE_DIR", str(tmp_path / "state"))
    data = yaml.safe_load((REPO / "scenarios" / "tiny-bandwidth-drop.yaml").read_text())
    data["topology"] = str(REPO / "topologies" / "tiny-fog2.yaml")
    data["workload"].update(rate_rps=2.0, num_requests=16, prompt_tokens=48)
    data["duration"] = "12s"
    data["timeline"] = [{"at": "2s", "link": "edge->fog", "bandwidth": "200kbit"}]
    data["repartition"] = {"every": "2s", "threshold": "10%"}
    data["output"] = str(tmp_path / "results")
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(data))
    opts = ReplayOptions(up=True, progress=False, health_timeout_s=300)
    run = asyncio.run(replay_scenario(load_scenario(path), opts, Console(stderr=True)))
    assert run.label == "bsdp+arts+adaptive"
    assert len(run.records) == 16 and all(r.status == "completed" for r in run.records), [
        r.reason for r in run.records
    ]
    summary = json.loads((run.out_dir / "summary.json").read_text())["run"]
    m = summary["repartition"]["migrations"][0]
    assert "failed" not in m and m["new_cuts"][1] == 0, m  # the edge tier emptied
    assert m["drained_s"] >= m["switched_s"]
    assert all(len(v["generations"]) == 2 for v in m["overlap_memory"].values()), m
    assert any(e["kind"] == "replan" for e in summary["timeline"])
    late = [r for r in run.records if r.arrival_s > m["switched_s"] + 0.1]
    assert all("edge-1" not in r.route for r in late)
