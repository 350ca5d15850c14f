"""The optimised engine gives exactly the records of the frozen reference engine (every shortcut
in testbed/sim/engine.py is exact), over several policies, contention, KV waits and slots."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from testbed.broker.layout import Layout, WorkPredictor
from testbed.schedule import SCHEDULERS
from testbed.sim.engine import SimConfig, SimOutcome, Simulator
from testbed.sim.links import Network
from testbed.sim.reference import ReferenceSimulator
from testbed.sim.run import SimSetup, prepare_sim
from testbed.sim.steps import StepTimes
from testbed.spec.scenario import load_scenario
from testbed.workload.request import TraceRequest
from tests.factories import REPO

TINY = REPO / "scenarios" / "tiny-azure.yaml"
POLICIES = ("arts", "round_robin", "jsq", "heft", "random", "fastest")


@pytest.fixture(scope="module")
def tiny() -> SimSetup:
    return prepare_sim(load_scenario(TINY), "bsdp+arts")


@pytest.fixture(scope="module")
def three_tier(tmp_path_factory: pytest.TempPathFactory) -> SimSetup:
    d: Path = tmp_path_factory.mktemp("exact")
    sc = {
        "name": "exact",
        "topology": str(REPO / "topologies" / "three-tier.yaml"),
        "model": "phi-3-medium",
        "dtype": "float16",
        "partitioner": "bsdp",
        "scheduler": "arts",
        "planning": {"prompt_tokens": 512, "output_tokens": 64, "concurrency": 8},
        "workload": {"kind": "synthetic", "rate_rps": 4, "num_requests": 40,
                     "prompt_tokens": 256, "output_tokens": 24},
        "seed": 0,
    }  # fmt: skip
    (d / "s.yaml").write_text(yaml.safe_dump(sc))
    return prepare_sim(load_scenario(d / "s.yaml"))


def workload(setup: SimSetup, speedup: float) -> list[TraceRequest]:
    reqs = [replace(r, arrival_s=r.arrival_s / speedup) for r in setup.requests]
    n = len(reqs)
    # simultaneous requests of one shape: ties in time between steps on twin replicas
    reqs += [TraceRequest(n + i, 0.5, 40, 6, n + i) for i in range(6)]
    return sorted(reqs, key=lambda r: (r.arrival_s, r.request_id))


def both(
    setup: SimSetup, reqs: list[TraceRequest], sched: str, layout: Layout | None = None, **cfg
) -> tuple[SimOutcome, SimOutcome]:  # type: ignore[no-untyped-def]
    lay = layout or setup.layout
    outs = []
    for cls in (ReferenceSimulator, Simulator):
        sim = cls(
            lay,
            WorkPredictor(lay, setup.prep.cost),
            SCHEDULERS.create(sched),
            StepTimes(lay, setup.prep.cost),
            Network(lay.hop_links),
            SimConfig(**cfg),
        )
        outs.append(sim.run(reqs))
    return outs[0], outs[1]


def same(ref: SimOutcome, new: SimOutcome) -> None:
    assert len(ref.records) == len(new.records)
    for a, b in zip(ref.records, new.records, strict=True):
        assert a == b, (a.request_id, a, b)
    assert new.routed == ref.routed
    assert new.link_busy_s == ref.link_busy_s
    assert new.node_busy_s == pytest.approx(ref.node_busy_s, rel=1e-12)
    assert new.sim_end_s == ref.sim_end_s


@pytest.mark.parametrize("sched", POLICIES)
def test_same_records_on_the_tiny_scenario(tiny: SimSetup, sched: str) -> None:
    same(*both(tiny, workload(tiny, 3.0), sched))


@pytest.mark.parametrize("sched", ("arts", "jsq", "heft"))
def test_same_records_on_the_three_tier_cluster(three_tier: SimSetup, sched: str) -> None:
    reqs = workload(three_tier, 1.0)
    same(*both(three_tier, reqs, sched, record_spans=False))
    same(*both(three_tier, reqs[:20], sched, slots=2, max_active_requests=7))


def test_same_records_with_kv_waits_slowdown_and_admission_cap(tiny: SimSetup) -> None:
    lay = tiny.layout
    kv = WorkPredictor(lay, tiny.prep.cost).predict(128, 16).kv_bytes
    small = {n: replace(i, kv_capacity_bytes=kv[i.stage] * 2) for n, i in lay.nodes.items()}
    tight = Layout(lay.stages, small, lay.hop_links, lay.num_blocks)
    reqs = workload(tiny, 5.0)
    slow = {lay.stages[0].nodes[-1]: 7.0}
    for sched in ("arts", "round_robin"):
        same(*both(tiny, reqs, sched, layout=tight, slowdown=slow))
        same(*both(tiny, reqs, sched, max_active_requests=3, slots=2))
    # caches of the larger requests never fit (they fail), with requests waiting for admission
    kv = WorkPredictor(lay, tiny.prep.cost).predict(64, 8).kv_bytes
    doom = {n: replace(i, kv_capacity_bytes=kv[i.stage] * 3 // 2) for n, i in lay.nodes.items()}
    ref, new = both(
        tiny, reqs, "arts", layout=Layout(lay.stages, doom, lay.hop_links, lay.num_blocks),
        max_active_requests=4,
    )  # fmt: skip
    assert 0 < sum(r.status == "failed" for r in ref.records) < len(reqs)
    same(ref, new)


def test_same_records_with_request_classes_and_the_slo_stage_order(tiny: SimSetup) -> None:
    """Classes reach the scheduler in both engines; for slo the stages take waiting steps by
    (priority, least slack), which the optimised engine gets by processing arrivals at their
    time (its FIFO shortcuts off)."""
    from testbed.spec.classes import RequestClass

    classes = tuple(
        RequestClass.model_validate(c)
        for c in (
            {"name": "chat", "share": 0.6, "slo": {"ttft": "200ms", "tpot": "50ms"}, "priority": 1},
            {"name": "batch", "share": 0.4, "slo": {"e2e": "5s"}},
        )
    )
    reqs = workload(tiny, 8.0)
    for sched in ("slo", "arts"):
        ref, new = both(tiny, reqs, sched, classes=classes, class_seed=3)
        same(ref, new)
        assert {r.slo_class for r in new.records} == {"chat", "batch"}
    ref, new = both(tiny, reqs, "slo", classes=classes, class_seed=3, slots=2)
    same(ref, new)


def test_same_records_with_kv_waits_behind_long_prefill_transfers(three_tier: SimSetup) -> None:
    """KV waits at a later stage while long prompts' activations cross a slow link: a step sent
    there may arrive after a request that finishes in the meantime frees room (the early-arrival
    shortcut must then wait for the arrival's time)."""
    lay = three_tier.layout
    pred = WorkPredictor(lay, three_tier.prep.cost)
    need = pred.predict(1800, 40).kv_bytes
    tight = {
        n: replace(i, kv_capacity_bytes=need[i.stage] * 3) if i.stage == 1 else i
        for n, i in lay.nodes.items()
    }
    layout = Layout(lay.stages, tight, lay.hop_links, lay.num_blocks)
    for gap, sched in ((0.6, "round_robin"), (1.0, "round_robin"), (0.6, "arts")):
        reqs = [
            TraceRequest(i, gap * i, 1800 if i % 3 == 0 else 64 + 7 * i, 8 + (5 * i) % 33, i)
            for i in range(80)
        ]
        ref, new = both(three_tier, reqs, sched, layout=layout, record_spans=False)
        assert all(r.status == "completed" for r in ref.records)
        assert max(r.queueing_s for r in ref.records) > 5.0  # KV waits
        same(ref, new)
