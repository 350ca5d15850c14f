"""The simulator's data: settings, outcome, and the mutable state of nodes and requests."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from testbed.broker.layout import Prediction
from testbed.metrics.records import RequestRecord, Span
from testbed.spec.classes import RequestClass
from testbed.workload.request import TraceRequest

CLIENT = "client"
_DONE, _ARRIVE, _TOKEN, _ADMIT = 0, 1, 2, 3
_INF = float("inf")


@dataclass(frozen=True)
class SimConfig:
    slots: int = 1  # steps a node computes at once (the stage server's max_inflight)
    max_active_requests: int = 1024  # admitted and unfinished (the broker's); more wait
    token_bytes: int = 4  # the sampled token id sent back along the chain
    record_spans: bool = True  # per-step spans (Perfetto trace, utilisation); off: faster
    slowdown: Mapping[str, float] = field(default_factory=dict)  # node -> true time multiplier
    # continuous batching: a node computes up to max_batch waiting steps (prefills and decode
    # steps of different requests) as one forward, timed by StepTimes.batch_s; 1 = one step at
    # a time. max_batch: every node's (None: 1), unless node_max_batch names the node
    max_batch: int | None = None
    node_max_batch: Mapping[str, int] = field(default_factory=dict)  # node -> its own
    # request classes (scenario ``classes``), drawn per request with class_seed as the broker
    # draws them (testbed.spec.classes.class_of); () = no classes
    classes: tuple[RequestClass, ...] = ()
    class_seed: int = 0


@dataclass(frozen=True)
class SimOutcome:
    records: tuple[RequestRecord, ...]  # request order
    node_busy_s: dict[str, float]
    link_busy_s: dict[str, float]  # "hop0.fwd[0]" -> occupancy seconds
    routed: dict[str, int]
    scheduler: dict[str, Any]
    events: int  # events processed (for speed figures)
    sim_end_s: float


@dataclass(slots=True)
class _Node:
    name: str
    stage: int
    kv_cap: int
    slowdown: float
    max_batch: int = 1  # steps it computes as one forward (1: one at a time)
    # step times on this node, slowdown applied (caches): prompt -> prefill, context -> decode
    pre_s: dict[int, float] = field(default_factory=dict)
    dec_s: dict[int, float] = field(default_factory=dict)
    busy: int = 0
    busy_s: float = 0.0
    kv_used: int = 0
    pending: int = 0  # ARRIVE events queued for this node and not yet processed
    fifo: deque[tuple[_Req, int]] = field(default_factory=deque)
    kv_wait: deque[tuple[_Req, int]] = field(default_factory=deque)


@dataclass(eq=False, slots=True)
class _Req:
    req: TraceRequest
    pred: Prediction
    rid: int = 0  # req.request_id
    prompt: int = 0  # req.prompt_tokens
    out: int = 0  # req.output_tokens
    route: tuple[str, ...] = ()
    last: int = 0  # len(route) - 1
    doomed: bool = False  # its KV cache cannot fit some node of its route
    cls: RequestClass | None = None  # its request class (scenario ``classes``)
    step: int = 0  # 0 = prefill, k = k-th decode step
    ready_s: float = 0.0  # when the current step reached the current node
    start_s: float = 0.0  # when its compute started
    service_s: float = 0.0
    sent_s: float = 0.0  # when the current transfer started
    held: list[bool] = field(default_factory=list)  # per stage: KV reserved
    tokens: list[float] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    queue_s: float = 0.0
    admitted_s: float | None = None  # when admission let it in (later than arrival if full)
    nodes: list[_Node] = field(default_factory=list)  # the route's servers
    work_pre: list[float] = field(default_factory=list)  # per stage: predicted prefill work
    work_dec: list[float] = field(default_factory=list)  # per stage: predicted decode step
    compute: list[float] = field(default_factory=list)  # per stage: compute seconds
    hops: list[float] = field(default_factory=list)  # per hop into stage s (len(route): back)


def per_node(route: tuple[str, ...], values: list[float]) -> dict[str, float]:
    """Summed values per node of ``route`` (a node may serve two stages)."""
    out: dict[str, float] = {}
    for name, v in zip(route, values, strict=False):
        out[name] = out.get(name, 0.0) + v
    return out


def per_hop(route: tuple[str, ...], values: list[float]) -> dict[str, float]:
    """Values per hop "a->b" (client -> first stage .. last stage -> client), zeros left out."""
    names = (CLIENT, *route, CLIENT)
    return {f"{names[s]}->{names[s + 1]}": v for s, v in enumerate(values) if v > 0}
