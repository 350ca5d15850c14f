"""What a simulated run writes: each request's record and spans, as the broker records them,
and the run's outcome. Pure: built from the engine's request and node state."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from testbed.metrics.records import RequestRecord, Span
from testbed.sim.links import Network
from testbed.sim.state import CLIENT, SimOutcome, _Node, _Req
from testbed.workload.request import TraceRequest


def request_record(r: _Req, now: float, reason: str | None) -> RequestRecord:
    """``r``'s record, finished at ``now``: completed when ``reason`` is None, else failed."""
    req = r.req
    return RequestRecord(
        request_id=req.request_id,
        arrival_s=req.arrival_s,
        status="completed" if reason is None else "failed",
        prompt_tokens=req.prompt_tokens,
        output_tokens=req.output_tokens,
        route=r.route,
        slo_class=None if r.cls is None else r.cls.name,
        reason=reason,
        token_times_s=tuple(r.tokens) if reason is None else (),
        end_s=now,
        injection_lag_s=None if r.admitted_s is None else r.admitted_s - req.arrival_s,
        queueing_s=r.queue_s,
        stage_compute_s=_per_node(r.route, r.compute),
        hop_transfer_s=_per_hop(r.route, r.hops),
        spans=tuple(r.spans),
    )


def step_span(
    r: _Req, kind: str, node: str, t0: float, t1: float, s: int, peer: str | None,
    token_bytes: int, act_bytes: int,
) -> Span:  # fmt: skip
    """One span of ``r``'s current step on stage ``s``; a transfer carries its bytes (the token
    id to or from the client, else the step's activations)."""
    phase = "prefill" if r.step == 0 else "decode"
    nbytes = None
    if kind == "transfer":
        nbytes = (
            token_bytes
            if peer == CLIENT or node == CLIENT
            else act_bytes * (r.req.prompt_tokens if r.step == 0 else 1)
        )
    return Span(kind, node, t0, t1, r.req.request_id, s, phase, r.step, peer, nbytes)  # type: ignore[arg-type]


def outcome(
    admitted: Sequence[TraceRequest],
    records: Mapping[int, RequestRecord],
    nodes: Mapping[str, _Node],
    node_names: Sequence[str],
    net: Network,
    routed: dict[str, int],
    scheduler: dict[str, Any],
    events: int,
    end_s: float,
) -> SimOutcome:
    """The run's outcome: the admitted requests' records in request order, node and link
    occupancy."""
    links = {
        f"hop{h}.{d}[{k}]": p.busy_s
        for h in range(len(net.fwd))
        for d, pipes in (("fwd", net.fwd[h]), ("rev", net.rev[h]))
        for k, p in enumerate(pipes)
    }
    return SimOutcome(
        records=tuple(records[r.request_id] for r in admitted),
        node_busy_s={n: nodes[n].busy_s for n in node_names},
        link_busy_s=links,
        routed=routed,
        scheduler=scheduler,
        events=events,
        sim_end_s=end_s,
    )


def _per_node(route: tuple[str, ...], values: list[float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, v in zip(route, values, strict=False):
        out[name] = out.get(name, 0.0) + v
    return out


def _per_hop(route: tuple[str, ...], values: list[float]) -> dict[str, float]:
    names = (CLIENT, *route, CLIENT)
    return {f"{names[s]}->{names[s + 1]}": v for s, v in enumerate(values) if v > 0}
