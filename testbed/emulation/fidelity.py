"""Pacing fidelity of an emulated run: did each step hold its node for its predicted time?

Every emulated stage keeps (predicted, emulated, real) seconds per step and serves them at
``GET /emulation?since=N``. :func:`collect` reads them from every node (the step counts taken
before the run let a reused testbed report one run's steps only); :func:`summarize_pacing` turns
them into the ``"emulation"`` block of ``summary.json``:

- ``overrun_fraction``: steps whose real work did not fit in their window;
- ``pacing_error_p50_s`` / ``_p99_s``: |emulated - predicted| percentiles, seconds;
- ``pacing_error_rel_p50`` / ``_p99``: the same relative to the prediction;
- ``real_over_predicted_p50`` / ``_p99``: how much of the window the real work used;
- per node: steps, overruns, busy seconds (emulated) and KV capacity.

With time dilation k, seconds are given on the emulated clock (measured / k).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import numpy as np

OVERRUN_WARN_FRACTION = 0.01  # above this a run warns (and --strict fails it)


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize_pacing(reports: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Node name -> its /emulation report (steps of this run) -> the summary block."""
    abs_err: list[float] = []
    rel_err: list[float] = []
    used: list[float] = []
    overruns = steps = 0
    nodes: dict[str, Any] = {}
    dilation = 1.0
    for name, rep in sorted(reports.items()):
        n_over = 0
        busy = 0.0
        k = float(rep.get("dilation", 1.0))  # seconds back on the emulated clock: / k
        for _kind, _q, _ctx, pred_k, emu_k, real_k in rep.get("steps", []):
            pred, emu, real = pred_k / k, emu_k / k, real_k / k
            steps += 1
            busy += emu
            abs_err.append(abs(emu - pred))
            if pred > 0:
                rel_err.append(abs(emu - pred) / pred)
                used.append(real / pred)
            if real > pred:
                n_over += 1
        overruns += n_over
        dilation = float(rep.get("dilation", dilation))
        nodes[name] = {
            "device": rep.get("device"),
            "steps": len(rep.get("steps", [])),
            "overruns": n_over,
            "busy_s": busy,
            "kv_capacity_tokens": rep.get("kv_capacity_tokens"),
        }
    frac = overruns / steps if steps else 0.0
    first = next(iter(reports.values()), {})
    return {
        "model": first.get("model"),
        "dtype": first.get("dtype"),
        "cost_source": first.get("cost_source"),
        "dilation": dilation,
        "steps": steps,
        "overruns": overruns,
        "overrun_fraction": frac,
        "overrun_warn_fraction": OVERRUN_WARN_FRACTION,
        "ok": frac <= OVERRUN_WARN_FRACTION,
        "pacing_error_p50_s": _pct(abs_err, 50),
        "pacing_error_p99_s": _pct(abs_err, 99),
        "pacing_error_rel_p50": _pct(rel_err, 50),
        "pacing_error_rel_p99": _pct(rel_err, 99),
        "real_over_predicted_p50": _pct(used, 50),
        "real_over_predicted_p99": _pct(used, 99),
        "nodes": nodes,
    }


async def collect(
    urls: Mapping[str, str], since: Mapping[str, int] | None = None, *, timeout_s: float = 30.0
) -> dict[str, dict[str, Any]]:
    """GET /emulation?since=N from every node; {} entries for nodes that are not emulated."""
    import aiohttp

    since = since or {}
    out: dict[str, dict[str, Any]] = {}
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one(name: str, url: str) -> None:
            try:
                async with session.get(
                    f"{url}/emulation", params={"since": str(since.get(name, 0))}
                ) as resp:
                    if resp.status == 200:
                        out[name] = await resp.json()
            except (aiohttp.ClientError, TimeoutError):
                return

        await asyncio.gather(*(one(n, u) for n, u in urls.items()))
    return out


async def step_counts(urls: Mapping[str, str]) -> dict[str, int]:
    """Steps each emulated node has recorded so far (taken before a run)."""
    reps = await collect(urls, {n: 1 << 62 for n in urls})
    return {n: int(r.get("steps_total", 0)) for n, r in reps.items()}
