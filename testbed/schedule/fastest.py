"""Fastest node only: per stage, the replica that would finish this request first if idle."""

from __future__ import annotations

from dataclasses import dataclass

from testbed.schedule.base import (
    SCHEDULERS,
    ClusterSnapshot,
    NodeState,
    PerStageScheduler,
    RequestView,
)


@SCHEDULERS.register("fastest")
@dataclass
class Fastest(PerStageScheduler):
    """Fastest up replica per stage (least work_s / capacity), ignoring queues: a hot-spot baseline."""

    min_capacity: float = 1e-6  # guards against a zero capacity prior

    def choose(
        self,
        stage: int,
        live: tuple[NodeState, ...],
        request: RequestView,
        snapshot: ClusterSnapshot,
    ) -> NodeState:
        return min(live, key=lambda n: request.work_s[n.name] / max(n.capacity, self.min_capacity))
