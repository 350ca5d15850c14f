"""Scenario timelines: what changes during a run, at times from the run's start (pure data).

timeline:
  - {at: 30s, node: edge-agx-1, speed: 0.5}                 # slowdown (CPU quota x 0.5)
  - {at: 60s, link: edge->fog, bandwidth: 10Mbit, delay: 40ms, loss: 1%}   # any subset
  - {at: 90s, node: fog-3090-1, down: crash}                # or down: partition
  - {at: 120s, rate_scale: 2.0}                             # arrivals from now on 2x as dense
  - {at: 150s, node: fog-3090-1, up: true}                  # restarted, re-admitted once healthy

The kind of an event is given by its fields (``link`` / ``down`` / ``up`` / ``speed`` /
``rate_scale``). :func:`check_timeline` checks the events against the topology and the run
(unknown node or link, time past the run's end, ``up`` without a ``down`` before it) and
names the field and the fix. :func:`scale_arrivals` applies the ``rate_scale`` events to a
trace's arrival times (the same for the broker and the simulator).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from testbed.errors import ConfigError
from testbed.spec.quantities import FiniteFloat, LinkSeconds, LongSeconds, Percent, RateBps

if TYPE_CHECKING:
    from testbed.spec.topology import LinkSpec, Topology
    from testbed.workload.request import TraceRequest

EventKind = Literal["link", "down", "up", "speed", "rate_scale"]
_KIND_FIELDS: tuple[EventKind, ...] = ("link", "down", "up", "speed", "rate_scale")


class TimelineEvent(BaseModel):
    """One change at ``at_s`` seconds from the run's start."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False
    )

    at_s: LongSeconds = Field(alias="at")
    # link change: "edge->fog" (both directions); any subset of the link's fields
    link: str | None = None
    bandwidth_bps: RateBps | None = Field(default=None, alias="bandwidth", gt=0)
    delay_s: LinkSeconds | None = Field(default=None, alias="delay")
    jitter_s: LinkSeconds | None = Field(default=None, alias="jitter")
    loss_pct: Percent | None = Field(default=None, alias="loss")
    # node events
    node: str | None = None
    down: Literal["crash", "partition"] | None = None
    up: Literal[True] | None = None
    speed: FiniteFloat | None = Field(default=None, gt=0, le=64)  # x the node's own speed
    # load change: arrivals after ``at`` come rate_scale times as fast (2.0: twice the load)
    rate_scale: FiniteFloat | None = Field(default=None, gt=0, le=1000)

    @model_validator(mode="after")
    def _one_kind(self) -> TimelineEvent:
        kinds = [k for k in _KIND_FIELDS if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(
                f"an event is exactly one of link, down, up, speed, rate_scale (got "
                f"{', '.join(kinds) or 'none'}); write e.g. {{at: 60s, link: edge->fog, "
                "bandwidth: 10Mbit}"
            )
        kind = kinds[0]
        link_fields = (self.bandwidth_bps, self.delay_s, self.jitter_s, self.loss_pct)
        if kind == "link" and all(v is None for v in link_fields):
            raise ValueError("a link event changes at least one of bandwidth, delay, jitter, loss")
        if kind != "link" and any(v is not None for v in link_fields):
            raise ValueError(
                "bandwidth, delay, jitter and loss belong to a link event (link: A->B)"
            )
        if kind in ("down", "up", "speed") and self.node is None:
            raise ValueError(f"a {kind} event names its node (node: NAME)")
        if kind in ("link", "rate_scale") and self.node is not None:
            raise ValueError(f"a {kind} event has no node")
        if kind == "link" and (self.link or "").count("->") != 1:
            raise ValueError(f"link {self.link!r} is not TIER->TIER; write e.g. 'edge->fog'")
        return self

    @property
    def kind(self) -> EventKind:
        return next(k for k in _KIND_FIELDS if getattr(self, k) is not None)

    @property
    def tiers(self) -> tuple[str, str]:
        a, b = (self.link or "").split("->")
        return a.strip(), b.strip()

    def describe(self) -> str:
        """One line for logs, summaries and plot markers."""
        k = self.kind
        if k == "link":
            parts = []
            if self.bandwidth_bps is not None:
                parts.append(f"{self.bandwidth_bps / 1e6:g}Mbit")
            if self.delay_s is not None:
                parts.append(f"delay {self.delay_s * 1e3:g}ms")
            if self.jitter_s is not None:
                parts.append(f"jitter {self.jitter_s * 1e3:g}ms")
            if self.loss_pct is not None:
                parts.append(f"loss {self.loss_pct:g}%")
            return f"{self.link}: {', '.join(parts)}"
        if k == "down":
            return f"{self.node} down ({self.down})"
        if k == "up":
            return f"{self.node} up"
        if k == "speed":
            return f"{self.node} speed x{self.speed:g}"
        return f"load x{self.rate_scale:g}"

    def to_dict(self) -> dict[str, Any]:
        return {"at_s": self.at_s, "kind": self.kind, "what": self.describe()} | {
            k: v for k, v in self.model_dump(exclude_none=True).items() if k not in ("at_s",)
        }

    def apply_to_link(self, old: LinkSpec) -> LinkSpec:
        """The link after this event (fields not named keep their value)."""
        from testbed.spec.topology import LinkSpec as _L

        new = {
            "bandwidth_bps": old.bandwidth_bps,
            "delay_s": old.delay_s,
            "jitter_s": old.jitter_s,
            "loss_pct": old.loss_pct,
        }
        for k in new:
            v = getattr(self, k)
            if v is not None:
                new[k] = v
        if new["jitter_s"] > new["delay_s"]:  # a delay cut below the old jitter: jitter follows
            new["jitter_s"] = new["delay_s"]
        return _L.model_validate(new)


Timeline = tuple[TimelineEvent, ...]


def check_timeline(
    events: Sequence[TimelineEvent],
    topology: Topology,
    *,
    end_s: float | None,
    source: str,
) -> None:
    """Check the events against the topology and the run's length (in file order)."""
    names = {n.name for _, n in topology.nodes()}
    tiers = topology.tier_names
    adjacent = {(tiers[j], tiers[j + 1]) for j in range(len(tiers) - 1)}
    down: dict[str, float] = {}
    order = sorted(range(len(events)), key=lambda i: events[i].at_s)
    for i in order:
        ev = events[i]
        field = f"timeline[{i}]"
        if end_s is not None and ev.at_s >= end_s:
            raise ConfigError(
                f"at {ev.at_s:g}s is not before the run's end (duration {end_s:g}s); "
                "move the event earlier or lengthen duration",
                source=source,
                field=f"{field}.at",
            )
        if ev.node is not None and ev.node not in names:
            raise ConfigError(
                f"unknown node {ev.node!r}; nodes of {topology.name}: {', '.join(sorted(names))}",
                source=source,
                field=f"{field}.node",
            )
        if ev.kind == "link":
            a, b = ev.tiers
            if (a, b) not in adjacent and (b, a) not in adjacent:
                known = ", ".join(f"{x}->{y}" for x, y in sorted(adjacent))
                raise ConfigError(
                    f"no link {ev.link!r} in {topology.name}; links: {known}",
                    source=source,
                    field=f"{field}.link",
                )
            j = min(tiers.index(a), tiers.index(b))
            old = topology.uplink(j)
            assert old is not None
            if ev.jitter_s is not None and ev.jitter_s > (
                ev.delay_s if ev.delay_s is not None else old.delay_s
            ):
                raise ConfigError(
                    "jitter is larger than the link's delay; make jitter <= delay",
                    source=source,
                    field=f"{field}.jitter",
                )
        elif ev.kind == "down":
            assert ev.node is not None
            if ev.node in down:
                raise ConfigError(
                    f"{ev.node} is already down (since {down[ev.node]:g}s); bring it up first "
                    f"({{at: ..., node: {ev.node}, up: true}})",
                    source=source,
                    field=f"{field}.down",
                )
            down[ev.node] = ev.at_s
        elif ev.kind == "up":
            assert ev.node is not None
            if ev.node not in down:
                raise ConfigError(
                    f"{ev.node} is not down at {ev.at_s:g}s; an up event follows a down event "
                    f"of the same node (add {{at: ..., node: {ev.node}, down: crash}} before it)",
                    source=source,
                    field=f"{field}.up",
                )
            del down[ev.node]


def scale_arrivals(
    requests: Sequence[TraceRequest], events: Sequence[TimelineEvent]
) -> list[TraceRequest]:
    """Arrival times after the ``rate_scale`` events: from an event at T on, the gaps of the
    trace are divided by its scale (scales replace each other; they do not multiply)."""
    import dataclasses

    steps = sorted((ev.at_s, float(ev.rate_scale)) for ev in events if ev.rate_scale is not None)
    if not steps:
        return list(requests)
    # breakpoints (trace time, run time, scale from there on); events are on the run clock
    points = [(0.0, 0.0, 1.0)]
    for at, scale in steps:
        t_trace, t_run, old = points[-1]
        points.append((t_trace + (at - t_run) * old, at, scale))

    def warp(t: float) -> float:
        t_trace, t_run, scale = next(p for p in reversed(points) if p[0] <= t)
        return t_run + (t - t_trace) / scale

    return [dataclasses.replace(r, arrival_s=warp(r.arrival_s)) for r in requests]
