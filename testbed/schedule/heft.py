"""HEFT for one request: stage by stage, the replica with the earliest predicted finish time.

The request's DAG is a chain of stage segments, so HEFT's upward rank is the stage order. For
stage s, the input is ready at ready_s = finish_{s-1} + hop_s[s-1] (ready_0 = now); replica k
is free at avail_k = now + queued_work_s_k / capacity_k; its finish time is
max(ready_s, avail_k) + work_s_k / capacity_k. HEFT picks the minimum (ties: name) and goes on
from that finish time. It uses the snapshot's capacity priors as they are and does not learn.
"""

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


@SCHEDULERS.register("heft")
@dataclass
class Heft(Scheduler):
    """Earliest finish time per stage along the request's chain (static capacities, no learning)."""

    min_capacity: float = 1e-6  # guards against a zero capacity prior

    def route(self, request: RequestView, snapshot: ClusterSnapshot) -> Route:
        route = []
        finish = snapshot.now_s
        for s, stage in enumerate(snapshot.stages):
            ready = finish + (snapshot.hop_s[s - 1] if 0 < s <= len(snapshot.hop_s) else 0.0)
            best: tuple[float, str] | None = None
            for n in up_nodes(stage, s):
                c = max(n.capacity, self.min_capacity)
                start = max(ready, snapshot.now_s + n.queued_work_s / c)
                cand = (start + request.work_s[n.name] / c, n.name)
                best = cand if best is None or cand < best else best
            assert best is not None  # up_nodes never returns an empty tuple
            finish = best[0]
            route.append(best[1])
        return tuple(route)
