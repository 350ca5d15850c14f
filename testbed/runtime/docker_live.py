"""Changes to a running Docker testbed: a link's shaping in place, a node's CPU quota, a crash
(SIGKILL) and a restart of its container (timelines, `testbed.runtime.control`)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from testbed.errors import RuntimeBackendError
from testbed.net.links import link_net_reverse
from testbed.net.shaping import Iface, change_ops
from testbed.net.tc import apply_ops
from testbed.runtime.docker import (
    CPU_PERIOD_US,
    PROBE_PORT,
    _quota_us,
    _shape_node,
    client,
    shaping_ops,
)

if TYPE_CHECKING:
    from testbed.net.shaping import DirShape
    from testbed.runtime.base import RunningTestbed


async def _node_container(node: str, name: str | None) -> Any:
    """The container of ``node``; RuntimeBackendError when the engine no longer has it."""
    import docker

    c = await asyncio.to_thread(client)
    try:
        return await asyncio.to_thread(c.containers.get, name)
    except docker.errors.NotFound:
        raise RuntimeBackendError(
            f"the container {name} of {node} is gone: removed outside this run (`docker rm`, "
            "or `testbed clean --all` from another shell?)"
        ) from None
    except docker.errors.APIError as exc:
        raise RuntimeBackendError(f"the container {name} of {node}: {exc}") from exc


async def set_link_docker(
    tb: RunningTestbed,
    node: str,
    down: DirShape,
    up: DirShape,
    previous: tuple[DirShape, DirShape] | None = None,
) -> None:
    ep = tb.nodes[node]
    if ep.down_iface is None or ep.up_iface is None:
        raise RuntimeBackendError(f"{node}: no shaped interfaces recorded")
    ctr = await _node_container(node, ep.container)
    netns = f"/proc/{ctr.attrs['State']['Pid']}/ns/net"
    pairs = [(ep.down_iface, ep.up_iface, up, previous)]
    if ep.peer_down_iface is not None and ep.peer_up_iface is not None:
        # the link network into it: its reverse direction carries the link's rate too
        was = None if previous is None else (previous[0], link_net_reverse(*previous))
        pairs.append((ep.peer_down_iface, ep.peer_up_iface, link_net_reverse(down, up), was))
    ops: list[Any] = []
    for host_rec, inside_rec, back, before in pairs:
        host_if = Iface(host_rec["ifindex"], host_rec["ifname"], None)
        inside = Iface(inside_rec["ifindex"], inside_rec["ifname"], netns)
        if before is None:
            ops += shaping_ops(host_if, inside, down, back, tb.backend)
        else:
            ops += change_ops(host_if, before[0], down, tb.backend)
            ops += change_ops(inside, before[1], back, tb.backend)
    await apply_ops(ops)


async def set_cpu_docker(tb: RunningTestbed, node: str, cpus: float) -> None:
    ep = tb.nodes[node]
    ctr = await _node_container(node, ep.container)
    await asyncio.to_thread(ctr.update, cpu_period=CPU_PERIOD_US, cpu_quota=_quota_us(cpus))


async def kill_docker(tb: RunningTestbed, node: str) -> None:
    """A crash: SIGKILL the node's container (it stays, stopped, for a restart)."""
    ep = tb.nodes[node]
    ctr = await _node_container(node, ep.container)
    await asyncio.to_thread(ctr.kill)


async def restart_docker(tb: RunningTestbed, node: str, down: DirShape, up: DirShape) -> None:
    """Start the killed container again (same addresses, blocks loaded anew) and shape its new
    veth pairs (tier and link network) as ``down``/``up`` before it serves (a restarted
    container gets new veths)."""
    import docker

    ep = tb.nodes[node]
    ctr = await _node_container(node, ep.container)
    try:
        await asyncio.to_thread(ctr.start)
        await asyncio.to_thread(ctr.reload)
    except docker.errors.APIError as exc:
        raise RuntimeBackendError(f"restarting the container of {node} failed: {exc}") from exc
    pid = ctr.attrs["State"]["Pid"]
    if not pid:
        raise RuntimeBackendError(f"container of {node} did not start again")
    await _shape_node(pid, ep, down, up, tb.backend)
    await asyncio.to_thread(
        ctr.exec_run,
        ["python3", "-m", "testbed.net.probe", "serve", "--port", str(PROBE_PORT)],
        detach=True,
    )
    await asyncio.to_thread(tb.save)
