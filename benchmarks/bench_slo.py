"""Mixed-SLO load: ``slo`` vs ``arts`` on chat-class TTFT attainment and batch-class goodput.

Run: ``.venv/bin/python benchmarks/bench_slo.py [--requests 80] [--rate 12]``

The broker replays a Poisson burst over echo stage servers (real servers, wire format,
continuous batching with ``max_batch`` 4 so queues form; a batched step costs
``compute_s`` + ``per_token_s`` per token) on the tiny topology's BSDP plan. 70% of the
requests are ``chat`` (TTFT 150 ms, TPOT 100 ms, priority 1), 30% ``batch`` (E2E 10 s,
priority 0), drawn per request with the seed. ``arts`` routes by least predicted delay and the
stages serve first come, first served; ``slo`` routes by predicted SLO attainment and the
stages batch by (priority, least slack). Prints per-class attainment and goodput of each.
"""

from __future__ import annotations

import argparse
import asyncio
import random
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CLASSES = [
    {"name": "chat", "share": 0.7, "slo": {"ttft": "150ms", "tpot": "100ms"}, "priority": 1},
    {"name": "batch", "share": 0.3, "slo": {"e2e": "10s"}, "priority": 0},
]


async def replay(scheduler: str, args: argparse.Namespace) -> dict[str, Any]:
    from testbed.broker.broker import Broker, BrokerConfig
    from testbed.broker.echo import echo_stages
    from testbed.broker.http import HttpStageTransport
    from testbed.broker.layout import Layout, WorkPredictor
    from testbed.cost.model import CostModel
    from testbed.cost.planner import make_plan
    from testbed.metrics.summary import SLO, summarize
    from testbed.partition import PARTITIONERS
    from testbed.schedule import SCHEDULERS
    from testbed.spec.classes import RequestClass
    from testbed.spec.model_profile import load_model_profile
    from testbed.spec.plan import RequestShape
    from testbed.spec.topology import load_topology
    from testbed.stage.batcher import BatchLimits
    from testbed.workload.request import TraceRequest

    topo = load_topology(REPO / "topologies" / "tiny.yaml")
    cost = CostModel(load_model_profile("tiny", dtype="float32"))
    plan = make_plan(
        topo,
        cost,
        PARTITIONERS.create("bsdp", {}),
        RequestShape(prompt_tokens=128, output_tokens=16, concurrency=8),
    )
    ranges = {n: (st.start, st.end) for st in plan.active_stages() for n in st.nodes}
    classes = tuple(RequestClass.model_validate(c) for c in CLASSES)
    rng = random.Random(args.seed)
    t, reqs = 0.0, []
    for i in range(args.requests):
        t += rng.expovariate(args.rate)
        reqs.append(TraceRequest(i, t, rng.randint(8, 64), rng.randint(4, 16), source_row=i))
    async with echo_stages(
        ranges, num_blocks=4, compute_s=args.compute_s, per_token_s=args.per_token_s,
        max_queue=4096, batch=BatchLimits(max_batch=args.max_batch),
    ) as stages:  # fmt: skip
        layout = Layout.from_plan(plan, topo, stages.urls, cost)
        broker = Broker(
            layout, WorkPredictor(layout, cost), SCHEDULERS.create(scheduler, {}),
            HttpStageTransport(stages.urls), lambda r: [5] * r.prompt_tokens,
            config=BrokerConfig(call_timeout_s=60, classes=classes, class_seed=args.seed,
                                max_inflight_per_node=1024),
        )  # fmt: skip
        async with broker:
            res = await broker.run(reqs)
    slos = {c.name: SLO(c.slo.ttft_s, c.slo.tpot_s, c.slo.e2e_s) for c in classes}
    return summarize(res.records, classes=slos).to_dict()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=80)
    p.add_argument("--rate", type=float, default=12.0, help="arrivals per second")
    p.add_argument("--max-batch", type=int, default=4)
    p.add_argument("--compute-s", type=float, default=0.01)
    p.add_argument("--per-token-s", type=float, default=0.0002)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    rows = []
    for sched in ("arts", "slo"):
        s = asyncio.run(replay(sched, a))
        chat, batch = s["classes"]["chat"], s["classes"]["batch"]
        rows.append((sched, chat["ttft_attainment"], chat["slo_attainment"],
                     batch["goodput_rps"], s["completed"], s["node_batch_mean"]))  # fmt: skip
    print(f"{a.requests} requests at {a.rate}/s, max_batch {a.max_batch}, seed {a.seed}")
    print(f"{'scheduler':>9} {'chat TTFT ok':>12} {'chat SLO ok':>11} {'batch goodput':>13} done")
    for sched, ttft, ok, good, done, _ in rows:
        print(f"{sched:>9} {ttft:>12.1%} {ok:>11.1%} {good:>11.2f}/s {done:>4}")
    for sched, *_, means in rows:
        print(f"{sched}: mean batch per node { ({n: round(b, 2) for n, b in means.items()}) }")


if __name__ == "__main__":
    main()
