"""The forward transport's step as the broker records it: per-hop spans from the hops' timings.

In the ``forward`` transport the broker sends a step to the route's first stage only; the
stages pass it on (:mod:`testbed.stage.route`) and the first stage answers with the token and
every hop's timings, each measured by the hop's sender: ``link_s`` (the app-level link hook),
``wall_s`` (send -> answer), ``service_s`` and ``queue_s`` (the receiver's), ``forward_s`` (the
receiver's own time passing the step on). The round trip of hop s is then
``wall_s - queue_s - service_s - forward_s``.

:func:`chain_spans` lays the hops out on the broker's clock between the send (``t0``) and the
answer (``t1``), as the relay does for one hop: each hop's transfer (hook wait + round trip,
the answer's way back included), then its queueing, then its compute; the next hop starts
where this compute ends. The first hop's transfer takes what the others leave of
``t1 - t0``, so the spans tile the step exactly (no time invented or lost).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from testbed.broker.state import CLIENT
from testbed.broker.transport import StepKind, StepResult
from testbed.metrics.records import Span
from testbed.schedule.base import Route


@dataclass(frozen=True, slots=True)
class HopTimes:
    """One hop of a chained step on the broker's clock."""

    start_s: float  # the sender starts (hook wait, then the send)
    queue_start_s: float  # the step is at the receiver, waiting for a batch
    compute_start_s: float
    compute_end_s: float

    @property
    def compute_s(self) -> float:
        return self.compute_end_s - self.compute_start_s


@dataclass(frozen=True, slots=True)
class HopStep:
    """Which hop of which step a :class:`HopTimes` is, and what it carried."""

    stage: int  # index in the route
    kind: StepKind
    step: int  # the request's token index
    nbytes: int  # bytes its sender sent
    batch: int | None  # requests in the receiver's batched step


def hop_spans(route: Route, rid: int, at: HopTimes, hop: HopStep) -> list[Span]:
    """The request record's spans of one hop: transfer (sender -> receiver), queue, compute."""
    s, node = hop.stage, route[hop.stage]
    sender = route[s - 1] if s > 0 else CLIENT
    q0, c0 = at.queue_start_s, at.compute_start_s
    spans = [Span("transfer", sender, at.start_s, q0, rid, s, hop.kind, hop.step, peer=node,
                  nbytes=hop.nbytes)]  # fmt: skip
    if c0 > q0:
        spans.append(Span("queue", node, q0, c0, rid, s, hop.kind, hop.step))
    spans.append(
        Span("compute", node, c0, at.compute_end_s, rid, s, hop.kind, hop.step, batch=hop.batch)
    )
    return spans


def chain_spans(t0: float, t1: float, hops: Sequence[StepResult]) -> list[HopTimes]:
    """Hop times for a step sent at ``t0`` whose chain answered at ``t1`` (see the module)."""
    total = max(t1 - t0, 0.0)
    later_transfer = [
        max(h.link_s + h.wall_s - h.queue_s - h.service_s - h.forward_s, 0.0) for h in hops[1:]
    ]
    busy = [max(h.queue_s, 0.0) + max(h.service_s, 0.0) for h in hops]
    first_transfer = max(total - sum(later_transfer) - sum(busy), 0.0)
    transfers = [first_transfer, *later_transfer]
    out = []
    t = t0
    for h, moved in zip(hops, transfers, strict=True):
        q0 = min(t + moved, t1)
        c0 = min(q0 + max(h.queue_s, 0.0), t1)
        c1 = min(c0 + max(h.service_s, 0.0), t1)
        out.append(HopTimes(t, q0, c0, c1))
        t = c1
    return out
