"""Round-robin: per stage, cycle over the up replicas in name order (GPipe's intra-tier dispatch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from testbed.schedule.base import (
    SCHEDULERS,
    ClusterSnapshot,
    RequestView,
    Route,
    Scheduler,
    up_nodes,
)


@SCHEDULERS.register("round_robin")
@dataclass(frozen=True)
class RoundRobin(Scheduler):
    """Round-robin over each stage's up replicas (name order), ignoring load and speed."""

    # mutable state, per instance (set in __post_init__; ClassVar keeps it out of the parameters)
    _next: ClassVar[dict[int, int]]  # stage index -> requests routed through it so far

    def __post_init__(self) -> None:
        object.__setattr__(self, "_next", {})

    def route(self, request: RequestView, snapshot: ClusterSnapshot) -> Route:
        route = []
        for s, stage in enumerate(snapshot.stages):
            live = sorted(up_nodes(stage, s), key=lambda n: n.name)
            i = self._next.get(s, 0)
            route.append(live[i % len(live)].name)
            self._next[s] = i + 1
        return tuple(route)
