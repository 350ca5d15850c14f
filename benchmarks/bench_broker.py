"""How fast can the broker admit requests on time?

Echo stages (the real stage server and wire format with a model-free, instant executor; one
process per node of the tiny topology, so the stages do not share the broker's event loop)
serve the bsdp plan of the tiny model. The broker replays Poisson arrivals at a rate stepped
up by x1.5 from --start-rps; a rate is *sustained* when every request completes and the
injection lag (first send - scheduled arrival) has p99 under --lag-ms. Each rate runs once per
transport (--transports): ``relay`` (the broker sends every hop: two messages per hop on its
loop) and ``forward`` (the broker sends each step to the first stage, the stages pass it on:
two messages per step on its loop); the two are printed side by side, then the highest
sustained rate of each.

    .venv/bin/python benchmarks/bench_broker.py [--seconds 3] [--output-tokens 2]

The numbers are lower bounds for the broker alone: on a small machine the echo stages' own
CPU use (3 stage calls per token) competes with it.
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
            async with asyncio.timeout(180):
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


async def one_rate(
    layout, cost, rate: float, transport: str, args
) -> tuple[bool, Dist, int, float]:  # type: ignore[no-untyped-def]
    """(sustained, injection lag, failed requests, broker CPU ms per request) at ``rate``."""
    reqs = poisson_requests(rate, args.seconds, args.prompt_tokens, args.output_tokens, 0)
    prompt = list(range(4, 4 + args.prompt_tokens))
    broker = Broker(
        layout,
        WorkPredictor(layout, cost),
        SCHEDULERS.create(args.scheduler, {}),
        HttpStageTransport({n: i.url for n, i in layout.nodes.items()}),
        lambda _r: prompt,
        config=BrokerConfig(
            call_timeout_s=10.0,
            max_inflight_per_node=256,
            drain_timeout_s=60,
            transport=transport,
        ),
    )
    cpu0 = time.process_time()  # the broker's process only (the stages are other processes)
    async with broker:
        res = await broker.run(reqs)
    cpu_ms = (time.process_time() - cpu0) * 1e3 / len(reqs)
    lags = [r.injection_lag_s for r in res.records if r.injection_lag_s is not None]
    done = sum(r.status == "completed" for r in res.records)
    lag = Dist.of(lags)
    ok = done == len(reqs) and lag.p99 is not None and lag.p99 < args.lag_ms / 1e3
    return ok, lag, len(reqs) - done, cpu_ms


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
            f"({args.output_tokens * len(layout.stages)} stage calls each: relay sends them all, "
            f"forward {args.output_tokens}), "
            f"scheduler {args.scheduler}, {args.seconds:g}s per rate"
        )
        transports = [t.strip() for t in args.transports.split(",") if t.strip()]
        head = "".join(
            f" | {t + ' lag p50':>13} {'p99':>8} {'max':>8} {'fail':>4} {'cpu/req':>7} ok "
            for t in transports
        )
        print(f"{'rate (req/s)':>12}{head}")
        best: dict[str, float | None] = dict.fromkeys(transports)
        misses = dict.fromkeys(transports, 0)
        rate = args.start_rps
        while rate <= args.max_rps and any(m < 2 for m in misses.values()):
            row = f"{rate:12.0f}"
            for t in transports:
                if misses[t] >= 2:  # gave up on this transport: keep the column aligned
                    row += f" | {'-':>13} {'-':>8} {'-':>8} {'-':>4} {'-':>7} -  "
                    continue
                ok, lag, failed, cpu_ms = await one_rate(layout, cost, rate, t, args)
                row += (
                    f" | {lag.p50 * 1e3:11.2f}ms {lag.p99 * 1e3:6.2f}ms "  # type: ignore[operator]
                    f"{lag.max * 1e3:6.2f}ms {failed:4d} {cpu_ms:5.2f}ms {'yes' if ok else 'no ':3}"  # type: ignore[operator]
                )
                if ok:
                    best[t], misses[t] = rate, 0
                else:
                    misses[t] += 1
            print(row, flush=True)
            rate *= 1.5
    for t in transports:
        b = best[t]
        if b is None:
            print(
                f"{t}: the broker did not keep injection lag p99 under {args.lag_ms:g} ms at any rate"
            )
        else:
            print(
                f"{t}: highest sustained rate {b:.0f} req/s "
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
    p.add_argument("--transports", default="relay,forward", help="comma-separated, side by side")
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
