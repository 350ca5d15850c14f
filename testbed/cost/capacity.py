"""How much load a plan sustains: its capacity, bottleneck utilisation, and a rate where every
compared plan is stable (pure functions over :class:`testbed.spec.plan.Plan`).

Ours. A plan is a chain of resources that every reference request uses once:

* each tier that holds blocks: its replicas (the tier's nodes that fit the range) run requests
  side by side, one each, so the tier serves ``sum over replicas of 1 / node_compute_s``
  requests/s (k identical replicas: k / compute_s); with ``even_dispatch`` (a scheduler that
  splits requests evenly, as round robin does) the slowest replica limits it instead:
  ``k / max(node_compute_s)``;
* each link a stage ships its output over: one resource whatever the replicas, busy
  ``transfer_s`` per request, so it serves ``1 / transfer_s``.

The plan's capacity is the least of these (requests/s at which its bottleneck saturates); the
queue in front of the bottleneck grows without bound above it, so latencies measured there
depend on the run's length, not on the policy. One-way link delays add latency, not occupancy,
and do not limit it. A link crossed between empty tiers is not in the plan and not counted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from testbed.cost.model import CostModel
from testbed.partition import PARTITIONERS, Partitioner
from testbed.spec.plan import Plan, RequestShape
from testbed.spec.topology import Topology


@dataclass(frozen=True)
class PlanCapacity:
    """A plan's capacity and where it binds."""

    capacity_rps: float  # requests/s at which the bottleneck saturates (inf: nothing costs time)
    bottleneck: str  # "tier NAME" or "link A->B"
    bottleneck_time_s: float  # its busy time per request, divided by its parallel replicas
    resources_rps: dict[str, float]  # every resource's capacity, in pipeline order

    def utilisation(self, rate_rps: float) -> float:
        return _utilisation(rate_rps, self.capacity_rps)

    def to_dict(self) -> dict[str, object]:
        def num(x: float) -> float | None:  # JSON has no infinity
            return x if math.isfinite(x) else None

        return {
            "capacity_rps": num(self.capacity_rps),
            "bottleneck": self.bottleneck,
            "bottleneck_time_s": self.bottleneck_time_s,
            "resources_rps": {k: num(v) for k, v in self.resources_rps.items()},
        }


def _utilisation(rate_rps: float, capacity_rps: float) -> float:
    if rate_rps < 0 or not math.isfinite(rate_rps):
        raise ValueError(f"rate_rps must be finite and >= 0, got {rate_rps!r}")
    return 0.0 if math.isinf(capacity_rps) else rate_rps / capacity_rps


def plan_capacity(plan: Plan, *, even_dispatch: bool = False) -> PlanCapacity:
    """Requests/s the plan sustains and its bottleneck resource (see the module docstring)."""
    resources: dict[str, float] = {}
    active = plan.active_stages()
    for k, s in enumerate(active):
        times = [t for t in s.node_compute_s.values()] or [s.compute_s]
        if even_dispatch:
            worst = max(times)
            rate = math.inf if worst <= 0 else len(times) / worst
        else:
            rate = math.inf if any(t <= 0 for t in times) else sum(1.0 / t for t in times)
        resources[f"tier {s.tier}"] = rate
        if k + 1 < len(active):
            nxt = active[k + 1].tier
            resources[f"link {s.tier}->{nxt}"] = (
                math.inf if s.transfer_s <= 0 else 1.0 / s.transfer_s
            )
    if not resources:  # pragma: no cover - a plan always holds its blocks somewhere
        raise ValueError("plan has no stage holding blocks")
    name = min(resources, key=lambda r: resources[r])  # first of the least, in pipeline order
    cap = resources[name]
    return PlanCapacity(cap, name, 0.0 if math.isinf(cap) else 1.0 / cap, resources)


def bottleneck_utilisation(plan: Plan, rate_rps: float, *, even_dispatch: bool = False) -> float:
    """Utilisation of the plan's bottleneck at ``rate_rps`` (>= 1: unstable, queues grow)."""
    return plan_capacity(plan, even_dispatch=even_dispatch).utilisation(rate_rps)


@dataclass(frozen=True)
class PlanLoad:
    """One compared partitioner: its plan and capacity."""

    label: str
    plan: Plan
    capacity: PlanCapacity


@dataclass(frozen=True)
class StableLoad:
    """Plans of several partitioners and the highest rate at which all of them are stable."""

    plans: tuple[PlanLoad, ...]
    utilisation: float  # the target: every plan's bottleneck at most this busy
    max_rate_rps: float  # utilisation x the least capacity
    limited_by: str  # label of the plan with the least capacity

    def rates(self, fractions: Sequence[float]) -> list[float]:
        """Rates at these fractions of ``max_rate_rps`` (e.g. 0.1 .. 1.0 for a sweep)."""
        return [f * self.max_rate_rps for f in fractions]


def stable_load(
    topology: Topology,
    cost: CostModel,
    partitioners: Sequence[str | Partitioner] | Mapping[str, Partitioner],
    shape: RequestShape | None = None,
    *,
    utilisation: float = 0.8,
    even_dispatch: bool = False,
) -> StableLoad:
    """Plan each partitioner on ``topology`` and find the highest request rate at which every
    plan's bottleneck is at most ``utilisation`` busy: ``utilisation x min(capacity)``, so an
    experiment comparing them can choose loads where all are stable. Partitioners are names
    (default parameters), instances (labelled by name) or a mapping label -> instance."""
    from testbed.cost.planner import make_plan

    if not (0 < utilisation <= 1) or not math.isfinite(utilisation):
        raise ValueError(f"utilisation must be in (0, 1], got {utilisation!r}")
    if isinstance(partitioners, Mapping):
        items = list(partitioners.items())
    else:
        items = []
        for p in partitioners:
            inst = PARTITIONERS.create(p) if isinstance(p, str) else p
            items.append((inst.name, inst))
    if not items:
        raise ValueError("need at least one partitioner")
    labels = [label for label, _ in items]
    if len(set(labels)) != len(labels):
        raise ValueError(f"partitioner labels must be unique, got {labels}; pass a mapping")
    rows = []
    for label, part in items:
        plan = make_plan(topology, cost, part, shape)
        rows.append(PlanLoad(label, plan, plan_capacity(plan, even_dispatch=even_dispatch)))
    least = min(rows, key=lambda r: r.capacity.capacity_rps)
    cap = least.capacity.capacity_rps
    return StableLoad(
        tuple(rows), utilisation, math.inf if math.isinf(cap) else utilisation * cap, least.label
    )
