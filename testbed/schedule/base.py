"""Types shared by all schedulers, the broker and simulators.

Work is measured in *profile seconds*: the time the cost model (or a measured profile) predicts
for a piece of work on a given node. A node's effective capacity is then a dimensionless speed
factor: 1.0 = as predicted, 0.5 = twice as slow as predicted. The broker keeps exact queue
counts and the predicted work it dispatched; schedulers that learn (ARTS) refine capacity from
:class:`StageCompletion` events (measured service time vs predicted work).
"""

from __future__ import annotations

import abc
import dataclasses
import operator
from collections.abc import Mapping
from typing import ClassVar

from testbed.errors import TestbedError
from testbed.registry import Registry

Route = tuple[str, ...]  # one node name per pipeline stage, in stage order


class NoRouteError(TestbedError, RuntimeError):
    """No node of some stage can take the request (all down)."""


@dataclasses.dataclass(frozen=True)
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
    # how many times faster than one at a time the node serves its queue by batching decodes
    # (testbed.cost.model.batch_speedup of its queue, capped by its max_batch; 1 = no batching)
    batch_speedup: float = 1.0


@dataclasses.dataclass(frozen=True)
class RequestView:
    """What a scheduler may know about a request at admission."""

    request_id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int  # expected output length (the trace's)
    work_s: Mapping[str, float]  # node name -> predicted work of this request's stage on that node
    kv_bytes: tuple[int, ...] = ()  # per stage: KV-cache bytes this request will hold there
    # the request's class and its targets (scenario ``classes``; None = no target)
    slo_class: str | None = None
    priority: int = 0  # higher is served first at the stages
    ttft_slo_s: float | None = None
    tpot_slo_s: float | None = None
    e2e_slo_s: float | None = None


@dataclasses.dataclass(frozen=True)
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


@dataclasses.dataclass(frozen=True)
class StageCompletion:
    """A stage finished some of a request's work (a prefill or decode step, or the whole request)."""

    node: str
    request_id: int
    predicted_work_s: float  # profile seconds the broker had charged for this work
    service_s: float  # compute time the stage server measured for it
    now_s: float
    finished: bool = False  # the request left this node (its cache was released)


# One finished step as a simulator reports it in batches (Ledger.progress_many, a scheduler's
# step_observer): (node, request_id, stage, predicted_work_s, service_s, now_s)
StepDone = tuple[str, int, int, float, float, float]


class Scheduler(abc.ABC):
    """The contract every scheduler implements (the broker and the simulators call it alike).

    A scheduler is a dataclass registered in ``SCHEDULERS``: its ``init`` fields are its
    parameters (recorded by :meth:`describe`); state it changes while running (counters, learned
    estimates, a seeded RNG) is an ordinary field with ``init=False, compare=False`` and a
    ``default_factory`` (or set in ``__post_init__``), so every instance has its own.

    Calls, all synchronous and on one thread, in the order events happen:

    - :meth:`route` at **admission**, once per request (again if a fault forces a re-route);
    - :meth:`on_complete` as **completion feedback**, after every prefill or decode step a
      stage finished, and once per node when the request **leaves** it (``finished=True``);
    - :meth:`on_node_change` when a **node goes down or comes back** (the snapshot shows ``up``
      as well; the hook is for schedulers that keep per-node state).

    Given the same parameters and the same sequence of calls, a scheduler returns the same
    routes (seeded randomness only): runs repeat, and the broker and the simulator agree.
    """

    name: ClassVar[str]
    # True: the stages order their batches by the request's priority and slack (the broker
    # sends both with every step); False: first come, first served at the stages
    orders_stage_queues: ClassVar[bool] = False

    @abc.abstractmethod
    def route(self, request: RequestView, snapshot: ClusterSnapshot) -> Route:
        """Called at admission. Return one node name per stage of ``snapshot.stages``, in stage
        order, each an *up* replica of its stage; raise :class:`NoRouteError` if a stage has
        none (use :func:`up_nodes`). Must not mutate ``request`` or ``snapshot``; no I/O."""

    def on_complete(self, event: StageCompletion) -> None:  # noqa: B027 - optional hook
        """Completion feedback: a stage finished a step of a request (``finished=False``) or the
        request left a node (``finished=True``, zero work). Default: nothing to learn. Must
        tolerate zero or odd service times and nodes it has never routed to."""

    def on_node_change(self, node: str, up: bool, now_s: float) -> None:  # noqa: B027 - optional
        """A node went down (``up=False``) or came back. Default: nothing (the next snapshot
        shows it)."""

    def describe(self) -> dict[str, object]:
        """Name and parameters, recorded with every result (an unregistered scheduler, e.g. a
        test's wrapper, is named by its class)."""
        params = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}  # type: ignore[arg-type]
        return {"name": getattr(self, "name", type(self).__name__), "params": params}


class PerStageScheduler(Scheduler):
    """Template for policies that pick each stage's replica independently of the others:
    :meth:`route` walks the stages and asks :meth:`choose` for each. A subclass overrides only
    :meth:`choose`."""

    def route(self, request: RequestView, snapshot: ClusterSnapshot) -> Route:
        return tuple(
            self.choose(s, up_nodes(stage, s), request, snapshot).name
            for s, stage in enumerate(snapshot.stages)
        )

    @abc.abstractmethod
    def choose(
        self,
        stage: int,
        live: tuple[NodeState, ...],
        request: RequestView,
        snapshot: ClusterSnapshot,
    ) -> NodeState:
        """Pick one of ``live`` (the up replicas of stage ``stage``, never empty, sorted by name)
        for ``request``; return that element."""


_by_name = operator.attrgetter("name")


def up_nodes(stage: tuple[NodeState, ...], stage_index: int) -> tuple[NodeState, ...]:
    """The replicas of a stage that are up, sorted by name, or NoRouteError naming the stage."""
    live = tuple(sorted((n for n in stage if n.up), key=_by_name))
    if not live:
        names = ", ".join(n.name for n in stage) or "(none)"
        raise NoRouteError(f"stage {stage_index}: no replica is up (replicas: {names})")
    return live


SCHEDULERS: Registry[Scheduler] = Registry("scheduler", "testbed.schedule")
