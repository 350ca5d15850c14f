"""A timeline on an emulated, time-dilated run (local runtime): Llama-3-8B emulated on three
Jetson-class tiers at dilation 3, a node slowed to half its device's speed and a link cut to
20 Mbit/s with 50 ms one way mid-run. The events fire at their times on the emulated clock (k
times later in real time), the link change is dilated like the topology, the slowed device
takes twice its windows (paced by its stage, not by a CPU quota), and everything is recorded
back on the emulated clock."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import aiohttp
import pytest
from rich.console import Console

from testbed.experiment.lifecycle import bring_up, take_down
from testbed.experiment.prepare import prepare
from testbed.experiment.replay import replay_once
from testbed.runtime.interface import RUNTIMES
from testbed.spec.scenario import load_scenario
from tests.factories import shipped_scenario
from tests.integration.test_fidelity_emulated import _jetson_tiers

pytestmark = [
    pytest.mark.model,
    pytest.mark.slow,
    pytest.mark.timeout(420),
    pytest.mark.filterwarnings("ignore:subprocess .* is still running:ResourceWarning"),
]

SLOW_AT, LINK_AT = 4.0, 6.0
TIMELINE = [
    {"at": f"{SLOW_AT:g}s", "node": "cloud-agx", "speed": 0.5},
    {"at": f"{LINK_AT:g}s", "link": "fog->cloud", "bandwidth": "20Mbit", "delay": "50ms"},
]


async def test_events_on_the_emulated_clock_of_a_dilated_run(
    tmp_path: Path, module_state_dir: Path
) -> None:
    scenario = shipped_scenario(
        tmp_path,
        "paper-llama3-8b",
        topology=_jetson_tiers(tmp_path),
        workload={"max_requests": 14, "max_prompt_tokens": 64, "max_output_tokens": 8,
                  "time_scale": 1.0},
        runtime="local", dilation=3.0, compare=[], timeline=TIMELINE, duration="60s",
    )  # fmt: skip
    prep = prepare(load_scenario(scenario))
    tb = await bring_up(prep, RUNTIMES.create("local"), health_timeout_s=240)
    try:
        run = await replay_once(
            prep, tb, tmp_path / "run", console=Console(quiet=True), progress=False
        )
        async with (
            aiohttp.ClientSession() as s,
            s.get(tb.nodes["cloud-agx"].url + "/emulation") as resp,
        ):
            rep = await resp.json()
    finally:
        await take_down(tb.run_id)
    recs = run.records
    assert len(recs) == len(prep.requests) and all(r.status == "completed" for r in recs)
    assert rep["speed"] == 0.5 and rep["dilation"] == 3.0
    summary = json.loads((run.out_dir / "summary.json").read_text())
    applied = summary["run"]["timeline"]
    assert [e["kind"] for e in applied] == ["speed", "link"]
    for e, at in zip(applied, (SLOW_AT, LINK_AT), strict=True):
        assert at <= e["applied_s"] < at + 0.5, e  # on the emulated clock, not 3x later
    assert applied[0]["emulated"] is True
    link = applied[1]
    assert link["bandwidth_bps"] == pytest.approx(20e6) and link["delay_s"] == pytest.approx(0.05)
    assert link["what"] == "fog->cloud: 20Mbit, delay 50ms"

    def per_token(r, node):  # emulated seconds the node computed per step of the request
        return r.stage_compute_s[node] / (r.output_tokens + 1)

    before = [r for r in recs if r.end_s is not None and r.end_s < SLOW_AT]
    after = [r for r in recs if r.arrival_s > SLOW_AT]
    assert before and after, [(r.arrival_s, r.end_s) for r in recs]
    ratio = statistics.median(per_token(r, "cloud-agx") for r in after) / statistics.median(
        per_token(r, "cloud-agx") for r in before
    )
    assert 1.6 < ratio < 2.6, ratio  # the device's windows doubled
    other = statistics.median(per_token(r, "edge-nano") for r in after) / statistics.median(
        per_token(r, "edge-nano") for r in before
    )
    assert 0.7 < other < 1.4, other  # the others keep theirs
    # the link's new delay (emulated clock): every decode hop into the cloud pays >= 50 ms
    late = [r for r in recs if r.arrival_s > LINK_AT + 0.2]
    assert late
    for r in late:
        hop = next(v for k, v in r.hop_transfer_s.items() if k.endswith("->cloud-agx"))
        assert hop >= 0.05 * r.output_tokens * 0.95, (r.request_id, r.hop_transfer_s)
