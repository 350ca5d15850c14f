"""Up, down, clean, and changes while running, for every runtime (the CLI and experiments call
these; the runtime itself is chosen by name from :data:`RUNTIMES`, never by comparing names)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from testbed.errors import ConfigError, RuntimeBackendError
from testbed.net.detect import PROBE_NETNS_PREFIX
from testbed.net.links import node_shaping_for_link
from testbed.net.shaping import BACKENDS, DirShape
from testbed.runtime import owner as ownership
from testbed.runtime.base import (
    RunningTestbed,
    check_run_id,
    list_states,
    load_running,
    state_dir,
)
from testbed.runtime.interface import RUNTIMES, Runtime, UpRequest, runtime_of

if TYPE_CHECKING:
    from testbed.spec.topology import LinkSpec

NETNS_PREFIX = "testbed-"  # network namespaces the testbed (or its tests) create
NETNS_DIR = Path("/var/run/netns")


def check_backend(requested: str | None) -> None:
    if requested is not None and requested not in BACKENDS:
        raise ConfigError(
            f"unknown shaping backend {requested!r}; use one of {', '.join(BACKENDS)}",
            field="--backend",
        )


async def bring_up(
    runtime: Runtime, req: UpRequest, *, measure: bool = False, strict: bool = False
) -> RunningTestbed:
    """The one bring-up: choose the shaping backend, start the nodes, optionally measure every
    link (``strict``: a link off its configuration takes the testbed down and raises).
    The caller owns the run (it is recorded as its owner) until it calls :func:`detach`."""
    from testbed.runtime.measure import measure_links

    check_backend(req.backend)
    backend = await runtime.backend(req.backend)
    tb = await runtime.up(req, backend)
    if not measure:
        return tb
    try:
        tb.checks = await measure_links(tb)
        await asyncio.to_thread(tb.save)
        bad = [c for c in tb.checks if not c.ok]
        if bad and strict:
            raise RuntimeBackendError(
                "links off their configuration (--strict): "
                + "; ".join(f"{c.src} -> {c.node} ({c.link}): {c.note}" for c in bad)
                + "; testbed taken down"
            )
    except BaseException:
        await asyncio.shield(asyncio.to_thread(runtime.remove, tb.run_id, tb))
        raise
    return tb


async def detach(tb: RunningTestbed) -> None:
    """Hand the run over: it now outlives this process (stopped by `testbed down`)."""
    tb.owner = None
    await asyncio.to_thread(tb.save)


def forget(run_id: str) -> None:
    """Remove the run's state file and log folder (after its nodes are gone)."""
    check_run_id(run_id)
    with contextlib.suppress(OSError):
        (state_dir() / f"{run_id}.json").unlink()
    shutil.rmtree(state_dir() / f"{run_id}-logs", ignore_errors=True)


def down_sync(run_id: str | None = None) -> str:
    """Stop and remove everything of a run (default: the latest). Safe to repeat."""
    if run_id is None:
        states = list_states()
        if not states:
            return "nothing to do: no testbed run recorded"
        run_id = states[-1].stem
    check_run_id(run_id)
    try:
        tb = load_running(run_id)
    except RuntimeBackendError:
        # no (readable) state file: whatever runtime may still hold objects labelled with it
        msgs = []
        for name in RUNTIMES.names():
            try:
                msgs.append(RUNTIMES.create(name).remove(run_id, None))
            except RuntimeBackendError as exc:
                msgs.append(f"{name} skipped: {exc}")
        forget(run_id)
        return "; ".join(msgs)
    return runtime_of(tb).remove(run_id, tb)


@dataclass(frozen=True)
class RunState:
    """What `clean` needs to know about one recorded run (gathered first, then judged)."""

    run_id: str
    readable: bool  # the state file parses
    owner: tuple[int, int] | None  # None: detached
    owner_alive: bool
    present: bool  # the runtime still has some of its nodes


def is_orphan(s: RunState) -> bool:
    """A run nobody will clean up: its owner died before handing it over, or it was handed
    over and its nodes are all gone (or its state file is unreadable)."""
    if not s.readable:
        return True
    if s.owner is not None:
        return not s.owner_alive
    return not s.present


def _state_of(path: Path) -> tuple[RunState, RunningTestbed | None]:
    try:
        tb = load_running(path.stem)
    except (RuntimeBackendError, ConfigError):
        return RunState(path.stem, False, None, False, False), None
    alive = tb.owner is not None and ownership.alive(tb.owner)
    present = tb.owner is not None or runtime_of(tb).present(tb)
    return RunState(tb.run_id, True, tb.owner, alive, present), tb


def clean_sync(*, everything: bool = False, runs: tuple[str, ...] = ()) -> list[str]:
    """Remove what no live testbed owns: orphaned runs (owner gone, or handed over with no node
    left), plus the ``runs`` named. ``everything``: every run recorded here, every object
    labelled as the testbed's and every testbed network namespace, whoever owns them."""
    for r in runs:
        check_run_id(r)
    done: list[str] = []
    for path in list_states():
        state, tb = _state_of(path)
        if not (everything or path.stem in runs or is_orphan(state)):
            continue
        if tb is None:
            forget(path.stem)
            done.append(f"removed unreadable state {path.name}")
            continue
        try:
            done.append(runtime_of(tb).remove(tb.run_id, tb))
        except RuntimeBackendError as exc:
            done.append(f"{tb.run_id}: {exc}")
    for r in runs:
        if not (state_dir() / f"{r}.json").exists() and not any(r in d for d in done):
            done.append(down_sync(r))
    if everything:
        for name in RUNTIMES.names():
            done += RUNTIMES.create(name).remove_all()
    done += _clean_netns(everything)
    return done or ["nothing to clean"]


def _clean_netns(everything: bool) -> list[str]:
    """Probe namespaces of dead processes; with ``everything``, every testbed namespace."""
    done: list[str] = []
    if not NETNS_DIR.exists():
        return done
    for entry in sorted(NETNS_DIR.iterdir()):
        name = entry.name
        if not name.startswith((NETNS_PREFIX, PROBE_NETNS_PREFIX)):
            continue
        if not everything:
            pid = name.removeprefix(PROBE_NETNS_PREFIX)
            if not (name.startswith(PROBE_NETNS_PREFIX) and pid.isdigit()):
                continue
            if ownership.start_ticks(int(pid)) is not None:
                continue
        try:
            from pyroute2 import netns

            netns.remove(name)
            done.append(f"removed netns {name}")
        except OSError as exc:
            done.append(f"could not remove netns {name}: {exc}")
    return done


async def set_link(
    tb: RunningTestbed,
    src_tier: str,
    dst_tier: str,
    link: LinkSpec,
    *,
    previous: LinkSpec | None = None,
) -> None:
    """Change the link between two consecutive tiers while running (kernel and app parts).

    ``link`` is a topology ``LinkSpec`` (parsed units); it applies to every node of the
    downstream tier, in both directions. ``previous``: the link as applied now; given, the
    kernel qdiscs are changed in place rather than rebuilt.
    """
    tiers = {n.tier: n.tier_index for n in tb.nodes.values()}
    if src_tier not in tiers and dst_tier not in tiers:
        raise ConfigError(f"unknown tiers {src_tier!r} -> {dst_tier!r}")
    targets = [
        n
        for n in tb.nodes.values()
        if n.link in (f"{src_tier}->{dst_tier}", f"{dst_tier}->{src_tier}")
    ]
    if not targets:
        raise ConfigError(f"no running node is fed by a link {src_tier} -> {dst_tier}")
    runtime = runtime_of(tb)
    for ep in targets:
        ns = node_shaping_for_link(ep.name, ep.tier, ep.tier_index, ep.link, link, tb.backend)
        old = None
        if previous is not None:
            o = node_shaping_for_link(
                ep.name, ep.tier, ep.tier_index, ep.link, previous, tb.backend
            )
            old = (o.downlink, o.uplink)
        await runtime.set_link(tb, ep.name, ns.downlink, ns.uplink, previous=old)
        ep.hop = ns.hop
        if ep.hook is not None and ns.hop is not None:
            ep.hook.set_shape(ns.hop)
        elif ns.hop is not None:
            ep.make_hook(tb.seed)
        ep.link_rtt_s = ns.configured_rtt_s
        ep.link_rate_bps = ns.configured_rate_bps
    await asyncio.to_thread(tb.save)


async def set_node_cpu(tb: RunningTestbed, node: str, cpus: float) -> None:
    """Change a node's CPU quota while running (where the runtime has quotas)."""
    if node not in tb.nodes:
        raise ConfigError(f"unknown node {node!r}; nodes: {', '.join(sorted(tb.nodes))}")
    if not cpus > 0:
        raise ConfigError(f"cpus must be > 0, got {cpus!r}")
    await runtime_of(tb).set_cpu(tb, node, cpus)
    ep = tb.nodes[node]
    tb.nodes[node] = replace(ep, cpus=cpus, base_cpus=ep.base_cpus or ep.cpus)
    await asyncio.to_thread(tb.save)


# -- a scenario timeline's node events ------------------------------------------------------

CUT = DirShape(loss_pct=100.0)  # a partitioned direction: every packet dropped


def _link_now(tb: RunningTestbed, node: str, link: LinkSpec | None) -> tuple[DirShape, DirShape]:
    ep = tb.nodes[node]
    ns = node_shaping_for_link(ep.name, ep.tier, ep.tier_index, ep.link, link, tb.backend)
    return ns.downlink, ns.uplink


async def crash_node(tb: RunningTestbed, node: str) -> None:
    """The node's stage server is killed (a container killed, a process SIGKILLed)."""
    await runtime_of(tb).kill_node(tb, node)


async def restart_node(tb: RunningTestbed, node: str, link: LinkSpec | None) -> None:
    """A crashed node started again; ``link``: its feeding link as it is now."""
    down, up = _link_now(tb, node, link)
    await runtime_of(tb).restart_node(tb, node, down, up)
    ep = tb.nodes[node]
    if ep.emulated and ep.speed != 1.0:  # a new stage paces at 1: its slowdown goes on
        from testbed.errors import StageTimeoutError
        from testbed.runtime.measure import wait_urls_healthy

        try:
            await wait_urls_healthy({ep.name: ep.url}, 300.0)
        except StageTimeoutError as exc:  # a timeline step fails as a runtime's does
            raise RuntimeBackendError(f"{node}: restarted, but {exc}") from exc
        await _post_speed(ep.name, ep.url, ep.speed)


async def partition_node(tb: RunningTestbed, node: str, cut: bool, link: LinkSpec | None) -> None:
    """Cut (or heal) every link of ``node``: with kernel netem both directions drop every
    packet (connections stay, TCP retransmits once healed); otherwise the broker's transport
    holds every message to the node until healed or timed out (:mod:`testbed.broker.gate`)."""
    ep = tb.nodes[node]
    if tb.backend == "kernel":
        now = _link_now(tb, node, link)
        new, old = ((CUT, CUT), now) if cut else (now, (CUT, CUT))
        await runtime_of(tb).set_link(tb, node, new[0], new[1], previous=old)
    else:
        ep.partitioned = cut
    await asyncio.to_thread(tb.save)


async def set_node_speed(
    tb: RunningTestbed, node: str, speed: float, *, crashed: bool = False
) -> None:
    """Run ``node`` at ``speed`` x its compute: an emulated device paces its steps to its
    predicted time / speed (the stage's ``POST /speed``; for a ``crashed`` one, once it is
    restarted); a real node gets its CPU quota scaled (a duty cycle locally)."""
    if node not in tb.nodes:
        raise ConfigError(f"unknown node {node!r}; nodes: {', '.join(sorted(tb.nodes))}")
    ep = tb.nodes[node]
    if ep.emulated:
        if not crashed:
            await _post_speed(ep.name, ep.url, speed)
        ep.speed = speed
    else:
        await runtime_of(tb).set_speed(tb, node, speed)
    await asyncio.to_thread(tb.save)


async def _post_speed(node: str, url: str, speed: float, timeout_s: float = 30.0) -> None:
    import aiohttp

    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session,
            session.post(f"{url}/speed", json={"speed": speed}) as resp,
        ):
            if resp.status != 200:
                why = (await resp.text())[:300]
                raise RuntimeBackendError(
                    f"{node}: setting its emulated speed to {speed:g} failed (HTTP "
                    f"{resp.status}): {why}"
                )
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise RuntimeBackendError(
            f"{node}: setting its emulated speed to {speed:g} failed: {type(exc).__name__} "
            f"{exc}; is its stage server up (`testbed status`)?"
        ) from exc


def summary_rows(tb: RunningTestbed) -> list[dict[str, Any]]:
    return [
        {
            "node": n.name,
            "tier": n.tier,
            "address": n.url,
            "blocks": f"{n.start}..{n.end - 1}" + (" (parked)" if n.parked else ""),
            "device": n.device,
            "cpus": n.cpus,
            "mem_limit_bytes": n.mem_limit_bytes,
        }
        for n in sorted(tb.nodes.values(), key=lambda n: (n.tier_index, n.name))
    ]


__all__ = [
    "bring_up",
    "clean_sync",
    "crash_node",
    "detach",
    "down_sync",
    "partition_node",
    "restart_node",
    "set_link",
    "set_node_cpu",
    "set_node_speed",
]
