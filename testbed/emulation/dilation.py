"""Time dilation (DieCast, NSDI 2008) for emulated runs on a host too small for the cluster (pure).

Run the whole experiment k times slower: every emulated step time x k (the stages' timing),
every link delay and jitter x k, every bandwidth / k, every arrival time x k; then divide the
measured times by k. The host gets k times more real time per emulated step, so fewer steps
overrun, while every emulated quantity keeps its ratio to every other. k is recorded with the
results (``summary.json`` ``emulation.dilation``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

from testbed.metrics.records import RequestRecord, Span
from testbed.spec.timeline import TimelineEvent
from testbed.spec.topology import LinkSpec, Topology
from testbed.workload.request import TraceRequest

L = TypeVar("L", bound=LinkSpec)


def dilate_link(link: L, k: float) -> L:
    return link.model_copy(
        update={
            "bandwidth_bps": link.bandwidth_bps / k,
            "delay_s": link.delay_s * k,
            "jitter_s": link.jitter_s * k,
        }
    )


def dilate_topology(topo: Topology, k: float) -> Topology:
    """The topology with every LAN and inter-tier link k times slower."""
    if k == 1:
        return topo
    tiers = tuple(t.model_copy(update={"lan": dilate_link(t.lan, k)}) for t in topo.tiers)
    links = tuple(dilate_link(link, k) for link in topo.links)
    return topo.model_copy(update={"tiers": tiers, "links": links})


def undilate_topology(topo: Topology, k: float) -> Topology:
    """A dilated run's topology (its ``config.json`` keeps the links it ran on: k times
    slower) back on the emulated clock, as the planner saw it."""
    return dilate_topology(topo, 1.0 / k)


def run_dilation(config: Mapping[str, Any]) -> float:
    """The time dilation k of a run, from its ``config.json`` (1 for a real or undilated run)."""
    scen = config.get("scenario") or {}
    if scen.get("execution") != "emulated":
        return 1.0
    return float(scen.get("dilation") or 1.0)


def dilate_requests(reqs: Iterable[TraceRequest], k: float) -> tuple[TraceRequest, ...]:
    return tuple(dataclasses.replace(r, arrival_s=r.arrival_s * k) for r in reqs)


def dilate_timeline(events: Iterable[TimelineEvent], k: float) -> tuple[TimelineEvent, ...]:
    """A timeline on the dilated clock: every event's time x k, a link event's bandwidth / k
    and delay and jitter x k (loss, speed, up/down and rate_scale keep their values: arrival
    times are scaled before they are dilated)."""
    if k == 1:
        return tuple(events)
    out = []
    for ev in events:
        update: dict[str, float] = {"at_s": ev.at_s * k}
        if ev.bandwidth_bps is not None:
            update["bandwidth_bps"] = ev.bandwidth_bps / k
        if ev.delay_s is not None:
            update["delay_s"] = ev.delay_s * k
        if ev.jitter_s is not None:
            update["jitter_s"] = ev.jitter_s * k
        out.append(ev.model_copy(update=update))
    return tuple(out)


def undilate_applied(
    applied: Iterable[Mapping[str, Any]], k: float, asked: Sequence[TimelineEvent]
) -> list[dict[str, Any]]:
    """Applied timeline events (``AppliedEvent.to_dict``, in the order of ``asked``, the
    undilated events) of a dilated run back on the emulated clock: times / k, a link's
    bandwidth x k, delay and jitter / k, each described as asked."""
    out = []
    for e, ev in zip(applied, asked, strict=False):
        d = dict(e) | {"what": ev.describe()}
        for key in ("at_s", "applied_s", "delay_s", "jitter_s"):
            if isinstance(d.get(key), int | float):
                d[key] = d[key] / k
        if isinstance(d.get("bandwidth_bps"), int | float):
            d["bandwidth_bps"] = d["bandwidth_bps"] * k
        out.append(d)
    return out


def _span(s: Span, f: float) -> Span:
    return dataclasses.replace(s, start_s=s.start_s * f, end_s=s.end_s * f)


def undilate_records(records: Sequence[RequestRecord], k: float) -> tuple[RequestRecord, ...]:
    """Measured records back on the emulated clock: every time divided by k."""
    if k == 1:
        return tuple(records)
    f = 1.0 / k
    return tuple(
        dataclasses.replace(
            r,
            arrival_s=r.arrival_s * f,
            token_times_s=tuple(t * f for t in r.token_times_s),
            end_s=None if r.end_s is None else r.end_s * f,
            injection_lag_s=None if r.injection_lag_s is None else r.injection_lag_s * f,
            queueing_s=r.queueing_s * f,
            stage_compute_s={n: v * f for n, v in r.stage_compute_s.items()},
            hop_transfer_s={n: v * f for n, v in r.hop_transfer_s.items()},
            spans=tuple(_span(s, f) for s in r.spans),
        )
        for r in records
    )
