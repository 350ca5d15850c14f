"""Join the shortest queue: per stage, the up replica with the fewest unfinished requests."""

from __future__ import annotations

import random as _random
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


@SCHEDULERS.register("jsq")
@dataclass(frozen=True)
class JoinShortestQueue(Scheduler):
    """Join-shortest-queue per stage (queue length only; speed and work ignored)."""

    tie_break: str = "name"  # among equally short queues: "name" (smallest) or "random" (seeded)
    seed: int = 0  # for tie_break="random"

    # mutable state, per instance (set in __post_init__; ClassVar keeps it out of the parameters)
    _rng: ClassVar[_random.Random]

    def __post_init__(self) -> None:
        if self.tie_break not in ("name", "random"):
            raise ValueError(f"tie_break must be 'name' or 'random', got {self.tie_break!r}")
        object.__setattr__(self, "_rng", _random.Random(self.seed))

    def route(self, request: RequestView, snapshot: ClusterSnapshot) -> Route:
        route = []
        for s, stage in enumerate(snapshot.stages):
            live = up_nodes(stage, s)
            shortest = min(n.queue_len for n in live)
            ties = sorted(n.name for n in live if n.queue_len == shortest)
            pick = (
                self._rng.choice(ties) if self.tie_break == "random" and len(ties) > 1 else ties[0]
            )
            route.append(pick)
        return tuple(route)
