"""Fastest node only: per stage, the replica that would finish this request first if idle."""

from __future__ import annotations

from dataclasses import dataclass

from testbed.schedule.base import (
    SCHEDULERS,
    ClusterSnapshot,
    RequestView,
    Route,
    Scheduler,
    up_nodes,
)


@SCHEDULERS.register("fastest")
@dataclass(frozen=True)
class Fastest(Scheduler):
    """Fastest up replica per stage (least work_s / capacity), ignoring queues: a hot-spot baseline."""

    min_capacity: float = 1e-6  # guards against a zero capacity prior

    def route(self, request: RequestView, snapshot: ClusterSnapshot) -> Route:
        route = []
        for s, stage in enumerate(snapshot.stages):
            live = up_nodes(stage, s)
            best = min(
                live,
                key=lambda n: (request.work_s[n.name] / max(n.capacity, self.min_capacity), n.name),
            )
            route.append(best.name)
        return tuple(route)
