"""The broker's data: its settings, its result, and what it records about each request."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Literal

from testbed.errors import ConfigError
from testbed.metrics.records import RequestRecord, Span, totals_from_spans
from testbed.schedule.base import Route
from testbed.spec.classes import RequestClass
from testbed.workload.request import TraceRequest

CLIENT = "client"  # the sender of the hop into the first stage, in spans


class RequestState(enum.IntEnum):
    """A request's lifecycle, in order (FINISHED and FAILED are both terminal)."""

    QUEUED = 0  # released by the arrival clock, waiting for an admission slot
    DISPATCHED = 1  # routed; charged on its route
    RUNNING = 2  # its first step was sent
    FINISHED = 3
    FAILED = 4


@dataclass(frozen=True)
class BrokerConfig:
    call_timeout_s: float = 30.0  # one stage step (send, queue, compute, reply)
    health_timeout_s: float = 5.0  # health probe at start
    release_timeout_s: float = 5.0  # cache release at the end of a request
    max_inflight_per_node: int = 16  # outstanding calls per node; more wait in the broker
    max_active_requests: int = 1024  # admitted and unfinished; more wait at admission
    max_retries: int = 2  # re-routes after a node stopped answering
    start_delay_s: float = 0.05  # the replay clock starts this long after run() is called
    drain_timeout_s: float = 600.0  # after the last admission, wait at most this for the rest
    admission_spin_s: float = 0.0015  # last stretch before an arrival: yield, don't sleep
    classes: tuple[RequestClass, ...] = ()  # request classes (scenario ``classes``)
    class_seed: int = 0  # seeds each request's class draw (testbed.spec.classes.class_of)
    probe_interval_s: float = 1.0  # how often a node marked down is probed for re-admission
    # relay: the broker sends every hop (stage -> broker -> next stage); forward: a step goes
    # to the route's first stage and the stages pass it on (testbed.broker.chain)
    transport: Literal["relay", "forward"] = "relay"

    def __post_init__(self) -> None:
        for name in (
            "call_timeout_s",
            "health_timeout_s",
            "release_timeout_s",
            "drain_timeout_s",
            "probe_interval_s",
        ):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}", field=name)
        if self.max_inflight_per_node < 1 or self.max_active_requests < 1:
            raise ConfigError("max_inflight_per_node and max_active_requests must be >= 1")
        if self.transport not in ("relay", "forward"):
            raise ConfigError(
                f"transport {self.transport!r} is not one of relay, forward", field="transport"
            )
        if self.max_retries < 0:
            raise ConfigError(f"max_retries must be >= 0, got {self.max_retries}")


@dataclass(frozen=True)
class NodeEvent:
    """A node went down (or came back), on the run clock."""

    node: str
    at_s: float
    up: bool
    reason: str


@dataclass(frozen=True)
class BrokerResult:
    records: tuple[RequestRecord, ...]  # one per request, in request order
    wall_s: float  # replay clock start -> last request finished
    node_events: tuple[NodeEvent, ...]
    routed: dict[str, int]  # node -> requests routed there (retries included)
    scheduler: dict[str, Any]
    not_admitted: int  # requests left out by stop_after_s


@dataclass
class Tracker:
    """Everything recorded about one request while it runs."""

    req: TraceRequest
    released_s: float  # run clock when the arrival clock handed it over
    state: RequestState = RequestState.QUEUED
    sent_s: float | None = None  # first send (first attempt)
    route: Route = ()
    retries: int = 0
    tokens: list[int] = field(default_factory=list)  # generated so far (kept across re-routes)
    token_times_s: list[float] = field(default_factory=list)
    spans: list[Span] = field(default_factory=list)
    slo_class: RequestClass | None = None
    gen: Any = None  # the plan it runs on (a testbed.broker.generation.Generation)

    def record(self, status: str, end_s: float, reason: str | None = None) -> RequestRecord:
        compute, hops, queue = totals_from_spans(self.spans)
        lag = None if self.sent_s is None else max(0.0, self.sent_s - self.req.arrival_s)
        return RequestRecord(
            request_id=self.req.request_id,
            arrival_s=self.req.arrival_s,
            status=status,  # type: ignore[arg-type]
            prompt_tokens=self.req.prompt_tokens,
            output_tokens=self.req.output_tokens,
            route=self.route,
            reason=reason,
            token_times_s=tuple(self.token_times_s) if status == "completed" else (),
            end_s=end_s,
            injection_lag_s=lag,
            queueing_s=queue,
            stage_compute_s=compute,
            hop_transfer_s=hops,
            retries=self.retries,
            spans=tuple(self.spans),
            slo_class=None if self.slo_class is None else self.slo_class.name,
        )
