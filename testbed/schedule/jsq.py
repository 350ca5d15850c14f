"""Join the shortest queue: per stage, the up replica with the fewest unfinished requests."""

from __future__ import annotations

import random as _random
from dataclasses import dataclass, field

from testbed.schedule.base import (
    SCHEDULERS,
    ClusterSnapshot,
    NodeState,
    PerStageScheduler,
    RequestView,
)


@SCHEDULERS.register("jsq")
@dataclass
class JoinShortestQueue(PerStageScheduler):
    """Join-shortest-queue per stage (queue length only; speed and work ignored)."""

    tie_break: str = "name"  # among equally short queues: "name" (smallest) or "random" (seeded)
    seed: int = 0  # for tie_break="random"
    _rng: _random.Random = field(init=False, repr=False, compare=False)  # state

    def __post_init__(self) -> None:
        if self.tie_break not in ("name", "random"):
            raise ValueError(f"tie_break must be 'name' or 'random', got {self.tie_break!r}")
        self._rng = _random.Random(self.seed)

    def choose(
        self,
        stage: int,
        live: tuple[NodeState, ...],
        request: RequestView,
        snapshot: ClusterSnapshot,
    ) -> NodeState:
        shortest = min(n.queue_len for n in live)
        ties = [n for n in live if n.queue_len == shortest]  # live is in name order
        return self._rng.choice(ties) if self.tie_break == "random" and len(ties) > 1 else ties[0]
