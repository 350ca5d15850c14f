"""`testbed fidelity` on an emulated paper-scale run: Llama-3-8B (float16, 32 blocks)
emulated on three tiers with the links of topologies/three-tier.yaml, replayed with `--runtime
local` at time dilation 5, then simulated with the emulated devices' own timing (the same cost
model; nothing fitted to the stand-in). The simulator must reproduce the run within the issue's
tolerances: median E2E 10 %, p99 E2E 20 %, every node's utilisation 10 points.

Each tier has one of three-tier.yaml's Jetson-class devices (Orin Nano, AGX Orin 32GB, AGX Orin
64GB): their windows (3-9 ms per block and decode step, x 5) hold the stand-in's real work
(1.5-2.5 ms per block, several times that on a busy shared host), so the run keeps its timing
(few overruns) even when other jobs load this 2-core machine. The fog and cloud GPUs' windows
(0.3-0.7 ms per block) would need a dilation of 20-30 here, and a test 4-6x longer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from testbed.sim.fidelity import Tolerances
from tests.factories import REPO, shipped_scenario
from tests.runs import replay_and_score

pytestmark = [
    pytest.mark.model,
    pytest.mark.slow,
    pytest.mark.timeout(420),
    # the local runtime starts detached stage processes and drops their Popen handles on
    # purpose (they outlive `testbed up`); Python warns about that in the launching process
    pytest.mark.filterwarnings("ignore:subprocess .* is still running:ResourceWarning"),
]

REQUESTS = 10  # the first 10 requests of the shipped window, 2x denser than the trace
DILATION = 5.0  # the host gets 5x the emulated time per step


def _jetson_tiers(tmp: Path) -> Path:
    """three-tier.yaml (its tiers' LANs and links) with one Jetson-class node per tier."""
    data = yaml.safe_load((REPO / "topologies" / "three-tier.yaml").read_text())
    edge = {n["name"]: n for n in data["tiers"][0]["nodes"]}
    nodes = [
        {**edge["edge-nano"], "name": "edge-nano"},
        {**edge["edge-agx-2"], "name": "fog-agx"},
        {**edge["edge-agx-1"], "name": "cloud-agx"},
    ]
    for tier, node in zip(data["tiers"], nodes, strict=True):
        tier["nodes"] = [node]
    data["name"] = "jetson-tiers"
    path = tmp / "jetson-tiers.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def state_dir(module_state_dir: Path) -> Path:
    return module_state_dir


@pytest.fixture(scope="module")
def scored(state_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One short emulated run (brought up and down), and its fidelity."""
    tmp = tmp_path_factory.mktemp("fidelity-emulated")
    workload = {
        "max_requests": REQUESTS,
        "max_prompt_tokens": 128,
        "max_output_tokens": 8,
        "time_scale": 0.5,  # about 2.1 req/s: every node 45-57 % busy, with batches
    }
    scenario = shipped_scenario(
        tmp,
        "paper-llama3-8b",
        topology=_jetson_tiers(tmp),
        workload=workload,
        runtime="local",
        dilation=DILATION,
        compare=[],
    )
    return replay_and_score(scenario, state_dir, REQUESTS)


def test_the_emulated_run_is_simulated_with_its_devices_timing(scored: Any) -> None:
    run, res, _, table = scored
    cfg = json.loads((run.out_dir / "config.json").read_text())
    assert cfg["model_profile"]["arch"]["name"] == "llama-3-8b"
    assert cfg["model_profile"]["dtype"] == "float16"
    assert res.timing == "emulated" and not res.in_sample and res.profile_source == ""
    assert res.cost_source == cfg["cost_source"] == "roofline"
    assert res.dilation == DILATION
    # the transport's cost per call on the emulated clock: host milliseconds / 5, net of what
    # the simulator's links charge (clipped at 0: since the broker's per-step path got leaner,
    # the expected-loss delay the link model charges on edge->fog, which the app shaper does
    # not add, can exceed it); never more than a few ms
    assert 0 <= res.hop_overhead_s < 0.01, table
    assert set(res.sim["node_utilisation"]) == {"edge-nano", "fog-agx", "cloud-agx"}


def test_the_simulator_reproduces_the_emulated_run(scored: Any) -> None:
    """The issue's tolerances, asserted: median E2E 10 %, p99 20 %, utilisation 10 points."""
    _, res, by, table = scored
    assert Tolerances() == Tolerances(0.10, 0.20, 0.10)
    assert by["e2e p50"].ok and by["e2e p99"].ok, table
    assert all(c.ok for c in res.checks if c.metric.startswith("util")), table
    assert res.ok and by["completed"].sim == REQUESTS, table


def test_the_command_writes_fidelity_json_and_strict_follows_the_verdict(scored: Any) -> None:
    from testbed.cli.main import main

    def code(*argv: str) -> int:
        try:
            main(["fidelity", *argv])
        except SystemExit as exc:
            return int(exc.code or 0)
        return 0

    run, res, by, _ = scored
    assert code(str(run.out_dir), "--strict") == (0 if res.ok else 1)
    data = json.loads((run.out_dir / "fidelity.json").read_text())
    assert data["passed"] == res.ok and data["timing"] == "emulated"
    assert data["dilation"] == DILATION and not data["in_sample"]
    assert data["hop_overhead_s"] == pytest.approx(res.hop_overhead_s)
    assert {c["metric"] for c in data["checks"]} == set(by)
    assert code(str(run.out_dir), "-o", str(run.out_dir / "f2.json")) == 0  # no --strict: 0
    assert json.loads((run.out_dir / "f2.json").read_text())["checks"] == data["checks"]
