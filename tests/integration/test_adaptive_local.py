"""Adaptive re-partitioning in a replay through the local runtime (real stage processes of the
tiny model): a migration with requests in flight loses nothing and keeps every token equal to
the whole model's ``generate`` (relayed, and forwarded stage to stage); an adaptive scenario whose link drops re-plans on its own,
completes every request and shows the re-plan in summary.json, the trace and the plot."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from testbed.broker.broker import BrokerConfig
from testbed.broker.layout import Layout, WorkPredictor
from testbed.cost.replan import MeasuredState, decide, measured_topology
from testbed.experiment.adaptive import Replanner
from testbed.experiment.lifecycle import bring_up, take_down
from testbed.experiment.prepare import prepare
from testbed.experiment.replay import make_transport, replay_once
from testbed.runtime.interface import RUNTIMES
from testbed.spec.scenario import load_scenario
from tests.factories import reference_generate, scenario_dict, write_yaml
from tests.runs import TokenBroker

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.model,
    pytest.mark.slow,
    pytest.mark.timeout(600),
    pytest.mark.filterwarnings("ignore:subprocess .* is still running:ResourceWarning"),
]


def _scenario(tmp: Path, **over: Any) -> Path:
    data = scenario_dict(
        str(REPO / "topologies" / "tiny-fog2.yaml"),
        name="adaptive-local",
        dtype="float32",
        scheduler={"name": "arts", "params": {"alpha": 0.2}},
        planning={"prompt_tokens": 128, "output_tokens": 16, "concurrency": 4},
        workload={
            "kind": "synthetic",
            "rate_rps": 2.0,
            "num_requests": 16,
            "prompt_tokens": 48,
            "output_tokens": 12,
        },
        duration="10s",
        output=str(tmp / "results"),
        repartition={"every": "2s", "threshold": "10%"},
    )
    return write_yaml(tmp / "scenario.yaml", data | over)


@pytest.mark.parametrize("transport", ["relay", "forward"])
async def test_a_migration_with_requests_in_flight_keeps_every_token(
    tmp_path: Path, state_dir: Path, transport: str
) -> None:
    workload = {"kind": "synthetic", "rate_rps": 2.0, "num_requests": 16, "prompt_tokens": 48,
                "output_tokens": 32}  # fmt: skip
    prep = prepare(load_scenario(_scenario(tmp_path, workload=workload)))  # long: in flight
    assert prep.adaptive and list(prep.plan.cuts) == [0, 1, 2, 4]
    # the plan BSDP picks when edge -> fog crawls: the edge tier left out
    links = [prep.topology.uplink(j) for j in range(2)]
    slow = (links[0].model_copy(update={"bandwidth_bps": 1e3}), links[1])  # type: ignore[union-attr]
    d = decide(prep.plan.cuts, prep.topology, prep.cost, prep.loaded.spec.planning,
               MeasuredState(slow), threshold=0.1)  # fmt: skip
    assert d.migrate and d.new_cuts[1] == 0, d.reason
    tb = await bring_up(prep, RUNTIMES.create("local"), health_timeout_s=240)
    try:
        layout = Layout.from_running(tb, prep.topology, prep.cost)
        broker = TokenBroker(layout, WorkPredictor(layout, prep.cost), prep.make_scheduler(),
                             make_transport(tb), prep.prompt_fn(),
                             config=BrokerConfig(call_timeout_s=60,
                                                 transport=transport))  # type: ignore[arg-type]  # fmt: skip
        broker.generational = True
        rp = Replanner(prep.loaded.spec.repartition, prep, tb)  # type: ignore[arg-type]
        async with broker:
            run = asyncio.create_task(broker.run(prep.requests))
            await broker.clock_started.wait()
            await asyncio.sleep(1.0)
            while not broker.gen.requests:  # noqa: ASYNC110 - requests in flight on plan 0
                await asyncio.sleep(0.01)
            in_flight = set(broker.gen.requests)
            m = await rp.migrate(broker, d, measured_topology(prep.topology, slow), 0.0)
            res = await run
    finally:
        await take_down(tb.run_id)
    assert "failed" not in m, m
    assert m["switched_s"] is not None and m["drained_s"] >= m["switched_s"]
    assert in_flight and all(r.status == "completed" for r in res.records), [
        r.reason for r in res.records
    ]
    old = [r for r in res.records if "edge-1" in r.route]
    new = [r for r in res.records if "edge-1" not in r.route]
    assert old and new  # both plans served requests
    assert any(r.request_id in in_flight and r.finished_s > m["switched_s"] for r in old)
    # fog nodes held both ranges during the overlap, then only the new one
    for n, mem in m["overlap_memory"].items():
        assert len(mem["generations"]) == 2, (n, mem)
        assert m["unloaded"][n].startswith("unloaded"), m["unloaded"]
    assert m["unloaded"]["edge-1"].startswith("kept")
    prompt = prep.prompt_fn()
    for req in prep.requests:
        ids = list(prompt(req))
        want = reference_generate(prep.weights, ids, req.output_tokens)[len(ids) :]
        assert broker.tokens[req.request_id] == want, req.request_id


async def test_an_adaptive_replay_re_plans_when_the_link_drops(
    tmp_path: Path, state_dir: Path
) -> None:
    path = _scenario(tmp_path, timeline=[{"at": "2s", "link": "edge->fog", "bandwidth": "200kbit"}])
    loaded = load_scenario(path)
    prep = prepare(loaded, "bsdp+arts+adaptive")
    tb = await bring_up(prep, RUNTIMES.create("local"), health_timeout_s=240)
    try:
        run = await replay_once(prep, tb, tmp_path / "run", console=Console(quiet=True),
                                progress=False, config=BrokerConfig(call_timeout_s=60))  # fmt: skip
    finally:
        await take_down(tb.run_id)
    assert all(r.status == "completed" for r in run.records), [r.reason for r in run.records]
    assert len(run.records) == len(prep.requests)
    summary = json.loads((run.out_dir / "summary.json").read_text())["run"]
    rp = summary["repartition"]
    assert rp["checks"] and rp["migrations"], rp
    m = rp["migrations"][0]
    assert m["decided_s"] >= 2.0 and m["new_cuts"][1] == 0, m  # the edge tier left out
    replans = [e for e in summary["timeline"] if e["kind"] == "replan"]
    assert replans and replans[0]["what"].startswith("re-plan [0, 1, 2, 4] ->")
    trace = json.loads((run.out_dir / "trace.json").read_text())
    instants = [e["name"] for e in trace["traceEvents"] if e.get("ph") == "i"]
    assert replans[0]["what"] in instants
    late = [r for r in run.records if r.arrival_s > m["switched_s"] + 0.1]
    assert late and all("edge-1" not in r.route for r in late)
