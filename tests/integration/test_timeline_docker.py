"""A timeline on containers: scenarios/tiny-node-failure.yaml shortened, with a link change
added. fog-1's container is killed mid-run and started again; every request completes or
fails with a reason, none is lost; the link change is made in place (tc change, no rebuild)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from testbed.experiment.replay import ReplayOptions, replay_scenario
from testbed.spec.scenario import load_scenario
from tests.dockerenv import docker_or_skip

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.docker, pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(900)]


def test_node_failure_and_link_change_on_containers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = docker_or_skip()
    monkeypatch.setenv("TESTBED_STATE_DIR", str(tmp_path / "state"))
    data = yaml.safe_load((REPO / "scenarios" / "tiny-node-failure.yaml").read_text())
    data["topology"] = str(REPO / "topologies" / "tiny-fog2.yaml")
    data["workload"].update(rate_rps=1.0, num_requests=16, output_tokens=8)
    data["duration"] = "20s"
    data["timeline"] = [
        {"at": "3s", "link": "edge->fog", "bandwidth": "10Mbit", "delay": "20ms"},
        {"at": "5s", "node": "fog-1", "down": "crash"},
        {"at": "9s", "node": "fog-1", "up": True},
    ]
    data["output"] = str(tmp_path / "results")
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(data))
    loaded = load_scenario(path)
    opts = ReplayOptions(up=True, progress=False, health_timeout_s=300)
    run = asyncio.run(replay_scenario(loaded, opts, Console(stderr=True)))
    recs = run.records
    assert len(recs) == 16  # none lost
    assert all(r.status == "completed" or r.reason for r in recs)
    assert sum(r.status == "completed" for r in recs) >= 14, [r.reason for r in recs]
    summary = json.loads((run.out_dir / "summary.json").read_text())
    assert [e["kind"] for e in summary["run"]["timeline"]] == ["link", "down", "up"]
    assert ("fog-1", False) in [(e.node, e.up) for e in run.result.node_events]
    late = [r for r in recs if r.arrival_s > 3.5 and r.status == "completed"]
    assert late and all(  # the new 20 ms one-way delay is paid on every hop into fog
        v >= 0.038 * r.output_tokens
        for r in late
        for k, v in r.hop_transfer_s.items()
        if k.endswith(("->fog-1", "->fog-2"))
    )
    cfg = json.loads((run.out_dir / "config.json").read_text())
    label = f"testbed.run={cfg['testbed']['run_id']}"  # only ours: other runs may be live
    left = client.containers.list(all=True, filters={"label": label})
    assert left == [], [c.name for c in left]
