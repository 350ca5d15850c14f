"""Random: per stage, a uniformly random up replica from a seeded generator."""

from __future__ import annotations

import random as _random  # absolute import: the stdlib module, not this file
from dataclasses import dataclass, field

from testbed.schedule.base import (
    SCHEDULERS,
    ClusterSnapshot,
    NodeState,
    PerStageScheduler,
    RequestView,
)


@SCHEDULERS.register("random")
@dataclass
class RandomChoice(PerStageScheduler):
    """Uniformly random up replica per stage (seeded, so runs repeat)."""

    seed: int = 0
    _rng: _random.Random = field(init=False, repr=False, compare=False)  # state

    def __post_init__(self) -> None:
        self._rng = _random.Random(self.seed)

    def choose(
        self,
        stage: int,
        live: tuple[NodeState, ...],
        request: RequestView,
        snapshot: ClusterSnapshot,
    ) -> NodeState:
        return self._rng.choice(live)
