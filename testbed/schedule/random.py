"""Random: per stage, a uniformly random up replica from a seeded generator."""

from __future__ import annotations

import random as _random  # absolute import: the stdlib module, not this file
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


@SCHEDULERS.register("random")
@dataclass(frozen=True)
class RandomChoice(Scheduler):
    """Uniformly random up replica per stage (seeded, so runs repeat)."""

    seed: int = 0

    # mutable state, per instance (set in __post_init__; ClassVar keeps it out of the parameters)
    _rng: ClassVar[_random.Random]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_rng", _random.Random(self.seed))

    def route(self, request: RequestView, snapshot: ClusterSnapshot) -> Route:
        route = []
        for s, stage in enumerate(snapshot.stages):
            live = sorted(n.name for n in up_nodes(stage, s))
            route.append(self._rng.choice(live))
        return tuple(route)
