"""Where each topology link is shaped when the broker on the host relays hop by hop (pure).

The broker (on the host) sends every hop: it POSTs tier j-1's output to a node of tier j and
reads tier j's output from the reply. So every node's traffic with the host *is* the link
(j-1, j) that feeds it, and we shape that path:

- **downlink** (host -> node, egress of the node's host-side veth): the link's forward
  direction: rate, delay, jitter, loss. The activations into tier j cross it once.
- **uplink** (node -> host, egress of the node's eth0 inside its namespace): the link's
  reverse direction: delay, jitter, loss, no rate (the node's output is rate-limited once,
  on the next hop's downlink).

A decode step thus pays each link's rate once and its delay both ways: edge -> fog ->
cloud -> fog -> edge, the chain's round trip (the sampled token goes back along the chain),
and every broker<->node TCP connection has the RTT and bottleneck of its link, so TCP's
ramp-up behaves as on the real link. Tier 0 nodes (the edge, where requests arrive) are not
shaped. A tier's ``lan`` is not used in relay mode: no hop runs between nodes of one tier.
Each node of tier j gets its own copy of the link (replicas do not share a pipe).

What the kernel cannot do (no sch_netem) goes to the app shaper as a :class:`HopShape`,
charged on the hop into the node (see :mod:`testbed.net.appshaper`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from testbed.net.appshaper import HopShape
from testbed.net.shaping import DirShape, ShapingBackend

if TYPE_CHECKING:
    from testbed.spec.plan import Plan
    from testbed.spec.topology import LinkSpec, Topology


@dataclass(frozen=True)
class NodeShaping:
    node: str
    tier: str
    tier_index: int
    link: str | None  # "edge->fog" for the link that feeds this node; None for tier 0
    downlink: DirShape  # host -> node
    uplink: DirShape  # node -> host
    hop: HopShape | None  # what the app shaper charges on the hop into the node
    configured_rtt_s: float
    configured_rate_bps: float | None


def node_shaping_for_link(
    node: str,
    tier: str,
    tier_index: int,
    label: str | None,
    link: LinkSpec | None,
    backend: ShapingBackend,
) -> NodeShaping:
    if link is None:
        return NodeShaping(node, tier, tier_index, None, DirShape(), DirShape(), None, 0.0, None)
    down = DirShape(link.bandwidth_bps, link.delay_s, link.jitter_s, link.loss_pct)
    up = DirShape(None, link.delay_s, link.jitter_s, link.loss_pct)
    hop = None
    if backend != "kernel" and (down.has_impairment or backend == "app"):
        hop = HopShape(down, up, apply_rate=backend == "app")
    return NodeShaping(
        node, tier, tier_index, label, down, up, hop, 2 * link.delay_s, link.bandwidth_bps
    )


def plan_shaping(topology: Topology, backend: ShapingBackend) -> dict[str, NodeShaping]:
    """Per node name: what its downlink and uplink do, and its app hop (if any)."""
    out: dict[str, NodeShaping] = {}
    for j, tier in enumerate(topology.tiers):
        link = topology.uplink(j - 1) if j > 0 else None
        label = f"{topology.tiers[j - 1].name}->{tier.name}" if j > 0 else None
        for node in tier.nodes:
            out[node.name] = node_shaping_for_link(node.name, tier.name, j, label, link, backend)
    return out


@dataclass(frozen=True)
class PeerLink:
    """A network joining two consecutive stages' nodes, for stage-to-stage forwarding.

    Tiers that hold no blocks are skipped, as in the relay: the stage after them is fed by the
    link into its own tier (:func:`plan_shaping`), and each receiver's end of this network is
    shaped as that link, both directions (the receiver's own copy of the link)."""

    src_tier: str
    dst_tier: str
    senders: tuple[str, ...]  # the previous stage's nodes
    receivers: tuple[str, ...]  # this stage's nodes

    @property
    def label(self) -> str:
        return f"{self.src_tier}->{self.dst_tier}"


def link_net_reverse(down: DirShape, up: DirShape) -> DirShape:
    """The reverse direction of a link network (receiver -> sender: replies, the next
    stage's answers): the link's rate as well as its reverse delay, jitter and loss. Unlike a
    node's tier network in the relay, where a node's output is rate-limited once on the next
    hop's downlink, nothing else on this path paces it."""
    return DirShape(down.rate_bps, up.delay_s, up.jitter_s, up.loss_pct)


def plan_peer_links(plan: Plan) -> list[PeerLink]:
    """One :class:`PeerLink` per pair of consecutive stages that hold blocks."""
    stages = plan.active_stages()
    return [PeerLink(a.tier, b.tier, a.nodes, b.nodes) for a, b in itertools.pairwise(stages)]
