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
"""

from __future__ import annotations

from dataclasses import dataclass, field

from testbed.schedule.base import (
    SCHEDULERS,
    ClusterSnapshot,
    NodeState,
    PerStageScheduler,
    RequestView,
    StageCompletion,
)


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

    def on_complete(self, event: StageCompletion) -> None:
        if self.alpha == 0.0 or event.service_s <= 0.0 or event.predicted_work_s <= 0.0:
            return
        speed = min(
            max(event.predicted_work_s / event.service_s, self.min_capacity), self.max_capacity
        )
        old = self._c_hat.get(event.node, self._prior.get(event.node, 1.0))
        self._c_hat[event.node] = (1.0 - self.alpha) * old + self.alpha * speed
