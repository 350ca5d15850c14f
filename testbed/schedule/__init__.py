"""Online request schedulers (pure policies: synchronous, no I/O).

Each scheduler is one file in this package, registered by name in ``SCHEDULERS``. It decides a
request's route (one node per pipeline stage) from an immutable :class:`ClusterSnapshot` and is
fed :class:`StageCompletion` events, so the broker and any simulator share the same code.
"""

from testbed.schedule.base import (
    SCHEDULERS,
    ClusterSnapshot,
    NodeState,
    NoRouteError,
    PerStageScheduler,
    RequestView,
    Route,
    Scheduler,
    StageCompletion,
)

__all__ = [
    "SCHEDULERS",
    "ClusterSnapshot",
    "NoRouteError",
    "NodeState",
    "PerStageScheduler",
    "RequestView",
    "Route",
    "Scheduler",
    "StageCompletion",
]
