"""`testbed replay --up --runtime docker`: the shipped tiny-azure window through one container per
node on shaped links; every request completes, the results record the shaping backend, and
`down` leaves no container behind."""

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


def test_replay_through_containers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    client = docker_or_skip()
    monkeypatch.setenv("TESTBED_STATE_DIR", str(tmp_path / "state"))
    data = yaml.safe_load((REPO / "scenarios" / "tiny-azure.yaml").read_text())
    data["topology"] = str(REPO / "topologies" / "tiny.yaml")
    data["workload"]["path"] = str(REPO / "scenarios" / "traces" / "azure-conv-2023-head1000.csv")
    data["workload"].update(max_requests=6, rate_scale=3.0, max_output_tokens=6)
    data["output"] = str(tmp_path / "results")
    data["runtime"] = "docker"
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(data))
    loaded = load_scenario(path)
    opts = ReplayOptions(up=True, progress=False, health_timeout_s=300)
    run = asyncio.run(replay_scenario(loaded, opts, Console(stderr=True)))
    assert run.summary.completed == 6, [r.reason for r in run.records]
    want = sum(r.output_tokens for r in run.records)
    assert run.summary.output_tokens == want
    for r in run.records:
        assert len(r.itl_s) == r.output_tokens - 1 and r.ttft_s <= r.e2e_s  # type: ignore[operator]
        # each hop pays at least the configured round trip (5 ms and 10 ms one way) per step
        assert r.hop_transfer_s[f"{r.route[0]}->fog-1"] >= 0.008 * r.output_tokens
        assert r.hop_transfer_s["fog-1->cloud-1"] >= 0.018 * r.output_tokens
    cfg = json.loads((run.out_dir / "config.json").read_text())
    assert cfg["testbed"]["runtime"] == "docker"
    assert cfg["testbed"]["shaping"] in ("kernel", "kernel-rate+app-delay")
    assert cfg["versions"]["docker_engine"]
    label = f"testbed.run={cfg['testbed']['run_id']}"  # only ours: other runs may be live
    left = client.containers.list(all=True, filters={"label": label})
    assert left == [], [c.name for c in left]
