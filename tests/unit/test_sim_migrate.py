"""Adaptive re-partitioning in the simulator: a check that keeps the plan changes nothing, a
migration takes its load time, new requests take the new plan while requests in flight finish
on the old one, nothing is lost, and every re-plan is recorded and marked."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from testbed.sim.run import SimSetup, prepare_sim, simulate, write_sim_run
from testbed.spec.repartition import RepartitionSpec
from testbed.spec.scenario import load_scenario
from testbed.spec.timeline import TimelineEvent
from testbed.workload.request import TraceRequest
from tests.factories import REPO

TINY = REPO / "scenarios" / "tiny-azure.yaml"
DROP = {"at": 1.0, "link": "edge->fog", "bandwidth": 1e6}


@pytest.fixture(scope="module")
def base() -> SimSetup:
    return prepare_sim(load_scenario(TINY), "bsdp+arts")


def _with(
    setup: SimSetup, *events: dict, adaptive: bool = True, n: int = 80, gap_s: float = 0.05,
    **rp: object,
) -> SimSetup:  # fmt: skip
    evs = tuple(TimelineEvent.model_validate(e) for e in events)
    block = RepartitionSpec.model_validate({"every": 0.5, "threshold": 50.0} | rp)
    spec = setup.prep.loaded.spec.model_copy(
        update={"timeline": evs, "duration_s": None, "repartition": block}
    )
    loaded = replace(setup.prep.loaded, spec=spec)
    reqs = tuple(TraceRequest(i, i * gap_s, 32, 8, source_row=i) for i in range(n))
    return replace(setup, prep=replace(setup.prep, loaded=loaded, requests=reqs), adaptive=adaptive)


def _run(setup: SimSetup) -> tuple[list, list, dict]:
    log: list = []
    rp: dict = {}
    out = simulate(setup, timeline_log=log, repartition_log=rp)
    assert len(out.records) == len(setup.requests)  # none lost
    assert all(r.status == "completed" for r in out.records), [r.reason for r in out.records]
    return list(out.records), log, rp


def test_checks_that_keep_the_plan_change_nothing(base: SimSetup) -> None:
    static, _, _ = _run(_with(base, adaptive=False))
    kept, log, rp = _run(_with(base, threshold=100.0))  # no gain reaches 100%
    assert kept == static and log == [] and rp["migrations"] == []
    assert len(rp["checks"]) >= 3 and not any(c["migrate"] for c in rp["checks"])


def test_a_slow_link_migrates_and_new_requests_take_the_new_plan(base: SimSetup) -> None:
    recs, log, rp = _run(_with(base, DROP))
    (m,) = rp["migrations"]
    assert m["decided_s"] == pytest.approx(1.0) and m["new_cuts"][1] == 0  # edge emptied
    assert m["switched_s"] == pytest.approx(m["decided_s"] + m["load_s"]) and m["load_s"] > 0
    assert m["load_s"] == pytest.approx(max(m["load_bytes"].values()) / 1e9)
    assert m["drained_s"] is not None and m["drained_s"] >= m["switched_s"]
    old_len, new_len = len(base.layout.stages), len(base.layout.stages) - 1
    for r in recs:
        admitted = r.arrival_s + (r.injection_lag_s or 0)
        if admitted < m["switched_s"]:
            assert len(r.route) == old_len  # in flight or admitted while loading: old plan
        else:
            assert len(r.route) == new_len and not any(n.startswith("edge") for n in r.route)
    kinds = [e["kind"] for e in log]
    assert kinds == ["link", "replan"] and "re-plan" in log[1]["what"]
    mem = m["overlap_memory"]["fog-1"]
    assert mem["weights_bytes"] > 0 and mem["fits"] and mem["mem_bytes"] > mem["weights_bytes"]


def test_the_migration_pays_off_after_the_drop(base: SimSetup) -> None:
    static, _, _ = _run(_with(base, DROP, adaptive=False))
    adaptive, _, rp = _run(_with(base, DROP))
    t = rp["migrations"][0]["switched_s"]

    def mean(recs: list) -> float:
        xs = [r.e2e_s for r in recs if r.arrival_s >= t]
        return sum(xs) / len(xs)

    assert mean(adaptive) < 0.8 * mean(static)
    before = [r for r in static if r.end_s < 1.0]
    assert before == [r for r in adaptive if r.end_s < 1.0]  # the past is untouched


def test_a_slow_node_seen_by_arts_moves_the_blocks_off_it(base: SimSetup) -> None:
    recs, log, rp = _run(_with(base, {"at": 0.5, "node": "cloud-1", "speed": 0.05}, n=120))
    first = rp["checks"][0]
    assert first["at_s"] == 0.5 and not first["migrate"]  # nothing measured yet
    (m,) = rp["migrations"]
    check = next(c for c in rp["checks"] if c["migrate"])
    assert check["node_speed"]["cloud-1"] == pytest.approx(0.05, rel=0.05)  # ARTS's C_hat
    assert m["new_cuts"][2] == m["new_cuts"][3]  # the cloud tier holds no block any more
    late = [r for r in recs if r.arrival_s > m["switched_s"] + 0.1]
    assert late and all("cloud-1" not in r.route for r in late)
    assert [e["kind"] for e in log] == ["speed", "replan"]


def test_a_slower_load_switches_later(base: SimSetup) -> None:
    _, _, fast = _run(_with(base, DROP, every=0.1))
    _, _, slow = _run(_with(base, DROP, every=0.1, load_bandwidth=1e6))  # 1 MB/s
    f, s = fast["migrations"][0], slow["migrations"][0]
    assert s["load_s"] == pytest.approx(1000 * f["load_s"]) and s["load_s"] > 0.2
    assert s["switched_s"] > f["switched_s"]
    # while the new blocks load (and until the old plan drains) no other re-plan starts
    busy = [c for c in slow["checks"] if s["decided_s"] < c["at_s"] < s["switched_s"]]
    assert busy and all(c["reason"] == "a migration is running" for c in busy)


def test_a_crash_during_the_overlap_loses_nothing(base: SimSetup) -> None:
    crash = {"at": 1.01, "node": "edge-1", "down": "crash"}  # an old-plan replica, mid-drain
    back = {"at": 1.5, "node": "edge-1", "up": True}
    recs, log, rp = _run(_with(base, DROP, crash, back))
    m = rp["migrations"][0]
    assert [e["kind"] for e in log] == ["link", "replan", "down", "up"]
    assert m["switched_s"] < 1.01 < m["drained_s"]
    resumed = [r for r in recs if r.retries]
    assert resumed  # cut off on the old plan, finished on the new one (none failed: _run)
    assert all(not any(n.startswith("edge") for n in r.route) for r in resumed)


def test_the_run_folder_lists_and_marks_the_re_plans(base: SimSetup, tmp_path) -> None:
    setup = _with(base, DROP, n=30)
    log: list = []
    rp: dict = {}
    out = simulate(setup, timeline_log=log, repartition_log=rp)
    run = write_sim_run(setup, out, tmp_path, plots=False, timeline=log, repartition=rp)
    summary = json.loads(run.files["summary"].read_text())
    assert run.label == "bsdp+arts+adaptive" and summary["run"]["label"] == run.label
    assert summary["run"]["repartition"]["migrations"][0]["new_cuts"][1] == 0
    assert [e["kind"] for e in summary["run"]["timeline"]] == ["link", "replan"]
    phases = summary["run"]["phases"]
    assert [p["from_s"] for p in phases] == [0.0, 1.0] and phases[1]["requests"] > 0
    trace = run.files["trace"].read_text()
    assert "re-plan" in trace


def test_confirm_waits_for_the_same_split_on_consecutive_checks(base: SimSetup) -> None:
    _, _, once = _run(_with(base, DROP))
    _, _, twice = _run(_with(base, DROP, confirm=2))
    assert once["migrations"][0]["decided_s"] == pytest.approx(1.0)
    assert twice["migrations"][0]["decided_s"] == pytest.approx(1.5)  # the next check, 0.5 s on
    first = next(c for c in twice["checks"] if c["at_s"] == pytest.approx(1.0))
    assert not first["migrate"] and "1 of 2" in first["reason"]
