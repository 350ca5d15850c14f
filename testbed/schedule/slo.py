"""``slo``: multi-SLO routing - the cheapest route predicted to meet the request's TTFT, TPOT
and end-to-end targets (after HyperFlexis; see the README for what is from its abstract).

For every candidate route (one up replica per stage; all combinations up to ``max_routes``,
else each stage's replica is chosen alone) it predicts, from the snapshot's live queues and
capacities (ours):

- the request's time per step on node k: ``step_k = work_s[k] / max(output_tokens, 1) / c_k``
  (its predicted work spread over its steps; ``c_k`` the node's speed learned from measured
  steps, an EWMA of predicted work / service time as ARTS keeps; the snapshot's capacity until
  then);
- one iteration of node k's batch: ``iter_k = (ahead_k + 1) * step_k / batch_speedup_k``
  (continuous batching: a request joins at the next step boundary, and the B rows of a step
  cost ``B / speedup`` single steps), where ``ahead_k`` is the node's queue less the requests
  this scheduler routed there with a *lower* priority: the stages batch by priority, so those
  do not delay this request's steps (without it a chat request saw every queued batch
  request on the fast replica and spilled to a slow one it would not have waited on);
- TTFT = sum over stages of (one iteration waited + the prefill, one iteration) + hops;
  TPOT = sum over stages of iter_k + hops (each token crosses every stage);
  E2E = TTFT + (output_tokens - 1) * TPOT.

A route *meets* the request's SLOs when every declared target holds; among those it takes the
one predicted to finish first (least E2E, then least device time ``sum work_s[k] / c_k``, then
names). It took the cheapest in device time first until 2026-12-01: that sent every request
with a loose target (``batch``) to the fastest replicas too, which then queued the chat
requests and lengthened the run's tail (README, "Algorithms", slo).
When none does it takes the least predicted violation (sum over targets of
``max(0, predicted / target - 1)``). A request without targets gets the least predicted E2E.
The stage servers then order each batch by (priority, least slack) - the request's class and
priority travel with its steps.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from testbed.schedule.base import (
    SCHEDULERS,
    ClusterSnapshot,
    NodeState,
    RequestView,
    Route,
    Scheduler,
    StageCompletion,
    up_nodes,
)


@dataclass(frozen=True)
class Prediction:
    ttft_s: float
    tpot_s: float
    e2e_s: float
    cost_s: float  # device seconds the request uses on the route

    def violation(self, request: RequestView) -> float:
        """Sum over the request's targets of how far the prediction misses (0 = all met)."""
        pairs = (
            (self.ttft_s, request.ttft_slo_s),
            (self.tpot_s, request.tpot_slo_s),
            (self.e2e_s, request.e2e_slo_s),
        )
        return sum(max(0.0, p / t - 1.0) for p, t in pairs if t)


def predict(
    request: RequestView,
    nodes: tuple[NodeState, ...],
    hop_s: float,
    capacity: Callable[[NodeState], float] | None = None,
    lower: Callable[[NodeState], int] | None = None,
) -> Prediction:
    """TTFT, TPOT and E2E of ``request`` on the route ``nodes`` (see the module docstring);
    ``capacity(node)`` is the speed to predict with (default: the snapshot's), ``lower(node)``
    how many of the node's queued requests have a lower priority than ``request`` (default 0)."""
    steps = max(request.output_tokens, 1)
    ttft = tpot = cost = 0.0
    for n in nodes:
        c = max(capacity(n) if capacity is not None else n.capacity, 1e-9)
        work = request.work_s.get(n.name, 0.0) / c
        step = work / steps
        ahead = n.queue_len - min(lower(n), n.queue_len) if lower is not None else n.queue_len
        iteration = (ahead + 1) * step / max(n.batch_speedup, 1.0)
        ttft += iteration + max(iteration, step)
        tpot += iteration
        cost += work
    ttft += hop_s
    tpot += hop_s
    return Prediction(ttft, tpot, ttft + (steps - 1) * tpot, cost)


@SCHEDULERS.register("slo")
@dataclass
class SloAware(Scheduler):
    """Cheapest route predicted to meet the request's SLOs; least violation when none does."""

    orders_stage_queues: ClassVar[bool] = True  # stages batch by (priority, least slack)
    max_routes: int = 4096  # combinations scored; above this each stage is chosen alone
    alpha: float = 0.2  # EWMA weight of a measured step's speed (0 = keep the profile's, as ARTS)
    _speed: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    # request id -> (its priority, the nodes it was routed to and has not left)
    _placed: dict[int, tuple[int, set[str]]] = field(default_factory=dict, init=False, repr=False)
    # node -> priority -> requests routed there that have not left it
    _count: dict[str, dict[int, int]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_routes < 1:
            raise ValueError(f"max_routes must be >= 1, got {self.max_routes}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")

    def capacity(self, node: NodeState) -> float:
        """The node's speed learned from measured steps (the snapshot's prior until then)."""
        return self._speed.get(node.name, node.capacity)

    def lower(self, node: NodeState, priority: int) -> int:
        """Requests this scheduler routed to ``node`` with a priority below ``priority`` that
        have not left it (``predict`` caps it at the node's queue)."""
        return sum(k for p, k in self._count.get(node.name, {}).items() if p < priority)

    def _leave(self, request_id: int, node: str | None = None) -> None:
        """Forget the request on ``node`` (all its nodes when None)."""
        placed = self._placed.get(request_id)
        if placed is None:
            return
        priority, nodes = placed
        for name in list(nodes) if node is None else [node]:
            if name in nodes:
                nodes.discard(name)
                self._count[name][priority] -= 1
        if not nodes:
            del self._placed[request_id]

    def on_complete(self, event: StageCompletion) -> None:
        """Learn each node's speed as ARTS does: predicted work / measured service time, EWMA
        (so routes are predicted with the speed the stages show, not only the profile's); a
        request leaving a node no longer counts there."""
        if event.finished:
            self._leave(event.request_id, event.node)
        if self.alpha == 0.0 or event.service_s <= 0.0 or event.predicted_work_s <= 0.0:
            return
        speed = event.predicted_work_s / event.service_s
        old = self._speed.get(event.node)
        self._speed[event.node] = (
            speed if old is None else (1.0 - self.alpha) * old + self.alpha * speed
        )

    def route(self, request: RequestView, snapshot: ClusterSnapshot) -> Route:
        live = [up_nodes(stage, s) for s, stage in enumerate(snapshot.stages)]
        hop_s = sum(snapshot.hop_s)
        if math.prod(len(x) for x in live) > self.max_routes:
            route = tuple(  # each stage alone, as if it were the whole route
                min(nodes, key=lambda n: self._key(request, (n,), hop_s / len(live))).name
                for nodes in live
            )
        else:
            best = min(itertools.product(*live), key=lambda r: self._key(request, r, hop_s))
            route = tuple(n.name for n in best)
        self._leave(request.request_id)  # re-routed after a fault: its old nodes are gone
        self._placed[request.request_id] = (request.priority, set(route))
        for name in route:
            counts = self._count.setdefault(name, {})
            counts[request.priority] = counts.get(request.priority, 0) + 1
        return route

    def _key(
        self, request: RequestView, nodes: tuple[NodeState, ...], hop_s: float
    ) -> tuple[float, float, float, tuple[str, ...]]:
        p = predict(request, nodes, hop_s, self.capacity, lambda n: self.lower(n, request.priority))
        names = tuple(n.name for n in nodes)
        has_targets = any((request.ttft_slo_s, request.tpot_slo_s, request.e2e_slo_s))
        if not has_targets:
            return (0.0, p.e2e_s, p.cost_s, names)  # no targets: the first to finish
        miss = p.violation(request)
        if miss > 0:
            return (1.0 + miss, p.e2e_s, p.cost_s, names)  # after every route that meets them
        return (0.0, p.e2e_s, p.cost_s, names)  # the first to finish among those that meet
