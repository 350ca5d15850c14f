"""Round-robin: per stage, cycle over the up replicas in name order (GPipe's intra-tier dispatch)."""

from __future__ import annotations

from dataclasses import dataclass, field

from testbed.schedule.base import (
    SCHEDULERS,
    ClusterSnapshot,
    NodeState,
    PerStageScheduler,
    RequestView,
)


@SCHEDULERS.register("round_robin")
@dataclass
class RoundRobin(PerStageScheduler):
    """Round-robin over each stage's up replicas (name order), ignoring load and speed."""

    # state: stage index -> requests routed through it so far
    _next: dict[int, int] = field(init=False, default_factory=dict, repr=False, compare=False)

    def choose(
        self,
        stage: int,
        live: tuple[NodeState, ...],
        request: RequestView,
        snapshot: ClusterSnapshot,
    ) -> NodeState:
        i = self._next.get(stage, 0)
        self._next[stage] = i + 1
        return live[i % len(live)]
