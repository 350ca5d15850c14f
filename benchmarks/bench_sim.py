"""How fast is `testbed simulate`? Two figures (printed, not asserted):

(a) the Azure LLM inference conversation trace (2023), its first --a-minutes (default 60) on
    topologies/three-tier.yaml with phi-3-medium and bsdp+arts, every prefill and decode step
    of every request through its route simulated (issue target: < 30 s for one hour);
(b) --b-requests (default 1,000,000) synthetic requests over a --b-nodes (default 1,000) node
    edge/fog/cloud topology with phi-3-mini and bsdp+arts (or --b-scheduler; target: < 10 min). With
    --b-simulate N only the first N requests are simulated and the time is extrapolated
    linearly (the work per request is constant at a steady load; the heap adds a log factor).

Each figure is printed with batching off (--max-batch 1: every decode step of every request is
its own forward, the issue's definition) and on (--max-batch 32: continuous batching in every
node). Wall time and CPU time are printed, and events/s, so that runs on a loaded machine can be
compared; "extrapolated" says when a reduced run was scaled up.

Side by side, in the same process: the optimised engine (testbed/sim/engine.py) against the
frozen reference engine (testbed/sim/reference.py, one event per step and hop, no shortcuts) on
the first --ref-minutes (default 5) of (a) and the first --ref-requests (default 5,000) of (b),
batching off (the reference has none): CPU seconds of each, the ratio, and whether the records
are identical. Run it alone: the machine's load changes both figures, the ratio less.

The exact shortcuts the engine takes are listed in testbed/sim/engine.py's docstring and the
README (simulator section); tests/unit/test_sim_exact.py checks that the records are the same as
the unoptimised reference engine's. Spans are not kept here (the records still carry per-node
compute and per-hop transfer totals).

    .venv/bin/python benchmarks/bench_sim.py [--a-minutes 60] [--b-simulate 100000]
    .venv/bin/python benchmarks/bench_sim.py --only-ref      # just the side-by-side ratios
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testbed.broker.layout import WorkPredictor
from testbed.sim.classes import scenario_config
from testbed.sim.engine import SimConfig, SimOutcome, Simulator
from testbed.sim.links import Network
from testbed.sim.reference import ReferenceSimulator
from testbed.sim.run import SimSetup, bottleneck, prepare_sim, simulate, summarize_outcome
from testbed.sim.steps import StepTimes
from testbed.spec.scenario import load_scenario

REPO = Path(__file__).resolve().parents[1]
TRACE_NAME = "AzureLLMInferenceTrace_conv.csv"
Scenario = dict[str, Any]  # a scenario as its YAML reads


def find_trace() -> Path:
    for d in (REPO.parent / "shared" / "traces", Path("/work/shared/traces"), REPO / "scenarios"):
        if (d / TRACE_NAME).exists():
            return d / TRACE_NAME
    raise SystemExit(f"{TRACE_NAME} not found (see scenarios/traces/SOURCES.md)")


def load(scenario: Scenario, tmp: Path, label: str, requests: int | None = None) -> SimSetup:
    path = tmp / f"{label.split(',')[0].replace(' ', '_')}.yaml"
    path.write_text(yaml.safe_dump(scenario))
    return prepare_sim(load_scenario(path), requests_limit=requests)


def side_by_side(setup: SimSetup, label: str) -> None:
    """The reference engine and the optimised one on the same requests, one after the other in
    this process: CPU seconds, the ratio, and whether the records are identical."""
    # the scenario's request classes as simulate() takes them, batching off on every node
    config = scenario_config(setup, SimConfig(record_spans=False, max_batch=1))
    cpu: list[float] = []
    outs: list[SimOutcome] = []
    for engine in (ReferenceSimulator, Simulator):
        sim = engine(
            setup.layout,
            WorkPredictor(setup.layout, setup.prep.cost),
            setup.prep.make_scheduler(),
            StepTimes(setup.layout, setup.prep.cost, setup.prep.calibrated),
            Network(setup.layout.hop_links),
            config,
        )
        c0 = time.process_time()
        outs.append(sim.run(setup.requests, stop_after_s=setup.prep.loaded.spec.duration_s))
        cpu.append(time.process_time() - c0)
    ref, new = outs
    same = ref.records == new.records and ref.link_busy_s == new.link_busy_s
    print(
        f"{label}: {len(setup.requests):,} requests, batching off\n"
        f"    reference engine {cpu[0]:.2f}s CPU ({ref.events:,} events), optimised engine "
        f"{cpu[1]:.2f}s CPU ({new.events:,} events): {cpu[0] / max(cpu[1], 1e-9):.2f}x faster; "
        f"records identical: {'yes' if same else 'NO'}"
    )


def run(
    scenario: Scenario, tmp: Path, label: str, max_batch: int, requests: int | None = None
) -> tuple[float, float]:
    """-> (wall seconds, CPU seconds) of prepare + simulate."""
    t0, c0 = time.perf_counter(), time.process_time()
    setup = load(scenario, tmp, label, requests)
    t1, c1 = time.perf_counter(), time.process_time()
    out = simulate(setup, config=SimConfig(record_spans=False, max_batch=max_batch))
    t2, c2 = time.perf_counter(), time.process_time()
    s = summarize_outcome(setup, out)
    node, util = bottleneck(s)
    tokens = sum(r.output_tokens for r in setup.requests)
    sim_s, sim_cpu = max(t2 - t1, 1e-9), max(c2 - c1, 1e-9)
    print(
        f"{label}, max_batch {max_batch}: {len(setup.requests):,} requests, {tokens:,} output "
        f"tokens, {len(setup.layout.nodes)} nodes, plan cuts {list(setup.prep.plan.cuts)}\n"
        f"    prepare {t1 - t0:.1f}s wall; simulate {sim_s:.1f}s wall / {sim_cpu:.1f}s CPU, "
        f"{out.events:,} events ({out.events / sim_cpu:,.0f}/s CPU), "
        f"{len(setup.requests) / sim_cpu:,.0f} req/s CPU\n"
        f"    simulated {out.sim_end_s:,.0f}s; completed {s.completed:,}/{s.requests:,}; "
        f"E2E mean {s.e2e_s.mean or 0:.2f}s p99 {s.e2e_s.p99 or 0:.2f}s; "
        f"bottleneck {node} {100 * util:.0f}%"
    )
    return t2 - t0, c2 - c0


def scenario_a(minutes: float) -> Scenario:
    sc: Scenario = yaml.safe_load((REPO / "scenarios" / "three-tier-phi3-medium.yaml").read_text())
    sc["topology"] = str(REPO / "topologies" / "three-tier.yaml")
    sc["workload"]["path"] = str(find_trace())
    sc["workload"]["window"] = {"start_s": 0, "duration_s": f"{minutes:g}min"}
    return sc


def bench_a(minutes: float, tmp: Path, max_batch: int) -> None:
    wall, cpu = run(scenario_a(minutes), tmp, f"(a) azure-conv {minutes:g} min", max_batch)
    if minutes < 60:
        k = 60 / minutes
        print(
            f"    -> one hour, EXTRAPOLATED from {minutes:g} min: ~{wall * k:.0f}s wall, "
            f"~{cpu * k:.0f}s CPU (target < 30 s)"
        )
    else:
        print(
            f"    -> one hour (not extrapolated): {wall:.1f}s wall, {cpu:.1f}s CPU (target < 30 s)"
        )


def scenario_b(nodes: int, n: int, scheduler: str, tmp: Path) -> Scenario:
    edge, fog = nodes * 6 // 10, nodes * 3 // 10
    cloud = nodes - edge - fog
    topo = {
        "name": f"big-{nodes}",
        "tiers": [
            {
                "name": "edge",
                "nodes": [{"name": "edge", "device": "jetson-agx-orin", "count": edge}],
            },
            {"name": "fog", "nodes": [{"name": "fog", "device": "rtx-3090", "count": fog}]},
            {"name": "cloud", "nodes": [{"name": "cloud", "device": "a100-80gb", "count": cloud}]},
        ],
        "links": [
            {"from": "edge", "to": "fog", "bandwidth": "10Gbit", "delay": "5ms"},
            {"from": "fog", "to": "cloud", "bandwidth": "40Gbit", "delay": "20ms"},
        ],
    }
    (tmp / "big.yaml").write_text(yaml.safe_dump(topo))
    return {
        "name": "big",
        "topology": str(tmp / "big.yaml"),
        "model": "phi-3-mini",
        "dtype": "float16",
        "partitioner": "bsdp",
        "scheduler": scheduler,
        "planning": {"prompt_tokens": 256, "output_tokens": 16, "concurrency": 8},
        "workload": {
            "kind": "synthetic",
            "rate_rps": 400,
            "num_requests": n,
            "prompt_tokens": 256,
            "output_tokens": 16,
        },
        "seed": 0,
    }


def bench_b(
    nodes: int, total: int, simulate_n: int, scheduler: str, tmp: Path, max_batch: int
) -> None:
    n = min(simulate_n, total)
    sc = scenario_b(nodes, n, scheduler, tmp)
    wall, cpu = run(
        sc, tmp, f"(b) {n:,} requests over {nodes:,} nodes, bsdp+{scheduler}", max_batch
    )
    if n < total:
        k = total / n
        print(
            f"    -> {total:,} requests, EXTRAPOLATED from {n:,}: ~{wall * k / 60:.1f} min wall, "
            f"~{cpu * k / 60:.1f} min CPU (target < 10 min)"
        )
    else:
        print(
            f"    -> {total:,} requests (not extrapolated): {wall / 60:.1f} min wall, "
            f"{cpu / 60:.1f} min CPU (target < 10 min)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--a-minutes", type=float, default=60.0)
    ap.add_argument("--b-nodes", type=int, default=1000)
    ap.add_argument("--b-requests", type=int, default=1_000_000)
    ap.add_argument(
        "--b-simulate", type=int, default=1_000_000, help="simulate this many, extrapolate"
    )
    ap.add_argument("--b-scheduler", default="arts")
    ap.add_argument(
        "--max-batch", default="1,32", help="comma-separated: each figure once per value"
    )
    ap.add_argument("--skip-a", action="store_true")
    ap.add_argument("--skip-b", action="store_true")
    ap.add_argument("--ref-minutes", type=float, default=5.0, help="(a) vs the reference engine")
    ap.add_argument("--ref-requests", type=int, default=5000, help="(b) vs the reference engine")
    ap.add_argument("--only-ref", action="store_true", help="only the side-by-side ratios")
    args = ap.parse_args()
    batches = [int(x) for x in args.max_batch.split(",")]
    with tempfile.TemporaryDirectory() as d:
        if not args.skip_a:
            label = f"(a) azure-conv {args.ref_minutes:g} min"
            side_by_side(load(scenario_a(args.ref_minutes), Path(d), label), label)
        if not args.skip_b:
            sc = scenario_b(args.b_nodes, args.ref_requests, args.b_scheduler, Path(d))
            label = f"(b) {args.ref_requests:,} requests over {args.b_nodes:,} nodes"
            side_by_side(load(sc, Path(d), label), label)
        if args.only_ref:
            return
        for mb in batches:
            if not args.skip_a:
                bench_a(args.a_minutes, Path(d), mb)
        for mb in batches:
            if not args.skip_b:
                bench_b(
                    args.b_nodes, args.b_requests, args.b_simulate, args.b_scheduler, Path(d), mb
                )


if __name__ == "__main__":
    main()
