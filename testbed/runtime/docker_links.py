"""Link networks for stage-to-stage forwarding on the docker runtime.

Besides its tier's network (where the broker on the host reaches it), every node of a stage
joins one more internal bridge network per neighbouring stage: ``tb-<run>-<a>-to-<b>`` joins
the nodes of the stage on tier ``a`` with those of the next stage, on tier ``b``
(:func:`testbed.net.links.plan_peer_links`). A forwarding stage reaches the next one at its
address on that network (``peer_url``), so hidden states go node to node and never through
the host.

Each receiver's end of a link network is shaped as the link into its tier, on both ends of
its veth pair: host-side veth egress (traffic into the node: rate, and delay/jitter/loss
where the kernel has netem) and the container's egress (the reverse direction: the link's
rate too, :func:`~testbed.net.links.link_net_reverse`, as no later hop paces what the
receiver sends back, and delay/jitter/loss). So every receiver has its own copy of the link,
whichever node of the previous stage sends, as in the relay. What the kernel cannot do (no
sch_netem) the sending stage's app shaper adds (the ``hop`` carried in each step's route).

The networks carry the run's labels, so ``down``/``clean`` remove them with the rest.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from testbed.errors import RuntimeBackendError
from testbed.runtime.base import LABEL_RUN, PROBE_PORT, STAGE_PORT, LinkCheck, RunningTestbed

if TYPE_CHECKING:
    from testbed.net.links import PeerLink
    from testbed.runtime.measure import Tolerance

LABEL_LINK = "testbed.link"  # "edge->fog" on a link network


@dataclass(frozen=True)
class LinkNet:
    """A planned link network: its name, subnet, bridge name and each member's address."""

    link: PeerLink
    name: str
    subnet: ipaddress.IPv4Network
    bridge: str
    addresses: dict[str, str]  # node -> its address on this network


def plan_link_nets(
    run_id: str, links: list[PeerLink], subnets: list[ipaddress.IPv4Network]
) -> list[LinkNet]:
    """Name each link network and give every member an address (.1 is the bridge's)."""
    out = []
    for k, (link, subnet) in enumerate(zip(links, subnets, strict=True)):
        hosts = subnet.hosts()
        next(hosts)  # the gateway: the host's side of the bridge
        members = [*link.senders, *link.receivers]
        addresses = {node: str(next(hosts)) for node in members}
        name = f"tb-{run_id}-{link.src_tier}-to-{link.dst_tier}"
        out.append(LinkNet(link, name, subnet, f"tb{run_id[2:]}-l{k}", addresses))
    return out


def create_network(
    c: Any, name: str, subnet: ipaddress.IPv4Network, bridge: str, labels: dict[str, str]
) -> None:
    """Blocking: create an internal bridge network (a tier's or a link's) on ``subnet``, its
    gateway (.1) the host's side of bridge ``bridge``."""
    import docker
    from docker.types import IPAMConfig, IPAMPool

    gateway = str(next(subnet.hosts()))
    try:
        c.networks.create(
            name,
            driver="bridge",
            internal=True,
            check_duplicate=True,
            ipam=IPAMConfig(pool_configs=[IPAMPool(subnet=str(subnet), gateway=gateway)]),
            labels=labels,
            options={"com.docker.network.bridge.name": bridge},
        )
    except docker.errors.APIError as exc:
        raise RuntimeBackendError(f"creating network {name} ({subnet}) failed: {exc}") from exc


def create_link_net(c: Any, run_id: str, net: LinkNet) -> None:
    """Blocking: create one link network, labelled with the run and its link."""
    labels = {LABEL_RUN: run_id, LABEL_LINK: net.link.label}
    create_network(c, net.name, net.subnet, net.bridge, labels)


def memberships(nets: list[LinkNet]) -> dict[str, list[tuple[str, str]]]:
    """node -> the link networks it joins, as (network name, its address there)."""
    out: dict[str, list[tuple[str, str]]] = {}
    for net in nets:
        for node, address in net.addresses.items():
            out.setdefault(node, []).append((net.name, address))
    return out


def peer_addresses(nets: list[LinkNet]) -> dict[str, str]:
    """receiver -> its address on the network into it (where the previous stage sends)."""
    return {n: net.addresses[n] for net in nets for n in net.link.receivers}


def peer_url(address: str) -> str:
    return f"http://{address}:{STAGE_PORT}"


# -- the node-to-node link check ------------------------------------------------------------


def previous_stage(tb: RunningTestbed, node: str) -> list[str]:
    """The nodes of the stage before ``node``'s (they send to it when forwarding)."""
    ep = tb.nodes[node]
    before = [n for n in tb.stage_nodes() if n.tier_index < ep.tier_index]
    if not before:
        return []
    tier = max(n.tier_index for n in before)
    return [n.name for n in before if n.tier_index == tier]


ExecIn = Callable[[str, list[str]], Awaitable[dict[str, Any]]]  # (node, argv) -> its JSON


async def measure_peer_links(
    tb: RunningTestbed,
    tol: Tolerance,
    *,
    seconds: float = 0.5,
    timeout_s: float = 60.0,
    exec_in: ExecIn | None = None,
) -> list[LinkCheck]:
    """Measure each receiver's link network from a node of the previous stage: the probe runs
    inside the sender's container, towards the receiver's probe port there (not the port the
    host reaches, which swarm publishes elsewhere) (``exec_in``; default: the docker container of that node),
    through the same app shaper a forwarding stage uses."""
    from testbed.runtime.docker import client
    from testbed.runtime.measure import judge

    if exec_in is None:
        c = await asyncio.to_thread(client)

        async def in_container(node: str, argv: list[str]) -> dict[str, Any]:
            return await exec_json(c, tb.nodes[node].container, argv)

        exec_in = in_container
    checks = []
    for ep in sorted(tb.stage_nodes(), key=lambda n: (n.tier_index, n.name)):
        senders = previous_stage(tb, ep.name)
        if ep.peer_address is None or ep.link is None or not senders:
            continue
        src = tb.nodes[senders[0]]
        argv = [
            "python3", "-m", "testbed.net.probe", "measure", ep.peer_address,
            "--port", str(PROBE_PORT), "--json", "--seconds", str(seconds),
            "--timeout", str(timeout_s),
        ]  # fmt: skip
        if ep.link_rate_bps:
            argv += ["--rate-bps", str(ep.link_rate_bps)]
        if ep.hop is not None:
            argv += ["--hop", json.dumps(asdict(ep.hop)), "--seed", str(tb.seed)]
        cfg_rtt, cfg_rate = ep.link_rtt_s, ep.link_rate_bps
        check = partial(LinkCheck, ep.name, ep.link, cfg_rtt, cfg_rate, src=src.name)
        try:
            got = await asyncio.wait_for(exec_in(src.name, argv), timeout_s + 10)
        except (RuntimeBackendError, TimeoutError) as exc:
            why = str(exc) or f"no answer within {timeout_s + 10:g}s"
            checks.append(check(None, None, False, why, measured_at=time.time()))
            continue
        rtt, rate = float(got["rtt_s"]), got["throughput_bps"]
        ok, note = judge(cfg_rtt, cfg_rate, rtt, rate, tol)
        checks.append(check(rtt, rate, ok, note, measured_at=time.time()))
    return checks


async def exec_json(c: Any, container: str | None, argv: list[str]) -> dict[str, Any]:
    """Run ``argv`` in ``container``; its last stdout line as JSON."""
    import docker

    def run() -> tuple[int, bytes]:
        ctr = c.containers.get(container)
        res = ctr.exec_run(argv, demux=False)
        return int(res.exit_code), bytes(res.output or b"")

    try:
        code, out = await asyncio.to_thread(run)
    except docker.errors.DockerException as exc:
        raise RuntimeBackendError(f"probe in {container} failed: {exc}") from exc
    text = out.decode(errors="replace").strip()
    if code != 0 or not text:
        raise RuntimeBackendError(f"probe in {container} exited {code}: {text[-300:]}")
    try:
        data = json.loads(text.splitlines()[-1])
        assert isinstance(data, dict)
        return data
    except (ValueError, AssertionError):
        raise RuntimeBackendError(f"probe in {container}: not JSON: {text[-300:]}") from None
