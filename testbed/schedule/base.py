"""Types shared by all schedulers, the broker and simulators.

Work is measured in *profile seconds*: the time the cost model (or a measured profile) predicts
for a piece of work on a given node. A node's effective capacity is then a dimensionless speed
factor: 1.0 = as predicted, 0.5 = twice as slow as predicted. The broker keeps exact queue
counts and the predicted work it dispatched; schedulers that learn (ARTS) refine capacity from
:class:`StageCompletion` events (measured service time vs predicted work).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from testbed.errors import TestbedError
from testbed.registry import Registry

Route = tuple[str, ...]  # one node name per pipeline stage, in stage order


class NoRouteError(TestbedError, RuntimeError):
    """No node of some stage can take the request (all down)."""


@dataclass(frozen=True)
class NodeState:
    name: str
    stage: int  # index of the pipeline stage this node serves (0 = first non-empty tier)
    up: bool = True
    queue_len: int = 0  # requests routed here and not finished (exact, kept by the broker)
    queued_work_s: float = 0.0  # predicted remaining work of those requests, profile seconds
    capacity: float = (
        1.0  # prior speed factor (from the profile: 1.0 unless the broker knows better)
    )
    mem_free_bytes: int = 2**62  # memory headroom left for KV caches on this node


@dataclass(frozen=True)
class RequestView:
    """What a scheduler may know about a request at admission."""

    request_id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int  # expected output length (the trace's)
    work_s: Mapping[str, float]  # node name -> predicted work of this request's stage on that node
    kv_bytes: tuple[int, ...] = ()  # per stage: KV-cache bytes this request will hold there


@dataclass(frozen=True)
class ClusterSnapshot:
    now_s: float
    stages: tuple[tuple[NodeState, ...], ...]  # per stage, the replicas that hold its blocks
    hop_s: tuple[
        float, ...
    ] = ()  # per hop stage s -> s+1: predicted transfer time for this request

    def node(self, name: str) -> NodeState:
        for stage in self.stages:
            for n in stage:
                if n.name == name:
                    return n
        raise KeyError(name)


@dataclass(frozen=True)
class StageCompletion:
    """A stage finished some of a request's work (a prefill or decode step, or the whole request)."""

    node: str
    request_id: int
    predicted_work_s: float  # profile seconds the broker had charged for this work
    service_s: float  # compute time the stage server measured for it
    now_s: float
    finished: bool = False  # the request left this node (its cache was released)


class Scheduler:
    """Base class: subclasses are frozen-parameter dataclasses registered in SCHEDULERS.

    ``route`` must be deterministic for a given seed, snapshot sequence and completion sequence.
    State that changes (counters, estimates, RNG) lives in attributes set in ``__post_init__``.
    """

    name: ClassVar[str]

    def route(self, request: RequestView, snapshot: ClusterSnapshot) -> Route:
        raise NotImplementedError

    def on_complete(self, event: StageCompletion) -> None:
        """Feed a completion; default: nothing to learn."""

    def describe(self) -> dict[str, object]:
        """Name and parameters, recorded with every result."""
        import dataclasses

        params = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}  # type: ignore[arg-type]
        return {"name": self.name, "params": params}


def up_nodes(stage: tuple[NodeState, ...], stage_index: int) -> tuple[NodeState, ...]:
    """The replicas of a stage that are up, or NoRouteError naming the stage."""
    live = tuple(n for n in stage if n.up)
    if not live:
        names = ", ".join(n.name for n in stage) or "(none)"
        raise NoRouteError(f"stage {stage_index}: no replica is up (replicas: {names})")
    return live


SCHEDULERS: Registry[Scheduler] = Registry("scheduler", "testbed.schedule")
