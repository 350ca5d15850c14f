"""Wait for stage servers, then measure every shaped link against its configuration."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
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


async def health_of(session: aiohttp.ClientSession, url: str) -> str | None:
    """GET ``url``/health once: None when healthy, else why not ("HTTP 503", "ClientError")."""
    try:
        async with session.get(url + "/health") as resp:
            return None if resp.status == 200 else f"HTTP {resp.status}"
    except (aiohttp.ClientError, TimeoutError) as exc:
        return type(exc).__name__


async def health_report(tb: RunningTestbed, timeout_s: float = 3.0) -> dict[str, str]:
    """One health check of every node: "healthy" or "down (reason)"."""
    out: dict[str, str] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as s:
        for n in tb.nodes.values():
            why = await health_of(s, n.url)
            out[n.name] = "healthy" if why is None else f"down ({why})"
    return out


async def wait_urls_healthy(
    urls: Mapping[str, str | Sequence[str]],
    timeout_s: float,
    *,
    gone: Callable[[str], str | None] | None = None,
    interval_s: float = 0.25,
) -> dict[str, str]:
    """The one health wait: poll every ``name -> url`` until all answer 200. A name may have
    alternative urls (one node reached two ways), tried in order: the first that answers is
    the one returned for it (once one answers, the ones before it are tried again). ``gone(name)`` says why a node can no longer come up (its process
    exited), which fails at once. The error names the laggards and each url's last answer."""
    deadline = time.monotonic() + timeout_s
    alts = {n: [u] if isinstance(u, str) else list(u) for n, u in urls.items()}
    pending = set(alts)
    chosen: dict[str, str] = {}
    last_err: dict[str, dict[str, str]] = {n: {} for n in alts}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as session:
        while pending:
            for name in sorted(pending):
                for i, url in enumerate(alts[name]):
                    why = await health_of(session, url)
                    if why is None:  # the earlier ways once more: the stage may have begun
                        chosen[name] = url  # listening between their try and this one
                        for first in alts[name][:i]:
                            if await health_of(session, first) is None:
                                chosen[name] = first
                                break
                        break
                    last_err[name][url] = why
                if name in chosen:
                    pending.discard(name)
                    continue
                dead = gone(name) if gone is not None else None
                if dead is not None:
                    raise RuntimeBackendError(f"stage server {name} {dead} while starting")
            if not pending:
                break
            if time.monotonic() > deadline:
                detail = ", ".join(_laggard(n, alts[n], last_err[n]) for n in sorted(pending))
                raise StageTimeoutError(f"stage servers not healthy after {timeout_s:g}s: {detail}")
            await asyncio.sleep(interval_s)
    return chosen


def _laggard(name: str, urls: Sequence[str], errs: Mapping[str, str]) -> str:
    if len(urls) == 1:
        return f"{name} ({errs.get(urls[0], '?')})"
    return f"{name} (" + "; ".join(f"{u}: {errs.get(u, '?')}" for u in urls) + ")"


async def wait_healthy(tb: RunningTestbed, timeout_s: float = 120.0) -> None:
    """Wait until every stage node of ``tb`` answers /health."""
    await wait_urls_healthy({n.name: n.url for n in tb.stage_nodes()}, timeout_s)


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
    """Measure each node's feeding link from the host (one at a time, so links do not share
    the CPU), then the node-to-node links forwarding uses where the runtime has them."""
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
                LinkCheck(
                    node.name,
                    node.link,
                    cfg_rtt,
                    cfg_rate,
                    None,
                    None,
                    False,
                    str(exc),
                    measured_at=time.time(),
                )
            )
            continue
        ok, note = judge(cfg_rtt, cfg_rate, m.rtt_s, m.throughput_bps, tol)
        checks.append(
            LinkCheck(
                node.name,
                node.link,
                cfg_rtt,
                cfg_rate,
                m.rtt_s,
                m.throughput_bps,
                ok,
                note,
                measured_at=time.time(),
            )
        )
    from testbed.runtime.interface import runtime_of

    return checks + await runtime_of(tb).measure_node_links(tb, tol)
