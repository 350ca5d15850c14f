"""Continuous batching in the simulated node model (SimConfig.max_batch, StepTimes.batch_s)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from testbed.broker.layout import WorkPredictor
from testbed.schedule import SCHEDULERS
from testbed.sim.engine import SimConfig, SimOutcome, Simulator
from testbed.sim.links import Network
from testbed.sim.reference import ReferenceSimulator
from testbed.sim.run import SimSetup, prepare_sim
from testbed.sim.steps import StepTimes
from testbed.spec.scenario import load_scenario
from testbed.workload.request import TraceRequest
from tests.factories import REPO


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> SimSetup:
    d: Path = tmp_path_factory.mktemp("batch")
    sc = {
        "name": "batch",
        "topology": str(REPO / "topologies" / "three-tier.yaml"),
        "model": "phi-3-medium",
        "dtype": "float16",
        "partitioner": "bsdp",
        "scheduler": "arts",
        "planning": {"prompt_tokens": 512, "output_tokens": 64, "concurrency": 8},
        "workload": {"kind": "synthetic", "rate_rps": 20, "num_requests": 60,
                     "prompt_tokens": 128, "output_tokens": 32},
        "seed": 0,
    }  # fmt: skip
    (d / "s.yaml").write_text(yaml.safe_dump(sc))
    return prepare_sim(load_scenario(d / "s.yaml"))


def run(setup: SimSetup, reqs: list[TraceRequest], sched: str = "arts", **cfg) -> SimOutcome:  # type: ignore[no-untyped-def]
    lay = setup.layout
    sim = Simulator(
        lay,
        WorkPredictor(lay, setup.prep.cost),
        SCHEDULERS.create(sched),
        StepTimes(lay, setup.prep.cost),
        Network(lay.hop_links),
        SimConfig(**cfg),
    )
    out = sim.run(reqs)
    run.sim = sim  # type: ignore[attr-defined]
    return out


def test_batch_step_times(setup: SimSetup) -> None:
    steps = StepTimes(setup.layout, setup.prep.cost)
    node = setup.layout.stages[-1].nodes[0]
    assert steps.batch_s(node, [], [300]) == steps.decode_s(node, 300)
    assert steps.batch_s(node, [64], []) == steps.prefill_s(node, 64)
    single = 16 * steps.decode_s(node, 300)
    b16 = steps.batch_s(node, [], [300] * 16)
    assert steps.decode_s(node, 300) < b16 < single / 4  # weights read once per batch
    mixed = steps.batch_s(node, [64], [300, 310, 2000, 5])
    single = steps.prefill_s(node, 64) + sum(steps.decode_s(node, c) for c in (300, 310, 2000, 5))
    assert mixed < single
    # the single steps' times scaled by the batch roofline over the single rooflines
    dev, cost = setup.layout.nodes[node].device, setup.prep.cost
    ratio = cost.block_batch_s(dev, [64], [300, 310, 2000, 5]) / (
        cost.block_batch_s(dev, prompts=[64])
        + sum(cost.block_batch_s(dev, contexts=[c]) for c in (300, 310, 2000, 5))
    )
    assert mixed == pytest.approx(single * ratio, rel=1e-12)


def test_max_batch_one_is_the_reference_and_batching_serves_more(setup: SimSetup) -> None:
    reqs = list(setup.requests)
    one = run(setup, reqs, record_spans=False)
    lay = setup.layout
    ref = ReferenceSimulator(
        lay, WorkPredictor(lay, setup.prep.cost), SCHEDULERS.create("arts"),
        StepTimes(lay, setup.prep.cost), Network(lay.hop_links), SimConfig(record_spans=False),
    ).run(reqs)  # fmt: skip
    assert one.records == ref.records
    many = run(setup, reqs, record_spans=False, max_batch=32)
    sim = run.sim  # type: ignore[attr-defined]
    assert all(r.status == "completed" for r in many.records)
    assert all(len(r.token_times_s) == r.output_tokens for r in many.records)
    assert sim.batched_steps > 1.5 * sim.batches  # steps really shared forwards

    def mean(o: SimOutcome) -> float:
        return sum(r.e2e_s or 0.0 for r in o.records) / len(o.records)

    assert mean(many) < 0.8 * mean(one), (mean(many), mean(one))
    # a node's busy time is one batch time per forward, not one per request
    assert sum(many.node_busy_s.values()) < 0.8 * sum(one.node_busy_s.values())
    with pytest.raises(ValueError, match="max_batch"):
        run(setup, reqs[:1], max_batch=0)


def test_steps_of_one_batch_share_its_start_end_and_time(setup: SimSetup) -> None:
    # a burst of requests: their decode steps queue at the same nodes and run as batches
    reqs = [TraceRequest(i, 0.01 * i, 64, 8, i) for i in range(16)]
    out = run(setup, reqs, "round_robin", max_batch=8)
    sim = run.sim  # type: ignore[attr-defined]
    assert sim.batches < sim.batched_steps
    steps = StepTimes(setup.layout, setup.prep.cost)
    computes: dict[tuple[str, float, float], list[tuple[int, int]]] = {}
    for rec in out.records:
        for sp in rec.spans:
            if sp.kind == "compute":
                computes.setdefault((sp.node, sp.start_s, sp.end_s), []).append(
                    (rec.prompt_tokens, sp.step)
                )
    shared = [(k, v) for k, v in computes.items() if len(v) > 1]
    assert shared
    for (node, t0, t1), items in shared:
        prompts = [p for p, k in items if k == 0]
        contexts = [p + k - 1 for p, k in items if k > 0]
        assert t1 - t0 == pytest.approx(steps.batch_s(node, prompts, contexts), rel=1e-9)
