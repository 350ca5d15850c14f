"""One preparation path for `replay` and `simulate` (testbed.experiment.prepare)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from testbed.errors import ConfigError
from testbed.experiment.prepare import load_parts, prepare
from testbed.sim.run import prepare_sim
from testbed.sim.steps import CalibratedProfile, StepFit
from testbed.spec.scenario import LoadedScenario, load_scenario
from tests.factories import REPO

TINY = REPO / "scenarios" / "tiny-azure.yaml"


def _tiny_with(tmp_path: Path, **changes: object) -> LoadedScenario:
    data = yaml.safe_load(TINY.read_text())
    data.update(
        topology=str(TINY.parent / data["topology"]),
        workload=data["workload"] | {"path": str(TINY.parent / data["workload"]["path"])},
        **changes,
    )
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    return load_scenario(tmp_path / "s.yaml")


def test_replay_and_simulate_get_the_same_plan_and_requests(tmp_path: Path) -> None:
    from testbed.experiment.models import ensure_tiny_model

    # the weights' own config on both paths (`model: tiny` alone simulates the tiny preset)
    loaded = _tiny_with(tmp_path, model_dir=str(ensure_tiny_model()))
    replay = prepare(loaded, "bsdp+arts", 12)
    sim = prepare_sim(loaded, "bsdp+arts", 12)
    assert sim.prep.plan == replay.plan and sim.prep.requests == replay.requests
    assert sim.prep.pair == replay.pair == "bsdp+arts"
    assert replay.model_dir is not None and sim.prep.model_dir is None  # no weights to simulate
    assert [s.nodes for s in sim.layout.stages] == [s.nodes for s in replay.plan.active_stages()]


def test_a_preset_simulates_without_weights_but_does_not_replay() -> None:
    loaded = load_scenario(REPO / "scenarios" / "paper-phi3-medium.yaml")
    parts = load_parts(loaded, simulate=True)
    assert parts.simulated and parts.profile.arch.num_blocks == 40
    prep = prepare(parts, "even+round_robin", 3)
    assert prep.serve_args is None and prep.dilation == 1.0  # the studied model, in real time
    with pytest.raises(ConfigError, match="prepared to simulate"):
        _ = prep.weights
    with pytest.raises(ConfigError, match="loaded for a replay"):
        prepare_sim(load_parts(load_scenario(TINY)))


def test_a_calibrated_profile_plans_the_simulation_and_is_refused_by_replay(
    tmp_path: Path,
) -> None:
    loaded = load_scenario(TINY)
    base = prepare_sim(loaded, "bsdp+arts")
    node = base.layout.stages[-1].nodes[0]
    fits = {node: StepFit(fixed_s=50.0, per_token_s=0.0, per_context_s=0.0, blocks=1)}
    (tmp_path / "p.json").write_text(CalibratedProfile(nodes=fits).model_dump_json())
    cal = _tiny_with(tmp_path, profile="p.json")
    sim = prepare_sim(cal, "bsdp+arts")
    assert sim.prep.calibrated is not None and sim.prep.calibrated.nodes == fits
    # the planner read the calibrated times: the very slow node's tier holds fewer blocks
    tier = base.layout.stages[-1].tier
    held = {st.tier: st.end - st.start for st in sim.prep.plan.stages}
    assert held[tier] < {st.tier: st.end - st.start for st in base.prep.plan.stages}[tier]
    with pytest.raises(ConfigError, match="testbed calibrate"):
        prepare(cal, "bsdp+arts")
