"""`testbed replay` / `testbed compare` end to end with `--runtime local`: the generated tiny
model in real stage processes on loopback, a window of the shipped Azure trace, the broker,
the results folder; the forward transport (same tokens as the relay, links paid stage to
stage); and a stage process killed mid-run."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from testbed.broker.broker import Broker, BrokerConfig, BrokerResult
from testbed.broker.layout import Layout, WorkPredictor
from testbed.experiment.compare import compare_scenario
from testbed.experiment.lifecycle import bring_up, take_down
from testbed.experiment.prepare import prepare
from testbed.experiment.replay import ReplayOptions, make_transport, replay_once
from testbed.runtime.interface import RUNTIMES
from testbed.spec.scenario import load_scenario
from tests.factories import shipped_scenario
from tests.runs import broker_tokens

pytestmark = [
    pytest.mark.model,
    pytest.mark.slow,
    pytest.mark.timeout(300),
    # the local runtime starts detached stage processes and drops their Popen handles on
    # purpose (they outlive `testbed up`); Python warns about that in the launching process
    pytest.mark.filterwarnings("ignore:subprocess .* is still running:ResourceWarning"),
]


def _scenario(tmp: Path, requests: int = 10, rate_scale: float = 3.0) -> Path:
    """The shipped tiny-azure scenario, squeezed: its first ``requests`` requests, 3x the rate."""
    workload = {"max_requests": requests, "rate_scale": rate_scale, "max_output_tokens": 6}
    return shipped_scenario(tmp, "tiny-azure", workload=workload)


@pytest.fixture(scope="module")
def state_dir(module_state_dir: Path) -> Path:
    return module_state_dir


@pytest.fixture(scope="module")
def testbed(state_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One local testbed (bsdp plan) shared by the tests of this module; down at the end."""
    tmp = tmp_path_factory.mktemp("replay")
    loaded = load_scenario(_scenario(tmp))
    prep = prepare(loaded)
    tb = asyncio.run(bring_up(prep, RUNTIMES.create("local"), health_timeout_s=180))
    try:
        yield tb, loaded, prep, tmp
    finally:
        asyncio.run(take_down(tb.run_id))
        assert not list(state_dir.glob("tb*.json")), "down left a state file"
        assert not any(_alive(pid) for pid in tb.pids()), "down left a process"


def _alive(pid: int) -> bool:
    """Running (a stopped child of this process is reaped first: it was started from here)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_replay_of_a_trace_window_through_the_tiny_testbed(testbed: Any) -> None:
    tb, _, prep, tmp = testbed
    console = Console(quiet=True)
    run = await replay_once(prep, tb, tmp / "run1", console=console, progress=False)
    recs = run.records
    want = prep.requests
    assert len(want) == 10
    assert [r.request_id for r in recs] == [q.request_id for q in want]
    assert all(r.status == "completed" for r in recs), [r.reason for r in recs]
    # counts and token totals match the trace window
    s = run.summary
    assert s.completed == len(want) and s.failed == 0
    assert s.prompt_tokens == sum(q.prompt_tokens for q in want)
    assert s.output_tokens == sum(q.output_tokens for q in want)
    assert s.prompt_tokens == sum(q.prompt_tokens for q in prep.workload.requests[:10])
    for r, q in zip(recs, want, strict=True):
        assert len(r.token_times_s) == q.output_tokens
        assert len(r.itl_s) == q.output_tokens - 1
        assert 0 < r.ttft_s <= r.e2e_s  # type: ignore[operator]
        assert r.arrival_s == pytest.approx(q.arrival_s)
        assert r.injection_lag_s is not None and 0 <= r.injection_lag_s < 0.25
        assert len(r.route) == 3 and r.route[1:] == ("fog-1", "cloud-1")
        assert set(r.stage_compute_s) == set(r.route)
        # the emulated links are paid: each hop costs at least its round trip per step
        assert r.hop_transfer_s[f"{r.route[0]}->fog-1"] >= 0.008 * q.output_tokens
        assert r.hop_transfer_s["fog-1->cloud-1"] >= 0.019 * q.output_tokens
    assert s.ttft_s.p50 <= s.e2e_s.p50  # type: ignore[operator]
    assert s.itl_s.count == sum(q.output_tokens - 1 for q in want)
    assert 0 < s.node_utilisation["cloud-1"] <= 1
    # the results folder
    out = run.out_dir
    for name in (
        "requests.jsonl",
        "run.json",
        "requests.csv",
        "summary.json",
        "config.json",
        "trace.json",
        "latency_cdf.png",
        "latency_over_time.png",
        "utilisation.png",
    ):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] == 10 and summary["run"]["shaping"] == "app"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["plan"]["cuts"] == list(prep.plan.cuts)
    assert cfg["scheduler"]["name"] == "arts" and cfg["versions"]["torch"]
    assert {n["name"] for n in cfg["testbed"]["nodes"]} == {"edge-1", "edge-2", "fog-1", "cloud-1"}
    trace = json.loads((out / "trace.json").read_text())
    assert any(e.get("ph") == "X" for e in trace["traceEvents"])


async def _tokens(tb: Any, prep: Any, transport: str) -> tuple[dict[int, list[int]], BrokerResult]:
    return await broker_tokens(tb, prep, transport, call_timeout_s=20.0)


async def test_forwarding_gives_the_relays_tokens(testbed: Any) -> None:
    """The same requests relayed by the broker and forwarded stage to stage (the forward
    transport: testbed.broker.chain) give the same tokens."""
    tb, _, prep, _ = testbed
    relayed, r_res = await _tokens(tb, prep, "relay")
    forwarded, f_res = await _tokens(tb, prep, "forward")
    for res in (r_res, f_res):
        assert all(r.status == "completed" for r in res.records), [r.reason for r in res.records]
    assert set(relayed) == {q.request_id for q in prep.requests}
    assert forwarded == relayed
    for q in prep.requests:
        assert len(forwarded[q.request_id]) == q.output_tokens
    # the model's tokens, not a constant: the greedy continuations differ between prompts
    assert len({tuple(t) for t in forwarded.values()}) > 1


async def test_a_forwarded_replay_records_every_hop_and_pays_the_links(testbed: Any) -> None:
    tb, _, prep, tmp = testbed
    console = Console(quiet=True)
    run = await replay_once(
        prep, tb, tmp / "fwd", console=console, progress=False, plots=False, transport="forward"
    )
    assert run.summary.completed == len(prep.requests) and run.summary.failed == 0
    for r, q in zip(run.records, prep.requests, strict=True):
        assert len(r.token_times_s) == q.output_tokens
        assert set(r.stage_compute_s) == set(r.route)
        # each hop costs at least its round trip per step, paid by the stage that sends it
        # (edge->fog 2 x (5 +- 1) ms, fog->cloud 2 x 10 ms)
        assert r.hop_transfer_s[f"{r.route[0]}->fog-1"] >= 0.008 * q.output_tokens
        assert r.hop_transfer_s["fog-1->cloud-1"] >= 0.019 * q.output_tokens
        assert r.ttft_s is not None and r.ttft_s >= 0.028  # one prefill: both round trips
    summary = json.loads((run.out_dir / "summary.json").read_text())
    assert summary["run"]["transport"] == "forward"
    cfg = json.loads((run.out_dir / "config.json").read_text())
    assert cfg["broker"]["transport"] == "forward" and cfg["scenario"]["transport"] == "relay"


async def test_a_killed_stage_process_reroutes_or_fails_its_requests(testbed: Any) -> None:
    """SIGKILL edge-1's process mid-run: its requests restart on edge-2 (or fail with a
    reason); none is lost. Runs last in this module: it leaves edge-1 dead."""
    tb, _, prep, _ = testbed
    layout = Layout.from_running(tb, prep.topology, prep.cost)
    from testbed.schedule import SCHEDULERS

    broker = Broker(
        layout,
        WorkPredictor(layout, prep.cost),
        SCHEDULERS.create("round_robin", {}),
        make_transport(tb),
        prep.prompt_fn(),
        config=BrokerConfig(call_timeout_s=10.0),
    )
    pid = tb.nodes["edge-1"].pid
    assert pid and _alive(pid)
    async with broker:
        run = asyncio.ensure_future(broker.run(prep.requests))
        while broker.ledger.book("edge-1").routed_total < 2 and not run.done():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
        res = await run
    assert len(res.records) == len(prep.requests)
    assert [e.node for e in res.node_events] == ["edge-1"]
    for r in res.records:
        assert r.status == "completed" or r.reason, r
        if r.status == "completed":
            assert len(r.token_times_s) == r.output_tokens
    rerouted = [r for r in res.records if r.retries]
    assert rerouted and all(r.route[0] == "edge-2" for r in rerouted if r.status == "completed")
    assert broker.ledger.in_flight() == 0


def test_compare_runs_each_pair_and_writes_the_table(state_dir: Path, tmp_path: Path) -> None:
    loaded = load_scenario(_scenario(tmp_path, requests=4, rate_scale=4.0))
    opts = ReplayOptions(up=True, runtime="local", progress=False, plots=True)
    res = asyncio.run(
        compare_scenario(loaded, ["bsdp+arts", "even+round_robin"], opts, Console(stderr=True))
    )
    assert [r.label for r in res.runs] == ["bsdp+arts", "even+round_robin"]
    for r in res.runs:
        assert r.summary.completed == 4
        assert (r.out_dir / "summary.json").exists()
    # the two partitioners cut the tiny model differently: one testbed, the second plan's
    # ranges loaded into its running stage servers (POST /load), each run on its own plan
    cfgs = [json.loads((r.out_dir / "config.json").read_text()) for r in res.runs]
    assert cfgs[0]["plan"]["cuts"] != cfgs[1]["plan"]["cuts"]
    run_ids = {c["testbed"]["run_id"] for c in cfgs}
    assert len(run_ids) == 1
    for c in cfgs:
        planned = {
            n: [st["start"], st["end"]]
            for st in c["plan"]["stages"]
            if st["end"] > st["start"]
            for n in st["nodes"]
        }
        served = {n["name"]: n["blocks"] for n in c["testbed"]["nodes"] if not n["parked"]}
        assert served == planned
    table = (res.out_dir / "comparison.md").read_text()
    assert "bsdp+arts" in table and "even+round_robin / bsdp+arts" in table
    assert (res.out_dir / "comparison.png").exists()
    assert not [i for i in run_ids if (state_dir / f"{i}.json").exists()]  # brought down
