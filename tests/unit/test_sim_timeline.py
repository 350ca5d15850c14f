"""Timelines in the simulator: each event kind changes what follows it, a crash resumes the
cut-off requests on the other replica (or fails them with a reason), nothing is lost."""

from __future__ import annotations

from dataclasses import replace

import pytest

from testbed.sim.run import SimSetup, prepare_sim, simulate
from testbed.spec.scenario import load_scenario
from testbed.spec.timeline import TimelineEvent
from testbed.workload.request import TraceRequest
from tests.factories import REPO

TINY = REPO / "scenarios" / "tiny-azure.yaml"


@pytest.fixture(scope="module")
def base() -> SimSetup:
    return prepare_sim(load_scenario(TINY), "bsdp+round_robin")


def _with(setup: SimSetup, *events: dict, n: int = 60, gap_s: float = 0.05) -> SimSetup:
    evs = tuple(TimelineEvent.model_validate(e) for e in events)
    spec = setup.prep.loaded.spec.model_copy(update={"timeline": evs, "duration_s": None})
    loaded = replace(setup.prep.loaded, spec=spec)
    reqs = tuple(TraceRequest(i, i * gap_s, 32, 8, source_row=i) for i in range(n))
    return replace(setup, prep=replace(setup.prep, loaded=loaded, requests=reqs))


def _run(setup: SimSetup) -> tuple[list, list]:
    log: list = []
    out = simulate(setup, timeline_log=log)
    assert len(out.records) == len(setup.requests)  # none lost
    return list(out.records), log


def _mean_e2e(recs: list, after_s: float) -> float:
    xs = [r.e2e_s for r in recs if r.arrival_s >= after_s and r.status == "completed"]
    return sum(xs) / len(xs)


def test_a_bandwidth_drop_slows_what_follows(base: SimSetup) -> None:
    calm, _ = _run(_with(base))
    drop, log = _run(_with(base, {"at": 1.0, "link": "edge->fog", "bandwidth": 100e3}))
    assert log[0]["kind"] == "link" and log[0]["bandwidth_bps"] == 100e3
    assert _mean_e2e(drop, 1.5) > 1.5 * _mean_e2e(calm, 1.5)
    early = [r.e2e_s for r in drop if r.end_s < 1.0]
    assert early == [r.e2e_s for r in calm if r.end_s < 1.0]  # the past is untouched


def test_a_slowdown_slows_its_node(base: SimSetup) -> None:
    calm, _ = _run(_with(base))
    slow, log = _run(_with(base, {"at": 0.0, "node": "cloud-1", "speed": 0.25}))
    assert log[0]["what"] == "cloud-1 speed x0.25"
    assert slow[0].stage_compute_s["cloud-1"] == pytest.approx(
        4 * calm[0].stage_compute_s["cloud-1"]
    )


def test_a_crash_resumes_cut_off_requests_on_the_other_replica(base: SimSetup) -> None:
    recs, log = _run(
        _with(
            base,
            {"at": 1.0, "node": "edge-1", "down": "crash"},
            {"at": 2.0, "node": "edge-1", "up": True},
        )
    )
    assert log[0]["resumed_or_failed"] >= 1
    assert all(r.status == "completed" for r in recs), [r.reason for r in recs]
    resumed = [r for r in recs if r.retries]
    assert resumed and all(r.route[0] == "edge-2" for r in resumed)
    for r in resumed:
        assert r.prompt_tokens == 32 and r.output_tokens == 8 and len(r.token_times_s) == 8
        assert 1.0 <= r.token_times_s[-1] and list(r.token_times_s) == sorted(r.token_times_s)
    assert any(r.token_times_s[0] < 1.0 for r in resumed)  # tokens before the crash kept
    down_window = [r for r in recs if 1.0 <= r.arrival_s < 2.0]
    assert all("edge-1" not in r.route for r in down_window)
    assert any("edge-1" in r.route for r in recs if r.arrival_s >= 2.1)  # re-admitted


def test_with_no_replica_left_requests_fail_with_a_reason(base: SimSetup) -> None:
    recs, _ = _run(_with(base, {"at": 1.0, "node": "fog-1", "down": "partition"}))
    failed = [r for r in recs if r.status == "failed"]
    assert failed and all("fog-1" in (r.reason or "") for r in failed)
    cut = [r for r in failed if r.arrival_s <= 1.0]  # in flight at the partition
    assert cut and all("fog-1 down (partition)" in (r.reason or "") for r in cut)
    assert all(r.status == "completed" for r in recs if r.end_s < 1.0)
