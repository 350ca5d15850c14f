"""How fast can the broker admit requests on time?

Echo stages (the real stage server and wire format with a model-free, instant executor; one
process per node of the tiny topology, so the stages do not share the broker's event loop)
serve the bsdp plan of the tiny model. The broker replays Poisson arrivals at a rate stepped
up by x1.5 from --start-rps (each for --seconds, or longer to have --min-requests arrivals);
a rate is *sustained* when every request completes and the
injection lag (first send - scheduled arrival) has p99 under --lag-ms. Each rate runs once per
transport (--transports): ``relay`` (the broker sends every hop: two messages per hop on its
loop) and ``forward`` (the broker sends each step to the first stage, the stages pass it on:
two messages per step on its loop); the two are printed side by side, then the highest
sustained rate of each (a transport stops after --patience rates in a row overloaded: failed
requests or lag p99 over 50x --lag-ms), and
each one's CPU per request at the highest rate it completed.

    .venv/bin/python benchmarks/bench_broker.py [--seconds 3] [--output-tokens 2]

The numbers are lower bounds for the broker alone: on a small machine the echo stages' own
CPU use (3 stage calls per token) competes with it. So the echo stages run at a lower CPU
priority (``--echo-nice``, default +10: when both want a core, the broker's loop gets it), and
each row shows the CPU time per request of the broker's process (``cpu/req``) and of the
echo stage processes together (``echo/req``): on a shared host these are steadier than lags,
and their sum times the rate is the cores the run needs.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
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


def cpu_seconds(pids: tuple[int, ...]) -> float:
    """User + system CPU seconds of processes ``pids`` so far (Linux /proc; 0 elsewhere)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime in clock ticks
    return total / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.0


@contextlib.asynccontextmanager
async def echo_processes(ranges: dict[str, tuple[int, int]], num_blocks: int, nice: int = 0):  # type: ignore[no-untyped-def]
    """One echo stage process per node, at ``nice`` (yields node -> URL, and the pids)."""
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
                preexec_fn=(lambda: os.nice(nice)) if nice else None,
            )
            procs.append(p)
        for p in procs:
            assert p.stdout is not None
            async with asyncio.timeout(180):
                line = await p.stdout.readline()
            info = json.loads(line)
            urls[info["node"]] = info["url"]
        yield urls, tuple(p.pid for p in procs)
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
    layout, cost, rate: float, transport: str, args, echo_pids: tuple[int, ...] = ()
) -> tuple[bool, Dist, int, float, float]:  # type: ignore[no-untyped-def]
    """(sustained, injection lag, failed requests, broker CPU ms per request, echo stages' CPU
    ms per request) at ``rate``."""
    seconds = max(args.seconds, args.min_requests / rate)  # enough arrivals for a p99
    reqs = poisson_requests(rate, seconds, args.prompt_tokens, args.output_tokens, 0)
    prompt = list(range(4, 4 + args.prompt_tokens))
    broker = Broker(
        layout,
        WorkPredictor(layout, cost),
        SCHEDULERS.create(args.scheduler, {}),
        HttpStageTransport({n: i.url for n, i in layout.nodes.items()}),
        lambda _r: prompt,
        config=BrokerConfig(
            call_timeout_s=10.0,
            max_inflight_per_node=32,  # pooled connections stay under a stage port's 64
            max_active_requests=250,  # an echo stage holds 256 caches: overload waits here
            drain_timeout_s=60,
            transport=transport,
        ),
    )
    cpu0 = time.process_time()  # the broker's process only (the stages are other processes)
    echo0 = cpu_seconds(echo_pids)
    async with broker:
        res = await broker.run(reqs)
    cpu_ms = (time.process_time() - cpu0) * 1e3 / len(reqs)
    echo_ms = (cpu_seconds(echo_pids) - echo0) * 1e3 / len(reqs)
    lags = [r.injection_lag_s for r in res.records if r.injection_lag_s is not None]
    done = sum(r.status == "completed" for r in res.records)
    reasons = collections.Counter(r.reason for r in res.records if r.status != "completed")
    for reason, n in reasons.most_common(3):  # why, on stderr (the table stays aligned)
        print(f"  {transport} at {rate:.0f} req/s: {n} failed: {reason}", file=sys.stderr)
    lag = Dist.of(lags)
    ok = done == len(reqs) and lag.p99 is not None and lag.p99 < args.lag_ms / 1e3
    return ok, lag, len(reqs) - done, cpu_ms, echo_ms


Rows = dict[tuple[str, float], tuple[float, float]]  # (transport, rate) -> (cpu ms, lag p99 s)


async def main_async(args: argparse.Namespace) -> Rows:
    """One sweep on the running event loop; the broker's CPU per request and lag p99 of every
    (transport, rate) at which every request completed."""
    topo = load_topology(REPO / "topologies" / "tiny.yaml")
    cost = CostModel(load_model_profile("tiny", dtype="float32"))
    plan = make_plan(
        topo,
        cost,
        PARTITIONERS.create("bsdp", {}),
        RequestShape(prompt_tokens=128, output_tokens=16, concurrency=8),
    )
    ranges = {n: (st.start, st.end) for st in plan.active_stages() for n in st.nodes}
    async with echo_processes(ranges, plan.num_blocks, args.echo_nice) as (urls, pids):
        layout = Layout.from_plan(plan, topo, urls, cost)
        print(
            f"echo stages: {', '.join(f'{n} {a}:{b}' for n, (a, b) in ranges.items())}; "
            f"requests of {args.prompt_tokens} prompt + {args.output_tokens} output tokens "
            f"({args.output_tokens * len(layout.stages)} stage calls each: relay sends them all, "
            f"forward {args.output_tokens}), "
            f"scheduler {args.scheduler}, {args.seconds:g}s per rate, echo stages at nice "
            f"{args.echo_nice:+d}"
        )
        transports = [t.strip() for t in args.transports.split(",") if t.strip()]
        head = "".join(
            f" | {t + ' lag p50':>13} {'p99':>8} {'max':>8} {'fail':>4} {'cpu/req':>7} "
            f"{'echo/req':>8} ok "
            for t in transports
        )
        print(f"{'rate (req/s)':>12}{head}")
        best: dict[str, float | None] = dict.fromkeys(transports)
        misses = dict.fromkeys(transports, 0)
        cpu: dict[str, tuple[float, float, float]] = {}  # the highest rate with no failure
        done: Rows = {}
        rate = args.start_rps
        while rate <= args.max_rps and any(m < args.patience for m in misses.values()):
            row = f"{rate:12.0f}"
            for t in transports:
                if misses[t] >= args.patience:  # gave up on this transport: keep the column aligned
                    row += f" | {'-':>13} {'-':>8} {'-':>8} {'-':>4} {'-':>7} {'-':>8} -  "
                    continue
                ok, lag, failed, cpu_ms, echo_ms = await one_rate(layout, cost, rate, t, args, pids)
                row += (
                    f" | {lag.p50 * 1e3:11.2f}ms {lag.p99 * 1e3:6.2f}ms "  # type: ignore[operator]
                    f"{lag.max * 1e3:6.2f}ms {failed:4d} {cpu_ms:5.2f}ms {echo_ms:6.2f}ms "  # type: ignore[operator]
                    f"{'yes' if ok else 'no ':3}"
                )
                if not failed:
                    cpu[t] = (rate, cpu_ms, echo_ms)
                    done[(t, rate)] = (cpu_ms, lag.p99 if lag.p99 is not None else float("nan"))
                if ok:
                    best[t] = rate
                # overloaded (requests failed, or lag p99 over 50x the bound): the next rate
                # will not do better; a lag miss alone may be a busy host's noise
                overloaded = failed > 0 or lag.p99 is None or lag.p99 > 50 * args.lag_ms / 1e3
                misses[t] = misses[t] + 1 if overloaded else 0
            print(row, flush=True)
            rate *= 1.5
    for t, (r, broker_ms, echo_ms) in cpu.items():
        print(
            f"{t}: at {r:.0f} req/s the broker used {broker_ms:.2f} ms CPU per request (one "
            f"core: {1e3 / broker_ms:.0f} req/s), the echo stages {echo_ms:.2f} ms "
            f"(broker + stages on {os.cpu_count()} idle cores: "
            f"{(os.cpu_count() or 1) * 1e3 / (broker_ms + echo_ms):.0f} req/s)"
        )
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
    return done


def use_loop(name: str) -> None:
    """Run the next sweep on event loop ``name``: asyncio's own, or uvloop (not in the lock:
    `uv pip install uvloop` into the environment to compare)."""
    if name == "asyncio":
        asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())
        return
    if name != "uvloop":
        raise SystemExit(f"--loops: {name!r} is not asyncio or uvloop")
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        print(
            "--loops uvloop: uvloop is not installed (it is not in uv.lock); "
            "`.tools/bin/uv pip install --python .venv/bin/python uvloop` to compare",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def compare_loops(runs: dict[str, Rows]) -> None:
    """Per transport and rate that every loop completed, each loop's broker CPU per request and
    lag p99, as ratios to the first loop's."""
    first, *others = runs
    transports = sorted(
        {t for rows in runs.values() for t, _ in rows}, key=["relay", "forward"].index
    )
    print(f"event loops side by side (ratios to {first}):")
    for t in transports:
        common = set.intersection(*({r for tt, r in rows if tt == t} for rows in runs.values()))
        if not common:
            print(f"  {t}: no rate that every loop completed")
        for rate in sorted(common):
            base_cpu, base_lag = runs[first][(t, rate)]
            cells = [f"{first} {base_cpu:.2f} ms CPU/req, lag p99 {base_lag * 1e3:.2f} ms"]
            for name in others:
                c, lag = runs[name][(t, rate)]
                cells.append(
                    f"{name} {c:.2f} ms ({c / base_cpu:.2f}x), lag p99 {lag * 1e3:.2f} ms "
                    f"({lag / base_lag:.2f}x)"
                )
            print(f"  {t:>7} at {rate:4.0f} req/s: " + "; ".join(cells))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seconds", type=float, default=3.0, help="arrivals per rate step")
    p.add_argument(
        "--min-requests",
        type=int,
        default=300,
        help="at least this many arrivals per rate step (a low rate runs longer)",
    )
    p.add_argument("--start-rps", type=float, default=20.0)
    p.add_argument("--max-rps", type=float, default=5000.0)
    p.add_argument("--lag-ms", type=float, default=2.0)
    p.add_argument(
        "--patience",
        type=int,
        default=2,
        help="stop stepping a transport up after this many overloaded rates in a row",
    )
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--output-tokens", type=int, default=2)
    p.add_argument("--scheduler", default="arts")
    p.add_argument("--transports", default="relay,forward", help="comma-separated, side by side")
    p.add_argument(
        "--echo-nice",
        type=int,
        default=10,
        help="CPU niceness of the echo stage processes (0: the broker's priority)",
    )
    p.add_argument(
        "--loops",
        default="asyncio",
        help="event loops of the broker, comma-separated: each runs the whole sweep, then they "
        "are compared side by side (asyncio,uvloop; uvloop is not in the lock)",
    )
    args = p.parse_args()
    loops = [x.strip() for x in args.loops.split(",") if x.strip()]
    runs: dict[str, Rows] = {}
    for name in loops:
        use_loop(name)
        if len(loops) > 1:
            print(f"== broker event loop: {name}", flush=True)
        runs[name] = asyncio.run(main_async(args))
    if len(runs) > 1:
        compare_loops(runs)


if __name__ == "__main__":
    main()
