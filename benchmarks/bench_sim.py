"""How fast is `testbed simulate`? Two figures (printed, not asserted):

(a) the Azure LLM inference conversation trace (2023), its first --a-minutes (default 60) on
    topologies/three-tier.yaml with phi-3-medium and bsdp+arts, every prefill and decode step
    of every request through its route simulated (issue target: < 30 s for one hour);
(b) --b-requests (default 1,000,000) synthetic requests over a --b-nodes (default 1,000) node
    edge/fog/cloud topology with phi-3-mini and bsdp+arts (or --b-scheduler; target: < 10 min). With
    --b-simulate N only the first N requests are simulated and the time is extrapolated
    linearly (the work per request is constant at a steady load; the heap adds a log factor).

Exact shortcuts used: per (stage, device) step-time tables (a step's time depends only on the
stage, the device and the context length); ledger snapshots rebuild only the nodes that changed
since the last decision; schedulers that do not learn get no per-step completion events; spans
are not kept (the records still carry per-node compute and per-hop transfer totals).

    .venv/bin/python benchmarks/bench_sim.py [--a-minutes 60] [--b-simulate 20000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testbed.sim.engine import SimConfig
from testbed.sim.run import bottleneck, prepare_sim, simulate, summarize_outcome
from testbed.spec.scenario import load_scenario

REPO = Path(__file__).resolve().parents[1]
TRACE_NAME = "AzureLLMInferenceTrace_conv.csv"


def find_trace() -> Path:
    for d in (REPO.parent / "shared" / "traces", Path("/work/shared/traces"), REPO / "scenarios"):
        if (d / TRACE_NAME).exists():
            return d / TRACE_NAME
    raise SystemExit(f"{TRACE_NAME} not found (see scenarios/traces/SOURCES.md)")


def run(scenario: dict, tmp: Path, label: str, requests: int | None = None) -> None:  # type: ignore[type-arg]
    path = tmp / f"{label}.yaml"
    path.write_text(yaml.safe_dump(scenario))
    t0 = time.perf_counter()
    setup = prepare_sim(load_scenario(path), requests_limit=requests)
    t1 = time.perf_counter()
    out = simulate(setup, config=SimConfig(record_spans=False))
    t2 = time.perf_counter()
    s = summarize_outcome(setup, out)
    node, util = bottleneck(s)
    tokens = sum(r.output_tokens for r in setup.requests)
    print(
        f"{label}: {len(setup.requests):,} requests, {tokens:,} output tokens, "
        f"{len(setup.layout.nodes)} nodes, plan cuts {list(setup.plan.cuts)}; "
        f"prepare {t1 - t0:.1f}s, simulate {t2 - t1:.1f}s ({out.events:,} events, "
        f"{out.events / max(t2 - t1, 1e-9):,.0f}/s, {len(setup.requests) / max(t2 - t1, 1e-9):,.0f} req/s); "
        f"simulated {out.sim_end_s:,.0f}s; completed {s.completed:,}/{s.requests:,}; "
        f"E2E mean {s.e2e_s.mean or 0:.2f}s p99 {s.e2e_s.p99 or 0:.2f}s; "
        f"bottleneck {node} {100 * util:.0f}%"
    )
    return None


def bench_a(minutes: float, tmp: Path) -> None:
    sc = yaml.safe_load((REPO / "scenarios" / "three-tier-phi3-medium.yaml").read_text())
    sc["topology"] = str(REPO / "topologies" / "three-tier.yaml")
    sc["workload"]["path"] = str(find_trace())
    sc["workload"]["window"] = {"start_s": 0, "duration_s": f"{minutes:g}min"}
    t = time.perf_counter()
    run(sc, tmp, f"(a) azure-conv {minutes:g} min")
    wall = time.perf_counter() - t
    if minutes < 60:
        print(f"    -> one hour, extrapolated linearly: ~{wall * 60 / minutes:.0f}s")


def bench_b(nodes: int, total: int, simulate_n: int, scheduler: str, tmp: Path) -> None:
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
    n = min(simulate_n, total)
    sc = {
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
    t = time.perf_counter()
    run(sc, tmp, f"(b) {n:,} requests over {nodes:,} nodes, bsdp+{scheduler}")
    wall = time.perf_counter() - t
    if n < total:
        print(f"    -> {total:,} requests, extrapolated linearly: ~{wall * total / n / 60:.1f} min")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--a-minutes", type=float, default=60.0)
    ap.add_argument("--b-nodes", type=int, default=1000)
    ap.add_argument("--b-requests", type=int, default=1_000_000)
    ap.add_argument(
        "--b-simulate", type=int, default=1_000_000, help="simulate this many, extrapolate"
    )
    ap.add_argument("--b-scheduler", default="arts")
    ap.add_argument("--skip-a", action="store_true")
    ap.add_argument("--skip-b", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        if not args.skip_a:
            bench_a(args.a_minutes, Path(d))
        if not args.skip_b:
            bench_b(args.b_nodes, args.b_requests, args.b_simulate, args.b_scheduler, Path(d))


if __name__ == "__main__":
    main()
