"""One container per node on the testbed's own networks, links shaped from the host.

Networks: one internal bridge network per tier (``tb-<run>-<tier>``, a free /24 from
``$TESTBED_SUBNET_POOL``, default 10.213.0.0/16), never the default bridge. The broker on the
host reaches each container at its fixed address on that bridge; internal networks have no
route to the outside. Shaping is per node, on the two ends of its veth pair (see
:mod:`testbed.net.links` for why): host-side veth egress = the feeding link's forward
direction (rate + netem), container eth0 egress = its reverse direction (netem only).
For stage-to-stage forwarding, one more network per pair of consecutive stages joins their
nodes, each receiver's end shaped the same way, its reverse direction with the link's rate
too (:mod:`testbed.runtime.docker_links`).

Everything is labelled ``testbed.run=<id>`` (+ ``testbed.node``/``testbed.tier``), so
``down`` and ``clean`` work from labels and are safe to repeat. A failure at any step of
``up`` removes what that run created and raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from testbed.errors import RuntimeBackendError
from testbed.net.links import link_net_reverse, plan_peer_links, plan_shaping
from testbed.net.shaping import DirShape, Iface, ShapingBackend, egress_ops
from testbed.net.tc import apply_ops, links_sync
from testbed.runtime.base import (
    LABEL_NODE,
    LABEL_RUN,
    LABEL_TIER,
    PROBE_PORT,
    STAGE_PORT,
    NodeEndpoint,
    RunningTestbed,
    cli_launcher,
    stage_serve_argv,
)
from testbed.runtime.bringup import EngineBringUp, log_up, node_endpoint
from testbed.runtime.docker_links import (
    create_link_net,
    create_network,
    memberships,
    peer_addresses,
    peer_url,
    plan_link_nets,
)
from testbed.runtime.gpus import docker_device_request, gpu_ask
from testbed.runtime.image import ImageMode, ensure_image

if TYPE_CHECKING:
    from testbed.spec.plan import Plan
    from testbed.spec.topology import Topology

SUBNET_POOL = os.environ.get("TESTBED_SUBNET_POOL", "10.213.0.0/16")
MODEL_IN_CONTAINER = "/model"
CPU_PERIOD_US = 100_000
SHM_BYTES = 256 * 2**20


def client() -> Any:
    import docker

    try:
        c = docker.from_env(timeout=120)
        c.ping()
        return c
    except docker.errors.DockerException as exc:
        raise RuntimeBackendError(f"Docker is not reachable: {exc}; run `testbed doctor`") from exc


def has_nvidia_runtime(c: Any) -> bool:
    return "nvidia" in (c.info().get("Runtimes") or {})


def used_subnets(c: Any) -> list[ipaddress.IPv4Network]:
    """Subnets already taken by Docker networks or routes of the host."""
    used = []
    for net in c.networks.list():
        for cfg in (net.attrs.get("IPAM") or {}).get("Config") or []:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                used.append(ipaddress.ip_network(cfg["Subnet"], strict=False))
    with contextlib.suppress(OSError, RuntimeBackendError):
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for r in ipr.get_routes(family=2):
                dst = r.get_attr("RTA_DST")
                if dst:
                    used.append(ipaddress.ip_network(f"{dst}/{r['dst_len']}", strict=False))
    return [n for n in used if isinstance(n, ipaddress.IPv4Network)]


def free_subnets(c: Any, count: int, pool: str = SUBNET_POOL) -> list[ipaddress.IPv4Network]:
    used = used_subnets(c)
    out = []
    for cand in ipaddress.ip_network(pool).subnets(new_prefix=24):
        if any(cand.overlaps(u) for u in used):
            continue
        out.append(cand)
        if len(out) == count:
            return out  # type: ignore[return-value]
    raise RuntimeBackendError(
        f"no {count} free /24 subnets in {pool}; set TESTBED_SUBNET_POOL to a free range "
        "or run `testbed clean`"
    )


# -- teardown (labels) --------------------------------------------------------------------


def remove_by_label(c: Any, label_filter: str) -> tuple[int, int]:
    """Remove containers then networks matching a label filter; returns the counts."""
    import docker

    ctrs = c.containers.list(all=True, filters={"label": label_filter}, sparse=True)
    for ctr in ctrs:
        with contextlib.suppress(docker.errors.NotFound):
            ctr.remove(force=True, v=True)
    nets = c.networks.list(filters={"label": label_filter})
    for net in nets:
        with contextlib.suppress(docker.errors.NotFound):
            net.remove()
    return len(ctrs), len(nets)


def down_sync(run_id: str) -> tuple[int, int]:
    return remove_by_label(client(), f"{LABEL_RUN}={run_id}")


# -- up -----------------------------------------------------------------------------------


def _container_ifaces(pid: int, address: str) -> tuple[Iface, Iface]:
    """(host-side veth, container-side interface) of the container's NIC holding ``address``."""
    netns = f"/proc/{pid}/ns/net"
    for link in links_sync(netns):
        if address in link["ipv4"]:
            inside = Iface(link["ifindex"], link["ifname"], netns)
            peer = link["peer_ifindex"]
            for hl in links_sync(None):
                if hl["ifindex"] == peer:
                    return Iface(peer, hl["ifname"], None), inside
            raise RuntimeBackendError(f"host side of {link['ifname']} (ifindex {peer}) not found")
    raise RuntimeBackendError(f"no interface with {address} in container netns {netns}")


def shaping_ops(
    host_iface: Iface, inside: Iface, down: DirShape, up: DirShape, backend: ShapingBackend
) -> list[Any]:
    return egress_ops(host_iface, down, backend) + egress_ops(inside, up, backend)


def _iface_record(host_if: Iface, inside: Iface, pid: int) -> tuple[dict[str, Any], dict[str, Any]]:
    return (
        {"ifindex": host_if.ifindex, "ifname": host_if.ifname},
        {"ifindex": inside.ifindex, "ifname": inside.ifname, "pid": pid},
    )


async def _shape_node(
    pid: int, ep: NodeEndpoint, down: DirShape, up: DirShape, backend: ShapingBackend
) -> None:
    """Shape a (re)started container's veth pairs as its feeding link (``down`` into the node,
    ``up`` out of it): on its tier network and, for forwarding, on the link network into it;
    record the interfaces for changes while running."""
    host_if, inside = await asyncio.to_thread(_container_ifaces, pid, ep.address)
    ops = shaping_ops(host_if, inside, down, up, backend)
    ep.down_iface, ep.up_iface = _iface_record(host_if, inside, pid)
    if ep.peer_address is not None:
        p_host, p_inside = await asyncio.to_thread(_container_ifaces, pid, ep.peer_address)
        ops += shaping_ops(p_host, p_inside, down, link_net_reverse(down, up), backend)
        ep.peer_down_iface, ep.peer_up_iface = _iface_record(p_host, p_inside, pid)
    await apply_ops(ops)


class DockerTestbed(EngineBringUp):
    """Brings a plan up as containers; ``up`` returns the RunningTestbed (state saved)."""

    runtime = "docker"

    def __init__(
        self,
        topology: Topology,
        topology_path: str,
        plan: Plan,
        model_dir: Path,
        *,
        backend: ShapingBackend,
        image_mode: ImageMode = "auto",
        seed: int = 0,
        extra_serve_args: dict[str, list[str]] | None = None,
    ) -> None:
        super().__init__(
            topology,
            topology_path,
            plan,
            model_dir,
            backend=backend,
            image_mode=image_mode,
            seed=seed,
        )
        # node -> extra `stage serve` flags (emulated devices: testbed.emulation.plumbing)
        self.extra_serve_args = extra_serve_args or {}

    def remove_run(self) -> None:
        down_sync(self.run_id)

    async def _up(self, tb: RunningTestbed, health_timeout_s: float) -> None:
        from testbed.runtime.measure import wait_healthy

        info = await asyncio.to_thread(ensure_image, self.image_mode)
        tb.image = info.tag
        log_up(f"image {info.tag} ({'built' if info.built else 'reused'} in {info.seconds:.1f}s)")
        c = await asyncio.to_thread(client)
        gpu = await asyncio.to_thread(has_nvidia_runtime, c)
        shaping = plan_shaping(self.topology, self.backend)
        links = plan_peer_links(self.plan)
        n_tiers = len(self.topology.tiers)
        subnets = await asyncio.to_thread(free_subnets, c, n_tiers + len(links))
        net_of_tier: dict[str, tuple[str, ipaddress.IPv4Network]] = {}
        for tier, subnet in zip(self.topology.tiers, subnets[:n_tiers], strict=True):
            name = f"tb-{self.run_id}-{tier.name}"
            bridge = f"tb{self.run_id[2:]}{tier.name[:4]}"[:15]
            labels = {LABEL_RUN: self.run_id, LABEL_TIER: tier.name}
            await asyncio.to_thread(create_network, c, name, subnet, bridge, labels)
            net_of_tier[tier.name] = (name, subnet)
            tb.networks.append(name)
        link_nets = plan_link_nets(self.run_id, links, subnets[n_tiers:])
        for net in link_nets:  # stage to stage (forwarding)
            await asyncio.to_thread(create_link_net, c, self.run_id, net)
            tb.networks.append(net.name)
        joins, peers = memberships(link_nets), peer_addresses(link_nets)
        await asyncio.to_thread(tb.save)

        ctrs: dict[str, Any] = {}
        for j, tier in enumerate(self.topology.tiers):
            netname, subnet = net_of_tier[tier.name]
            hosts = subnet.hosts()
            next(hosts)  # .1 is the gateway (the host's side of the bridge)
            for node in tier.nodes:
                stage = self.plan.stage_of_node(node.name)
                if stage is None:
                    tb.notes.append(f"{node.name}: holds no blocks in this plan; not started")
                    continue
                address = str(next(hosts))
                dev = node.device
                device = "cpu"
                if dev.kind == "gpu":
                    device = "cuda" if gpu else "cpu (no NVIDIA runtime on this host: CPU fallback)"
                if node.name in self.extra_serve_args:  # emulated devices
                    device = f"emulated {dev.label or dev.kind}"
                ep = node_endpoint(
                    self.run_id, tier, j, node, stage, shaping[node.name], device=device,
                    address=address, url=f"http://{address}:{STAGE_PORT}",
                )  # fmt: skip
                if node.name in peers:
                    ep.peer_address = peers[node.name]
                    ep.peer_url = peer_url(ep.peer_address)
                tb.nodes[node.name] = ep
                ctrs[node.name] = await asyncio.to_thread(
                    self._run_container,
                    c,
                    ep,
                    netname,
                    info.tag,
                    info.mounts,
                    gpu and dev.kind == "gpu",
                    node.gpus,
                    joins.get(node.name, []),
                )
                await asyncio.to_thread(tb.save)
        for i, n in enumerate(sorted(tb.nodes)):
            tb.nodes[n].make_hook(self.seed * 1000 + i)

        # shape every node's link, both directions, before any traffic
        for name, ep in tb.nodes.items():
            ns = shaping[name]
            ctr = ctrs[name]
            await asyncio.to_thread(ctr.reload)
            pid = ctr.attrs["State"]["Pid"]
            if not pid:
                logs = (await asyncio.to_thread(ctr.logs, tail=20)).decode(errors="replace")
                raise RuntimeBackendError(f"container of {name} is not running:\n{logs}")
            await _shape_node(pid, ep, ns.downlink, ns.uplink, self.backend)
        await asyncio.to_thread(tb.save)
        log_up(
            f"{len(tb.nodes)} containers up, links shaped ({self.backend}); waiting for stage servers"
        )
        if self.extra_serve_args:  # emulated devices
            from testbed.emulation.plumbing import EMULATION_NOTE

            tb.notes.append(EMULATION_NOTE)
        await wait_healthy(tb, health_timeout_s)
        await self._apply_node_quotas(tb, ctrs)
        tb.status = "up"
        await asyncio.to_thread(tb.save)

    async def _apply_node_quotas(self, tb: RunningTestbed, ctrs: dict[str, Any]) -> None:
        """Each node's CPU quota, once its stage server has loaded (see _run_container)."""
        for name, ep in tb.nodes.items():
            if ep.cpus:
                await asyncio.to_thread(
                    ctrs[name].update, cpu_period=CPU_PERIOD_US, cpu_quota=_quota_us(ep.cpus)
                )
        log_up("node CPU quotas applied (containers load their blocks unthrottled)")

    def _run_container(
        self,
        c: Any,
        ep: NodeEndpoint,
        netname: str,
        image: str,
        mounts: tuple[tuple[str, str], ...],
        use_gpu: bool,
        gpus: tuple[int, ...] | int | None = None,
        link_nets: list[tuple[str, str]] | None = None,
    ) -> Any:
        """Create the node's container on its tier network, join it to its link networks
        (``(name, address)``, forwarding) before it starts, start it and its probe service."""
        import docker
        from docker.types import DeviceRequest

        volumes = {str(self.model_dir): {"bind": MODEL_IN_CONTAINER, "mode": "ro"}}
        for host, inside in mounts:
            volumes[host] = {"bind": inside, "mode": "ro"}
        cmd = stage_serve_argv(
            cli_launcher("python3"),
            MODEL_IN_CONTAINER,
            (ep.start, ep.end),
            host="0.0.0.0",
            port=STAGE_PORT,
            name=ep.name,
            extra=self.extra_serve_args.get(ep.name, ()),  # emulated devices
            max_batch=ep.max_batch,
        )
        kwargs: dict[str, Any] = {}
        if ep.cpus:
            # Start unthrottled (every host core) so loading torch and the blocks is not paced
            # by the node's quota; the node's own quota is applied once it is healthy
            # (_apply_node_quotas). cpu_period/cpu_quota, not nano_cpus: only these can be
            # updated on a running container.
            kwargs["cpu_period"] = CPU_PERIOD_US
            kwargs["cpu_quota"] = _quota_us(float(os.cpu_count() or 1))
        if ep.mem_limit_bytes:
            kwargs["mem_limit"] = ep.mem_limit_bytes
            kwargs["memswap_limit"] = ep.mem_limit_bytes
        if use_gpu:
            kwargs["device_requests"] = [DeviceRequest(**docker_device_request(gpu_ask(gpus)))]
        env = {"OMP_NUM_THREADS": str(max(1, round(ep.cpus or 1))), "TESTBED_NODE": ep.name}
        try:
            ctr = c.containers.create(
                image,
                cmd,
                name=ep.container,
                network=netname,
                networking_config={netname: c.api.create_endpoint_config(ipv4_address=ep.address)},
                labels={LABEL_RUN: self.run_id, LABEL_NODE: ep.name, LABEL_TIER: ep.tier},
                volumes=volumes,
                shm_size=SHM_BYTES,
                environment=env,
                hostname=ep.name,
                **kwargs,
            )
            for net, address in link_nets or []:
                c.networks.get(net).connect(ctr, ipv4_address=address)
            ctr.start()
            ctr.exec_run(
                ["python3", "-m", "testbed.net.probe", "serve", "--port", str(PROBE_PORT)],
                detach=True,
            )
        except docker.errors.APIError as exc:
            raise RuntimeBackendError(f"starting the container of {ep.name} failed: {exc}") from exc
        return ctr


def _quota_us(cpus: float) -> int:
    return max(1000, round(cpus * CPU_PERIOD_US))
