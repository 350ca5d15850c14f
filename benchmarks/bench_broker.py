"""How fast can the broker admit requests on time?

Echo stages (the real stage server and wire format with a model-free, instant executor; one
process per node of the tiny topology, so the stages do not share the broker's event loop)
serve the bsdp plan of the tiny model. The broker replays Poisson arrivals at a rate stepped
up by x1.5 from --start-rps; a rate is *sustained* when every request completes and the
injection lag (first send - scheduled arrival) has p99 under --lag-ms. Prints each step and
the highest sustained rate.

    .venv/bin/python benchmarks/bench_broker.py [--seconds 3] [--output-tokens 2]

The number is a lower bound for the broker alone: on a small machine the echo stages' own
CPU use (3 HTTP calls per token) competes with it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testbed.broker.broker import Broker, BrokerConfig
from testbed.broker.http import HttpStageTransport
from testbed.broker.layout import Layout, WorkPredictor
from testbed.cost.model import CostModel
from testbed.cost.planner import make_plan
from testbed.metrics.summary import Dist
from testbed.partition import PARTITIONERS
from testbed.schedule import SCHEDULERS
from testbed.spec.model_profile import load_model_profile
from testbed.spec.plan import RequestShape
from testbed.spec.topology import load_topology
from testbed.workload.request import TraceRequest

REPO = Path(__file__).resolve().parents[1]


@contextlib.asynccontextmanager
async def echo_processes(ranges: dict[str, tuple[int, int]], num_blocks: int):  # type: ignore[no-untyped-def]
    procs = []
    urls: dict[str, str] = {}
    try:
        for node, (a, b) in ranges.items():
            p = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "testbed.broker.echo",
                "--node",
                node,
                "--blocks",
                f"{a}:{b}",
                "--num-blocks",
                str(num_blocks),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            procs.append(p)
        for p in procs:
            assert p.stdout is not None
            async with asyncio.timeout(60):
                line = await p.stdout.readline()
            info = json.loads(line)
            urls[info["node"]] = info["url"]
        yield urls
    finally:
        for p in procs:
            if p.stdin is not None:
                p.stdin.close()
        for p in procs:
            try:
                async with asyncio.timeout(10):
                    await p.wait()
            except TimeoutError:
                p.kill()
                await p.wait()


def poisson_requests(rate: float, seconds: float, prompt: int, out: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    n = max(1, int(rate * seconds))
    t = np.cumsum(rng.exponential(1.0 / rate, size=n))
    t -= t[0]
    return [TraceRequest(i, float(x), prompt, out, source_row=i) for i, x in enumerate(t)]


async def one_rate(layout, cost, rate: float, args) -> tuple[bool, Dist, int, float]:  # type: ignore[no-untyped-def]
    reqs = poisson_requests(rate, args.seconds, args.prompt_tokens, args.output_tokens, 0)
    prompt = list(range(4, 4 + args.prompt_tokens))
    broker = Broker(
        layout,
        WorkPredictor(layout, cost),
        SCHEDULERS.create(args.scheduler, {}),
        HttpStageTransport({n: i.url for n, i in layout.nodes.items()}),
        lambda _r: prompt,
        config=BrokerConfig(call_timeout_s=10.0, max_inflight_per_node=256, drain_timeout_s=60),
    )
    t0 = time.perf_counter()
    async with broker:
        res = await broker.run(reqs)
    wall = time.perf_counter() - t0
    lags = [r.injection_lag_s for r in res.records if r.injection_lag_s is not None]
    done = sum(r.status == "completed" for r in res.records)
    lag = Dist.of(lags)
    ok = done == len(reqs) and lag.p99 is not None and lag.p99 < args.lag_ms / 1e3
    return ok, lag, len(reqs) - done, wall


async def main_async(args: argparse.Namespace) -> None:
    topo = load_topology(REPO / "topologies" / "tiny.yaml")
    cost = CostModel(load_model_profile("tiny", dtype="float32"))
    plan = make_plan(
        topo,
        cost,
        PARTITIONERS.create("bsdp", {}),
        RequestShape(prompt_tokens=128, output_tokens=16, concurrency=8),
    )
    ranges = {n: (st.start, st.end) for st in plan.active_stages() for n in st.nodes}
    async with echo_processes(ranges, plan.num_blocks) as urls:
        layout = Layout.from_plan(plan, topo, urls, cost)
        print(
            f"echo stages: {', '.join(f'{n} {a}:{b}' for n, (a, b) in ranges.items())}; "
            f"requests of {args.prompt_tokens} prompt + {args.output_tokens} output tokens "
            f"({args.output_tokens * len(layout.stages)} stage calls each), "
            f"scheduler {args.scheduler}, {args.seconds:g}s per rate"
        )
        print(
            f"{'rate (req/s)':>12} {'lag p50':>9} {'lag p99':>9} {'lag max':>9} {'failed':>6}  ok"
        )
        best = None
        rate = args.start_rps
        misses = 0
        while rate <= args.max_rps:
            ok, lag, failed, _ = await one_rate(layout, cost, rate, args)
            print(
                f"{rate:12.0f} {lag.p50 * 1e3:8.2f}ms {lag.p99 * 1e3:8.2f}ms "  # type: ignore[operator]
                f"{lag.max * 1e3:8.2f}ms {failed:6d}  {'yes' if ok else 'no'}"  # type: ignore[operator]
            )
            if ok:
                best, misses = rate, 0
            else:
                misses += 1
                if misses >= 2:
                    break
            rate *= 1.5
    if best is None:
        print(f"the broker did not keep injection lag p99 under {args.lag_ms:g} ms at any rate")
    else:
        print(
            f"highest sustained rate: {best:.0f} req/s "
            f"(injection lag p99 < {args.lag_ms:g} ms, every request completed)"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, default=3.0, help="arrivals per rate step")
    p.add_argument("--start-rps", type=float, default=20.0)
    p.add_argument("--max-rps", type=float, default=5000.0)
    p.add_argument("--lag-ms", type=float, default=2.0)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--output-tokens", type=int, default=2)
    p.add_argument("--scheduler", default="arts")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
