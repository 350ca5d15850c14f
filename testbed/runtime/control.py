"""Up, down, clean, and changes while running, for both runtimes (the CLI and scenarios call these)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from testbed.errors import ConfigError, RuntimeBackendError
from testbed.net.appshaper import HopShape
from testbed.net.detect import PROBE_NETNS_PREFIX, probe_qdiscs
from testbed.net.links import node_shaping_for_link
from testbed.net.shaping import BACKENDS, ShapingBackend
from testbed.runtime.base import LABEL_RUN, RunningTestbed, list_states, load_running, state_dir

if TYPE_CHECKING:
    from testbed.runtime.image import ImageMode
    from testbed.spec.plan import Plan
    from testbed.spec.topology import LinkSpec, Topology

NETNS_PREFIX = "testbed-"  # network namespaces the testbed (or its tests) create
NETNS_DIR = Path("/var/run/netns")


async def choose_backend(runtime: str, requested: str | None = None) -> ShapingBackend:
    if requested is not None:
        if requested not in BACKENDS:
            raise ConfigError(
                f"unknown shaping backend {requested!r}; use one of {', '.join(BACKENDS)}"
            )
        return cast(ShapingBackend, requested)
    support = await probe_qdiscs()
    return support.backend(runtime)


async def up_docker(
    topology: Topology,
    topology_path: str,
    plan: Plan,
    model_dir: Path,
    *,
    backend: ShapingBackend,
    image_mode: ImageMode = "auto",
    seed: int = 0,
    health_timeout_s: float = 180.0,
    extra_serve_args: dict[str, list[str]] | None = None,
) -> RunningTestbed:
    from testbed.runtime.docker import DockerTestbed

    dt = DockerTestbed(
        topology,
        topology_path,
        plan,
        model_dir,
        backend=backend,
        image_mode=image_mode,
        seed=seed,
        extra_serve_args=extra_serve_args,
    )
    return await dt.up(health_timeout_s=health_timeout_s)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_testbed_process(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return b"testbed" in cmd


def _kill_pids(pids: list[int], timeout_s: float = 5.0) -> int:
    import time

    killed = [p for p in pids if p and _pid_alive(p) and _is_testbed_process(p)]
    for p in killed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_pid_alive(p) for p in killed):
        time.sleep(0.05)
    for p in killed:
        if _pid_alive(p):
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
    return len(killed)


def down_sync(run_id: str | None = None) -> str:
    """Stop and remove everything of a run (default: the latest). Safe to repeat."""
    states = list_states()
    if run_id is None:
        if not states:
            return "nothing to do: no testbed run recorded"
        run_id = states[-1].stem
    path = next((p for p in states if p.stem == run_id), None)
    pids: list[int] = []
    runtime = "docker"
    if path is not None:
        with contextlib.suppress(RuntimeBackendError):
            tb = load_running(run_id)
            runtime = tb.runtime
            pids = tb.pids()
    n_ctr = n_net = 0
    if runtime == "docker":
        from testbed.runtime.docker import down_sync as docker_down

        n_ctr, n_net = docker_down(run_id)
    n_proc = _kill_pids(pids)
    if path is not None:
        with contextlib.suppress(OSError):
            path.unlink()
    shutil.rmtree(state_dir() / f"{run_id}-logs", ignore_errors=True)
    return f"{run_id}: removed {n_ctr} containers, {n_net} networks, {n_proc} processes"


def clean_sync() -> list[str]:
    """Remove anything a crash left: labelled containers/networks, testbed netns, local
    stage processes recorded in state files, the state files. Safe to repeat."""
    done = []
    pids: list[int] = []
    for path in list_states():
        with contextlib.suppress(RuntimeBackendError, OSError):
            tb = load_running(path.stem)
            pids += tb.pids()
    n_proc = _kill_pids(pids)
    if n_proc:
        done.append(f"stopped {n_proc} local stage processes")
    try:
        from testbed.runtime.docker import client, remove_by_label

        n_ctr, n_net = remove_by_label(client(), LABEL_RUN)
        if n_ctr or n_net:
            done.append(f"removed {n_ctr} containers and {n_net} networks labelled {LABEL_RUN}")
    except RuntimeBackendError as exc:
        done.append(f"docker skipped: {exc}")
    if NETNS_DIR.exists():
        for entry in sorted(NETNS_DIR.iterdir()):
            if entry.name.startswith((NETNS_PREFIX, PROBE_NETNS_PREFIX)):
                try:
                    from pyroute2 import netns

                    netns.remove(entry.name)
                    done.append(f"removed netns {entry.name}")
                except OSError as exc:
                    done.append(f"could not remove netns {entry.name}: {exc}")
    for path in list_states():
        with contextlib.suppress(OSError):
            path.unlink()
            shutil.rmtree(state_dir() / f"{path.stem}-logs", ignore_errors=True)
            done.append(f"removed state {path.name}")
    return done or ["nothing to clean"]


async def set_link(tb: RunningTestbed, src_tier: str, dst_tier: str, link: LinkSpec) -> None:
    """Change the link between two consecutive tiers while running (kernel and app parts).

    ``link`` is a topology ``LinkSpec`` (parsed units); it applies to every node of the
    downstream tier, in both directions.
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
    for ep in targets:
        ns = node_shaping_for_link(ep.name, ep.tier, ep.tier_index, ep.link, link, tb.backend)
        if tb.runtime == "docker":
            from testbed.runtime.docker import set_link_docker

            await set_link_docker(tb, ep.name, ns.downlink, ns.uplink)
        ep.hop = ns.hop
        if ep.hook is not None and ns.hop is not None:
            ep.hook.set_shape(ns.hop)
        elif ns.hop is not None:
            ep.make_hook(tb.seed)
        ep.link_rtt_s = ns.configured_rtt_s
        ep.link_rate_bps = ns.configured_rate_bps
    await asyncio.to_thread(tb.save)


async def set_node_cpu(tb: RunningTestbed, node: str, cpus: float) -> None:
    """Change a node's CPU quota while running (docker: cpu_quota over a 100 ms period)."""
    if node not in tb.nodes:
        raise ConfigError(f"unknown node {node!r}; nodes: {', '.join(sorted(tb.nodes))}")
    if not cpus > 0:
        raise ConfigError(f"cpus must be > 0, got {cpus!r}")
    if tb.runtime != "docker":
        raise RuntimeBackendError(
            "changing a node's CPU needs the docker runtime (local processes have no quota)"
        )
    from testbed.runtime.docker import set_cpu_docker

    await set_cpu_docker(tb, node, cpus)
    tb.nodes[node] = replace(tb.nodes[node], cpus=cpus)
    await asyncio.to_thread(tb.save)


def hop_of(tb: RunningTestbed, node: str) -> HopShape | None:
    return tb.nodes[node].hop


def summary_rows(tb: RunningTestbed) -> list[dict[str, Any]]:
    return [
        {
            "node": n.name,
            "tier": n.tier,
            "address": n.url,
            "blocks": f"{n.start}..{n.end - 1}",
            "device": n.device,
            "cpus": n.cpus,
            "mem_limit_bytes": n.mem_limit_bytes,
        }
        for n in sorted(tb.nodes.values(), key=lambda n: (n.tier_index, n.name))
    ]
