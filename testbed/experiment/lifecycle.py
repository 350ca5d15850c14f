"""A testbed for a run: attach to the running one, or bring one up here (and down after)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from rich.console import Console

from testbed.errors import ConfigError, RuntimeBackendError
from testbed.experiment.prepare import Prepared
from testbed.runtime.base import RunningTestbed
from testbed.runtime.interface import Runtime, UpRequest
from testbed.spec.plan import Plan


async def bring_up(
    prep: Prepared, runtime: Runtime, *, health_timeout_s: float = 300.0
) -> RunningTestbed:
    """Start stage servers for ``prep.plan`` with ``runtime`` (this process owns the run)."""
    from testbed.runtime.control import bring_up as runtime_bring_up

    req = UpRequest(
        prep.topology,
        str(prep.loaded.topology_path),
        prep.plan,
        prep.weights,
        seed=prep.loaded.spec.seed,
        health_timeout_s=health_timeout_s,
        extra_serve_args=prep.serve_args,
    )
    return await runtime_bring_up(runtime, req)


async def take_down(run_id: str) -> str:
    from testbed.runtime.control import down_sync

    return await asyncio.to_thread(down_sync, run_id)


def plan_matches(tb: RunningTestbed, plan: Plan) -> bool:
    from testbed.runtime.reload import plan_ranges

    have = {n.name: (n.start, n.end) for n in tb.stage_nodes()}
    return plan_ranges(plan) == have


def reload_refusal(tb: RunningTestbed, prep: Prepared) -> str | None:
    """Why ``tb`` cannot take ``prep``'s plan by loading block ranges into its running nodes
    (:mod:`testbed.runtime.reload`), or None when it can."""
    from testbed.runtime.reload import missing_nodes, plan_ranges

    if tb.topology_name != prep.topology.name:
        return f"it runs topology {tb.topology_name!r}"
    missing = missing_nodes(tb, plan_ranges(prep.plan))
    if missing:
        return f"it runs no node {', '.join(missing)}"
    if any(ev.kind == "up" for ev in prep.loaded.spec.timeline or ()):
        return "the timeline restarts nodes (a restarted node comes back with its first range)"
    return link_net_refusal(tb, prep.plan)


def link_net_refusal(tb: RunningTestbed, plan: Plan) -> str | None:
    """Forwarding's link networks (docker, swarm) join the nodes of consecutive stages of the
    plan a testbed was brought up with: a plan whose stages sit in other tiers, or on nodes
    that do not serve now, would send hidden states where no link network goes."""
    if not any(n.peer_url for n in tb.nodes.values()):
        return None
    have: dict[str, set[str]] = {}
    for n in tb.stage_nodes():
        have.setdefault(n.tier, set()).add(n.name)
    stages = plan.active_stages()
    if [st.tier for st in stages] != list(have):
        return (
            f"its link networks join tiers {' -> '.join(have)}, this plan's stages are in "
            f"{' -> '.join(st.tier for st in stages)}"
        )
    for st in stages:
        extra = sorted(set(st.nodes) - have[st.tier])
        if extra:
            return f"{', '.join(extra)} joined no link network when it came up"
    return None


async def reload_announced(tb: RunningTestbed, prep: Prepared, console: Console) -> None:
    """Load ``prep``'s plan into ``tb``'s running nodes, telling the user what and how long."""
    from testbed.runtime.reload import load_ranges, plan_ranges

    console.print(
        f"loading the {prep.partitioner} plan (cuts {list(prep.plan.cuts)}) into testbed "
        f"{tb.run_id} ..."
    )
    done = await load_ranges(tb, plan_ranges(prep.plan))
    console.print(f"testbed {tb.run_id}: {done.describe()}")


async def up_announced(
    prep: Prepared, runtime: Runtime, console: Console, health_timeout_s: float
) -> RunningTestbed:
    """:func:`bring_up`, telling the user what and how long."""
    console.print(
        f"bringing up {prep.topology.name} ({runtime.name}) with the {prep.partitioner} plan "
        f"(cuts {list(prep.plan.cuts)}) ..."
    )
    t = time.monotonic()
    tb = await bring_up(prep, runtime, health_timeout_s=health_timeout_s)
    console.print(f"testbed {tb.run_id} up in {time.monotonic() - t:.1f}s (shaping: {tb.backend})")
    return tb


@contextlib.asynccontextmanager
async def testbed_for(
    prep: Prepared,
    *,
    up: bool | None,
    runtime: Runtime,
    run_id: str | None,
    console: Console,
    health_timeout_s: float = 300.0,
) -> AsyncIterator[tuple[RunningTestbed, bool]]:
    """Yield (RunningTestbed, brought_up_here). ``up``: True = always bring one up;
    False = only attach; None = attach to the running one, else bring one up."""
    from testbed.runtime.base import load_running

    tb = None
    if up is not True:
        try:
            tb = await asyncio.to_thread(load_running, run_id)
        except RuntimeBackendError as exc:
            if up is False or run_id is not None:
                raise RuntimeBackendError(
                    f"{exc}; or let replay bring one up and down itself: --up"
                ) from None
        if tb is not None and tb.topology_name != prep.topology.name:
            raise ConfigError(
                f"the running testbed {tb.run_id} is topology {tb.topology_name!r}, the scenario "
                f"wants {prep.topology.name!r}; `testbed down` it or replay with --up"
            )
        if tb is not None and not plan_matches(tb, prep.plan):
            console.print(
                f"[yellow]note[/]: testbed {tb.run_id} holds other block ranges than the "
                f"{prep.partitioner} plan; replaying on the ranges it holds"
            )
    if tb is not None:
        yield tb, False
        return
    tb = await up_announced(prep, runtime, console, health_timeout_s)
    try:
        yield tb, True
    finally:
        msg = await asyncio.shield(take_down(tb.run_id))
        console.print(f"down: {msg}")
