"""ARTS (Hyperion's Stage 2, HypSched-RT): least predicted finish delay per stage.

Our reconstruction (ALGORITHMS.md, Stage 2): for each stage, among the up replicas with memory
headroom for the request's KV cache there, pick argmin d_k = (queued_work_s_k + work_s_k) /
C_hat_k; ties go to the larger C_hat, then to the smaller name. If no up replica has headroom
the filter is dropped for that stage (the request still needs a route; the stage server will
queue or refuse it). C_hat_k starts at the snapshot's ``capacity`` prior and is refined by an
EWMA of observed speed = predicted_work_s / service_s from completions, clamped to
[min_capacity, max_capacity].

Batch-aware (ours): a node that batches decodes serves its queue ``batch_speedup`` times
faster than one request at a time (the snapshot's :attr:`NodeState.batch_speedup`, from the
cost model's roofline of the batch), so the predicted delay is divided by it. With no
batching (speedup 1, max_batch 1) the choice is exactly the original rule.

Over many replicas (a simulated cluster of 1,000 nodes), :meth:`Arts.route_ledger` takes the
same decision from the ledger's per-stage arrays with numpy (the same float operations, so the
same argmin and tie-breaks) instead of a snapshot and a Python loop per replica
(it assumes no batching: every ``batch_speedup`` is 1 there, as in the simulator).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from testbed.schedule.base import (
    SCHEDULERS,
    ClusterSnapshot,
    NodeState,
    NoRouteError,
    PerStageScheduler,
    RequestView,
    Route,
    StageCompletion,
    StepDone,
)

if TYPE_CHECKING:
    from testbed.schedule.ledger import Ledger, StageArrays

# below this many replicas in all, route_ledger takes the snapshot path (numpy costs more)
VECTOR_MIN_NODES = 48


@SCHEDULERS.register("arts")
@dataclass
class Arts(PerStageScheduler):
    """ARTS: least predicted finish delay, capacity learned from completions (EWMA)."""

    alpha: float = 0.2  # EWMA weight of a new speed observation (0 = never learn)
    use_memory_filter: bool = True  # skip replicas without KV headroom for the request
    # Clamp for observed speed and C_hat: a guard against nonsense, not a model. It must not
    # bind in normal use: on CPUs the roofline can underestimate small steps by 100x or more.
    min_capacity: float = 1e-6
    max_capacity: float = 1e6

    # state: node -> learned speed factor; node -> last capacity prior seen in a snapshot
    _c_hat: dict[str, float] = field(init=False, default_factory=dict, repr=False, compare=False)
    _prior: dict[str, float] = field(init=False, default_factory=dict, repr=False, compare=False)
    # route_ledger's mirror of C_hat (else the prior) per stage, in the ledger's name order;
    # name -> (stage, position); request.work_s mapping id -> (mapping, per-stage arrays)
    _cap: list[np.ndarray] = field(init=False, default_factory=list, repr=False, compare=False)
    _pos: dict[str, tuple[int, int]] = field(
        init=False, default_factory=dict, repr=False, compare=False
    )
    _work: dict[int, tuple[Mapping[str, float], list[np.ndarray]]] = field(
        init=False, default_factory=dict, repr=False, compare=False
    )
    _cap_of: object = field(init=False, default=None, repr=False, compare=False)  # arrays mirrored

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not 0.0 < self.min_capacity <= self.max_capacity:
            raise ValueError("need 0 < min_capacity <= max_capacity")

    def capacity(self, node: NodeState) -> float:
        """C_hat for ``node``: the learned estimate, else the snapshot's prior (remembered as the
        EWMA's starting point)."""
        self._prior[node.name] = node.capacity
        return self._c_hat.get(node.name, node.capacity)

    def choose(
        self,
        stage: int,
        live: tuple[NodeState, ...],
        request: RequestView,
        snapshot: ClusterSnapshot,
    ) -> NodeState:
        kv = request.kv_bytes[stage] if stage < len(request.kv_bytes) else 0
        fits = [n for n in live if n.mem_free_bytes >= kv] if self.use_memory_filter else []
        best, best_key = live[0], None
        for n in fits or live:  # argmin of _key, written out: it runs for every replica
            c = max(self.capacity(n), self.min_capacity)
            rate = c * max(n.batch_speedup, 1.0)  # batch-aware service rate
            key = ((n.queued_work_s + request.work_s[n.name]) / rate, -c, n.name)
            if best_key is None or key < best_key:
                best, best_key = n, key
        return best

    def capacity_estimates(self) -> dict[str, float]:
        """C_hat of every node seen completing work: its speed x the predicted one (the
        measured node speeds adaptive re-partitioning plans with)."""
        return dict(self._c_hat)

    def on_complete(self, event: StageCompletion) -> None:
        self._observe(event.node, event.predicted_work_s, event.service_s)

    def _observe(self, node: str, predicted_work_s: float, service_s: float) -> None:
        if self.alpha == 0.0 or service_s <= 0.0 or predicted_work_s <= 0.0:
            return
        speed = min(max(predicted_work_s / service_s, self.min_capacity), self.max_capacity)
        old = self._c_hat.get(node, self._prior.get(node, 1.0))
        new = self._c_hat[node] = (1.0 - self.alpha) * old + self.alpha * speed
        pos = self._pos.get(node)
        if pos is not None:
            self._cap[pos[0]][pos[1]] = new

    def step_observer(self) -> Callable[[Sequence[StepDone]], None] | None:
        """For simulators: ``f(steps)`` does what :meth:`on_complete` does with each step's
        completion, in order, without building the events (None if a subclass changed
        on_complete)."""
        return self._observe_many if type(self).on_complete is Arts.on_complete else None

    def _observe_many(self, steps: Sequence[StepDone]) -> None:
        """:meth:`_observe` for each step, written out (the same arithmetic; route_ledger's
        mirror of C_hat gets each node's last value once, at the end)."""
        alpha, lo, hi = self.alpha, self.min_capacity, self.max_capacity
        if alpha == 0.0:
            return
        keep = 1.0 - alpha
        c_hat, prior = self._c_hat, self._prior
        for node, _, _, predicted, service, _ in steps:
            if service <= 0.0 or predicted <= 0.0:
                continue
            speed = predicted / service  # min(max(speed, lo), hi), with lo <= hi
            if speed < lo:
                speed = lo
            elif speed > hi:
                speed = hi
            old = c_hat.get(node)
            if old is None:
                old = prior.get(node, 1.0)
            c_hat[node] = keep * old + alpha * speed
        pos = self._pos
        if pos:
            cap = self._cap
            for node in {step[0] for step in steps}:
                at, new = pos.get(node), c_hat.get(node)
                if at is not None and new is not None:
                    cap[at[0]][at[1]] = new

    def route_ledger(
        self, request: RequestView, ledger: Ledger, now_s: float, hop_s: Sequence[float] = ()
    ) -> Route:
        """The route :meth:`route` returns for ``ledger.snapshot(now_s, hop_s)``, taken with
        vector operations over the ledger's arrays when there are many replicas."""
        if (
            type(self).choose is not Arts.choose
            or type(self).route is not PerStageScheduler.route
            or len(ledger.books) < VECTOR_MIN_NODES
        ):
            return self.route(request, ledger.snapshot(now_s, hop_s))
        arrays = ledger.stage_arrays()
        if self._cap_of is not arrays:  # first call, or another ledger
            self._cap_of, self._cap, self._pos, self._work = arrays, [], {}, {}
            for s, a in enumerate(arrays):
                for i, n in enumerate(a.names):
                    # the priors route() would remember on its first scan (used by on_complete)
                    self._prior[n] = float(a.capacity[i])
                    self._pos[n] = (s, i)
                self._cap.append(
                    np.array(
                        [self._c_hat.get(n, float(a.capacity[i])) for i, n in enumerate(a.names)]
                    )
                )
        work = self._work_arrays(request.work_s, arrays)
        route = []
        for s, a in enumerate(arrays):
            up = a.up
            if not up.any():
                names = ", ".join(ledger.stages[s]) or "(none)"
                raise NoRouteError(f"stage {s}: no replica is up (replicas: {names})")
            cand = up
            if self.use_memory_filter:
                kv = request.kv_bytes[s] if s < len(request.kv_bytes) else 0
                fits = up & (a.mem_free_bytes >= kv)
                if fits.any():
                    cand = fits
            c = np.maximum(self._cap[s], self.min_capacity)
            key = np.where(cand, (a.queued_work_s + work[s]) / c, np.inf)
            best = np.flatnonzero(cand & (key == key.min()))
            if len(best) > 1:  # ties: the larger C_hat, then the smaller name (name order)
                cb = c[best]
                best = best[cb == cb.max()]
            route.append(a.names[int(best[0])])
        return tuple(route)

    def _work_arrays(
        self, work_s: Mapping[str, float], arrays: Sequence[StageArrays]
    ) -> list[np.ndarray]:
        """Per stage, the request's work_s in name order (cached per mapping: the predictor
        returns one mapping per request shape)."""
        hit = self._work.get(id(work_s))
        if hit is not None and hit[0] is work_s:
            return hit[1]
        if len(self._work) > 4096:
            self._work.clear()
        out = [np.array([work_s[n] for n in a.names], dtype=np.float64) for a in arrays]
        self._work[id(work_s)] = (work_s, out)
        return out
