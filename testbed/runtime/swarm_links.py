"""Link overlays for stage-to-stage forwarding on the swarm runtime.

Besides its tier's overlay, every node of a stage joins one attachable overlay per
neighbouring stage: ``tb-<run>-<a>-<b>`` joins the services of the stage on tier ``a`` with
those of the next stage, on tier ``b`` (:func:`testbed.net.links.plan_peer_links`; a tier
that holds no blocks is skipped, as in the relay). A service's task gets no address of our
choosing on an overlay, so each node's address there is read back from its running task
(``NetworksAttachments``, :func:`task_addresses`); a receiver's address on the overlay into
it is its ``peer_url``, which each step's route carries to the stage before it.

Shaping: an overlay's bridge lives in the overlay's own namespace, not the host's, so both
directions are shaped on the containers' own interfaces on the overlay, by the per-host agent
(:mod:`testbed.runtime.swarm_agent`), found by their address inside each container's
namespace:

- a receiver's interface, egress: the link's return direction (rate, reverse delay, jitter,
  loss: :func:`testbed.net.links.link_net_reverse`), so each receiver has its own copy;
- each sender's interface, egress: the link's forward direction (rate, delay, jitter, loss).
  A sender with several receivers on one overlay (replicas of the next stage) sends to all of
  them through that one pipe, shaped as the first receiver's link (on ``docker`` each
  receiver has its own copy of the forward direction too: its host-side veth).

Where the kernel lacks sch_netem the sending stage's app shaper adds delay, jitter and loss
(the ``hop`` carried in each step's route), the kernel keeps both rates, as on one host.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from testbed.errors import RuntimeBackendError
from testbed.net.links import link_net_reverse
from testbed.runtime.base import LABEL_NODE, LABEL_RUN

if TYPE_CHECKING:
    from testbed.net.links import PeerLink
    from testbed.net.shaping import DirShape
    from testbed.runtime.base import RunningTestbed


def link_net_name(run_id: str, link: PeerLink) -> str:
    return f"tb-{run_id}-{link.src_tier}-{link.dst_tier}"


def network_names(run_id: str, tiers: list[str], links: list[PeerLink]) -> list[tuple[str, str]]:
    """(network name, what it joins) for every tier and every pair of consecutive stages."""
    out = [(f"tb-{run_id}-{t}", t) for t in tiers]
    out += [(link_net_name(run_id, x), f"{x.src_tier}-{x.dst_tier}") for x in links]
    return out


def node_networks(run_id: str, tier: str, node: str, links: list[PeerLink]) -> list[str]:
    """A node joins its tier's overlay and the link overlays of the stages next to its own."""
    nets = [f"tb-{run_id}-{tier}"]
    nets += [link_net_name(run_id, x) for x in links if node in (*x.senders, *x.receivers)]
    return nets


def task_addresses(task: Mapping[str, Any], names_by_id: Mapping[str, str]) -> dict[str, str]:
    """A running task's IPv4 address on each of ``names_by_id``'s networks (by name)."""
    out = {}
    for att in task.get("NetworksAttachments") or []:
        name = names_by_id.get(str((att.get("Network") or {}).get("ID")))
        for cidr in att.get("Addresses") or []:
            if name is not None:
                out[name] = str(cidr).split("/", 1)[0]
    return out


def net_into(tb: RunningTestbed, node: str) -> str | None:
    """The link overlay into ``node`` (where the previous stage sends to it), if any."""
    ep = tb.nodes[node]
    for net, address in (ep.link_addresses or {}).items():
        if address == ep.peer_address:
            return net
    return None


def link_shapes(
    tb: RunningTestbed, shapes: Mapping[str, tuple[DirShape, DirShape]]
) -> dict[str, list[tuple[str, DirShape]]]:
    """What the agent applies on link overlays when the links into ``shapes``' nodes are
    (down, up): per node, (its address on an overlay, that interface's egress shape)."""
    out: dict[str, list[tuple[str, DirShape]]] = {}
    for name in sorted(shapes, key=lambda n: (tb.nodes[n].tier_index, n)):
        net = net_into(tb, name)
        if net is None:
            continue
        down, up = shapes[name]
        ep = tb.nodes[name]
        assert ep.peer_address is not None
        out.setdefault(name, []).append((ep.peer_address, link_net_reverse(down, up)))
        for other in sorted(tb.nodes.values(), key=lambda n: n.name):
            address = (other.link_addresses or {}).get(net)
            if other.tier_index >= ep.tier_index or address is None:
                continue
            mine = out.setdefault(other.name, [])
            if all(a != address for a, _ in mine):  # one pipe per sender: the first receiver's
                mine.append((address, down))
    return out


async def exec_in_task(tb: RunningTestbed, node: str, argv: list[str]) -> dict[str, Any]:
    """Run ``argv`` in ``node``'s task container (the node-to-node link check's probe); its
    last stdout line as JSON. The container must run on this host's engine: a sender on
    another host is a failed check that says so."""
    from testbed.runtime.docker import client
    from testbed.runtime.docker_links import exec_json

    def find() -> Any:
        c = client()
        flt = {"label": [f"{LABEL_RUN}={tb.run_id}", f"{LABEL_NODE}={node}"], "status": "running"}
        return c, c.containers.list(filters=flt)

    c, found = await asyncio.to_thread(find)
    if not found:
        raise RuntimeBackendError(
            f"{node}'s task runs on another swarm node: its node-to-node check runs only from "
            "senders on the manager's host"
        )
    return await exec_json(c, found[0].name, argv)
