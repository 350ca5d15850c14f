"""Wait for stage servers, then measure every shaped link against its configuration."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import aiohttp

from testbed.errors import RuntimeBackendError, StageTimeoutError
from testbed.net.probe import measure_link
from testbed.runtime.base import LinkCheck, RunningTestbed


@dataclass(frozen=True)
class Tolerance:
    rtt_rel: float = 0.25  # measured RTT within +-25% of configured ...
    rtt_abs_s: float = 0.003  # ... or within 3 ms (loopback/bridge overhead dominates small RTTs)
    rate_rel: float = 0.20  # measured throughput within +-20% of configured


async def wait_healthy(tb: RunningTestbed, timeout_s: float = 120.0) -> None:
    """GET /health on every stage node until all answer 200; a clear error names the laggards."""
    deadline = time.monotonic() + timeout_s
    pending = {n.name for n in tb.stage_nodes()}
    last_err: dict[str, str] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as session:
        while pending:
            for name in sorted(pending):
                url = tb.nodes[name].url + "/health"
                try:
                    async with session.get(url) as resp:
                        if resp.status == 200:
                            pending.discard(name)
                        else:
                            last_err[name] = f"HTTP {resp.status}"
                except (aiohttp.ClientError, TimeoutError) as exc:
                    last_err[name] = type(exc).__name__
            if not pending:
                break
            if time.monotonic() > deadline:
                detail = ", ".join(f"{n} ({last_err.get(n, '?')})" for n in sorted(pending))
                raise StageTimeoutError(f"stage servers not healthy after {timeout_s:g}s: {detail}")
            await asyncio.sleep(0.25)


def judge(
    configured_rtt_s: float,
    configured_rate_bps: float | None,
    rtt_s: float,
    rate_bps: float | None,
    tol: Tolerance,
) -> tuple[bool, str]:
    notes = []
    if abs(rtt_s - configured_rtt_s) > max(tol.rtt_abs_s, tol.rtt_rel * configured_rtt_s):
        notes.append(f"RTT off by {(rtt_s - configured_rtt_s) * 1e3:+.1f}ms")
    if configured_rate_bps and rate_bps is not None:
        err = rate_bps / configured_rate_bps - 1
        if abs(err) > tol.rate_rel:
            notes.append(f"throughput off by {err * 100:+.0f}%")
    return (not notes), "; ".join(notes)


async def measure_links(
    tb: RunningTestbed,
    *,
    tol: Tolerance | None = None,
    seconds: float = 0.5,
    timeout_s: float = 60.0,
) -> list[LinkCheck]:
    """Measure each node's feeding link (one at a time, so links do not share the CPU)."""
    tol = tol or Tolerance()
    checks = []
    for node in sorted(tb.nodes.values(), key=lambda n: (n.tier_index, n.name)):
        if node.link is None:
            continue
        cfg_rtt, cfg_rate = node.link_rtt_s, node.link_rate_bps
        try:
            m = await measure_link(
                node.address,
                node.probe_port,
                hook=node.hook,
                expected_rate_bps=cfg_rate,
                seconds=seconds,
                timeout_s=timeout_s,
            )
        except RuntimeBackendError as exc:
            checks.append(
                LinkCheck(node.name, node.link, cfg_rtt, cfg_rate, None, None, False, str(exc))
            )
            continue
        ok, note = judge(cfg_rtt, cfg_rate, m.rtt_s, m.throughput_bps, tol)
        checks.append(
            LinkCheck(node.name, node.link, cfg_rtt, cfg_rate, m.rtt_s, m.throughput_bps, ok, note)
        )
    return checks
