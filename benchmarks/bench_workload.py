"""Workload benchmark: trace reading speed and arrival pacing lag, printed.

    .venv/bin/python benchmarks/bench_workload.py [--rows 500000] [--rate 2000] [--seconds 2]

1. Writes an Azure-format CSV of ``--rows`` rows to a temp folder and reads it through the
   reader + knobs (rows/s; the real 2024 traces have 17-27 M rows).
2. Paces ``--rate`` req/s Poisson arrivals for ``--seconds`` through ``arrivals()`` with an
   empty consumer and prints the release lag (the floor under the broker's injection lag).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

from testbed.metrics import Dist
from testbed.workload import Knobs, TraceRequest, apply_knobs, arrivals, read_azure


def bench_reader(rows: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "azure.csv"
        t0 = datetime(2024, 5, 10)
        rng = np.random.default_rng(0)
        gaps = np.cumsum(rng.exponential(0.05, rows))
        with p.open("w") as f:
            f.write("TIMESTAMP,ContextTokens,GeneratedTokens\n")
            for i, g in enumerate(gaps):
                ts = (t0 + timedelta(seconds=float(g))).strftime("%Y-%m-%d %H:%M:%S.%f") + "0"
                f.write(f"{ts},{100 + i % 900},{1 + i % 300}\n")
        t = time.perf_counter()
        reqs, stats = apply_knobs(read_azure(p), Knobs())
        dt = time.perf_counter() - t
        print(f"reader: {stats.rows_read} rows in {dt:.2f}s = {stats.rows_read / dt:,.0f} rows/s")
        t = time.perf_counter()
        reqs, stats = apply_knobs(read_azure(p), Knobs(start_s=0, duration_s=60))
        dt = time.perf_counter() - t
        print(
            f"reader, 60 s window at the start: {len(reqs)} requests in {dt * 1e3:.1f} ms (stops early)"
        )


async def bench_pacing(rate: float, seconds: float, spin_s: float) -> None:
    rng = np.random.default_rng(1)
    times = np.cumsum(rng.exponential(1 / rate, int(rate * seconds * 1.2)))
    reqs = [TraceRequest(i, float(t), 1, 1, i) for i, t in enumerate(times) if t < seconds]
    start = time.monotonic() + 0.05
    lags = [a.lag_s async for a in arrivals(reqs, start, spin_s=spin_s)]
    d = Dist.of(lags)
    print(
        f"pacing (spin_s={spin_s:g}): {len(lags)} arrivals at {rate:g} req/s over {seconds:g}s: lag "
        f"p50 {d.p50 * 1e3:.3f} ms, p99 {d.p99 * 1e3:.3f} ms, max {d.max * 1e3:.3f} ms"  # type: ignore[operator]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=500_000)
    ap.add_argument("--rate", type=float, default=2000.0)
    ap.add_argument("--seconds", type=float, default=2.0)
    a = ap.parse_args()
    bench_reader(a.rows)
    for spin_s in (0.0, 0.001):
        asyncio.run(bench_pacing(a.rate, a.seconds, spin_s))


if __name__ == "__main__":
    main()
