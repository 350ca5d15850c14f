"""The asyncio broker: admit each request at its trace time, route it, stream it through the stages.

For each request, in order:

1. **Admit** at its absolute time ``start + arrival_s`` (never chained sleeps): a timer sleep
   until ``admission_spin_s`` before the deadline, then yielding to the loop until it is
   reached (the event loop's timers are only as precise as epoll's millisecond). Admission is bounded (``max_active_requests``): when that many are
   unfinished the next one waits, and its injection lag shows it.
2. **Decide** (synchronously, no await between snapshot and charge): the cost model's
   :class:`~testbed.broker.layout.Prediction` gives the request's work on every replica, the
   :class:`~testbed.schedule.ledger.Ledger` the exact queue counts, queued work and KV headroom;
   the scenario's scheduler picks the route, and the ledger charges it.
3. **Act**: prefill through every stage of the route, then one decode step per further token
   (the KV caches stay on the route). The output length is forced to the trace's: the token
   the last stage returns is fed back whatever it is (EOS included). Every step's compute time
   (reported by the stage server), transfer and queueing become spans of the request's record;
   every step is fed to the scheduler as a :class:`StageCompletion` (ARTS learns capacity).
4. **Leave**: caches released on every node of the route, the ledger uncharged.

Per node, at most ``max_inflight_per_node`` calls are outstanding (the rest wait in the broker,
recorded as queueing): backpressure is explicit. A node that does not answer (timeout, refused,
reset) is marked down; the request resumes on a new route up to ``max_retries`` times, its
caches rebuilt there by one prefill of the prompt plus the tokens generated so far, else it
fails with the reason. Every ``probe_interval_s`` the nodes marked down are health-checked; one
that answers is re-admitted (``scheduler.on_node_change``). Every request ends completed or
failed with a reason; none is lost.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from testbed.broker.layout import Layout, Prediction, WorkPredictor
from testbed.broker.transport import (
    StageError,
    StageProtocolError,
    StageRejectedError,
    StageTransport,
    StageUnreachableError,
    StepKind,
    marks_node_down,
)
from testbed.errors import ConfigError
from testbed.metrics.records import RequestRecord, Span, totals_from_spans
from testbed.schedule.base import (
    NoRouteError,
    RequestView,
    Route,
    Scheduler,
    StageCompletion,
)
from testbed.schedule.ledger import InvalidRouteError, Ledger
from testbed.spec.classes import RequestClass, class_of
from testbed.workload.request import TraceRequest

log = logging.getLogger(__name__)

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


class _Failed(Exception):
    """Internal: the request ends as failed with ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class _Tracker:
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


PromptFn = Callable[[TraceRequest], Sequence[int]]


class Broker:
    """Replays requests through the stages; see the module docstring.

    ``async with Broker(...) as b: result = await b.run(requests)`` (or start()/aclose()).
    """

    def __init__(
        self,
        layout: Layout,
        predictor: WorkPredictor,
        scheduler: Scheduler,
        transport: StageTransport,
        prompt_ids: PromptFn,
        *,
        config: BrokerConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_record: Callable[[RequestRecord], None] | None = None,
        on_node_event: Callable[[NodeEvent], None] | None = None,
    ) -> None:
        self.layout = layout
        self.predictor = predictor
        self.scheduler = scheduler
        self.transport = transport
        self.prompt_ids = prompt_ids
        self.config = config or BrokerConfig()
        self.clock = clock
        self.on_record = on_record
        self.on_node_event = on_node_event
        self.ledger = Ledger(
            tuple(st.nodes for st in layout.stages),
            {n: info.kv_capacity_bytes for n, info in layout.nodes.items()},
        )
        self.run_tag = secrets.token_hex(3)  # stage-side request ids are unique per run
        self._t0 = 0.0
        self._node_slots = {
            n: asyncio.Semaphore(self.config.max_inflight_per_node) for n in layout.nodes
        }
        self._events: list[NodeEvent] = []
        self._records: dict[int, RequestRecord] = {}
        self._trackers: dict[int, _Tracker] = {}
        self._started = False
        self.clock_started = asyncio.Event()  # set when run() fixed the run clock's start

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the transport and probe every node; a node that does not answer is marked down
        (and a stage with no node up is an error)."""
        await self.transport.start()
        self._started = True
        names = self.layout.node_names()
        results: dict[str, bool] = {}

        async def probe(name: str) -> None:
            try:
                results[name] = await self.transport.health(
                    name, timeout_s=self.config.health_timeout_s
                )
            except (StageError, OSError, TimeoutError):
                results[name] = False

        async with asyncio.TaskGroup() as tg:
            for name in names:
                tg.create_task(probe(name))
        for name in names:
            if not results.get(name):
                self._node_down(name, "not healthy at start", at_s=0.0)
        for st in self.layout.stages:
            if not any(self.ledger.book(n).up for n in st.nodes):
                await self.aclose()
                raise StageError(
                    f"stage {st.index} ({st.tier}, blocks {st.start}..{st.end - 1}): no replica "
                    f"answers its health check ({', '.join(st.nodes)}); is the testbed up? "
                    "(`testbed status`)"
                )

    async def aclose(self) -> None:
        if self._started:
            self._started = False
            await self.transport.aclose()

    async def __aenter__(self) -> Broker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- the replay ----------------------------------------------------------------------------------
    def now_s(self) -> float:
        """The run clock: seconds since the replay started."""
        return self.clock() - self._t0

    async def run(
        self, requests: Sequence[TraceRequest], *, stop_after_s: float | None = None
    ) -> BrokerResult:
        """Replay ``requests`` (in arrival order) and return one record per admitted request.
        ``stop_after_s``: admit no request scheduled after this run time."""
        if not self._started:
            raise StageError("Broker.run() before start()")
        reqs = list(requests)
        ids = [r.request_id for r in reqs]
        if len(set(ids)) != len(ids):
            raise ConfigError("request ids must be unique")
        self._records.clear()
        admitted = [r for r in reqs if stop_after_s is None or r.arrival_s <= stop_after_s]
        slots = asyncio.Semaphore(self.config.max_active_requests)
        self._t0 = self.clock() + self.config.start_delay_s
        self.clock_started.set()
        prober = asyncio.create_task(self._probe_down_nodes(), name="probe-down-nodes")
        try:
            async with asyncio.timeout(
                (admitted[-1].arrival_s if admitted else 0.0)
                + self.config.start_delay_s
                + self.config.drain_timeout_s
            ):
                async with asyncio.TaskGroup() as tg:
                    for req in admitted:
                        await self._until(self._t0 + req.arrival_s)
                        tr = _Tracker(req, released_s=self.now_s())
                        self._trackers[req.request_id] = tr
                        await slots.acquire()
                        try:
                            route = self._decide(tr)
                        except _Failed as exc:
                            slots.release()
                            self._finish(tr, "failed", exc.reason)
                            continue
                        except BaseException:
                            slots.release()
                            raise
                        tg.create_task(
                            self._serve(tr, route, slots), name=f"request-{tr.req.request_id}"
                        )
        except TimeoutError:
            pass  # recorded below: every unfinished request fails with the drain timeout
        finally:
            prober.cancel()
            await asyncio.gather(prober, return_exceptions=True)
        wall = self.now_s()
        for rid, tr in self._trackers.items():
            if tr.state < RequestState.FINISHED:
                self.ledger.leave(rid)
                self._finish(tr, "failed", "not finished within the drain timeout")
        self._trackers.clear()
        records = tuple(self._records[r.request_id] for r in admitted)
        ends = [r.finished_s for r in records if r.finished_s is not None]
        return BrokerResult(
            records=records,
            wall_s=max(ends) if ends else wall,
            node_events=tuple(self._events),
            routed={n: b.routed_total for n, b in self.ledger.books.items()},
            scheduler=self.scheduler.describe(),
            not_admitted=len(reqs) - len(admitted),
        )

    async def _probe_down_nodes(self) -> None:
        """Every ``probe_interval_s``: a node marked down whose health check answers again is
        re-admitted (the ledger marks it up; the scheduler hears ``on_node_change``)."""
        while True:
            await asyncio.sleep(self.config.probe_interval_s)
            down = list(self.ledger.down_nodes())
            if not down:
                continue
            results = await asyncio.gather(
                *(self.transport.health(n, timeout_s=self.config.health_timeout_s) for n in down),
                return_exceptions=True,
            )
            for node, ok in zip(down, results, strict=True):
                if ok is True and not self.ledger.book(node).up:
                    reconnect = getattr(self.transport, "reconnect", None)
                    if reconnect is not None:  # a restarted server: new ports, no old sockets
                        await reconnect(node)
                    self.ledger.mark_up(node)
                    ev = NodeEvent(node, self.now_s(), True, "health check answers again")
                    self._events.append(ev)
                    log.warning("node %s re-admitted", node)
                    self.scheduler.on_node_change(node, True, ev.at_s)
                    if self.on_node_event is not None:
                        self.on_node_event(ev)

    async def _until(self, due: float) -> None:
        """Wait for the absolute clock time ``due``: sleep, then yield for the last stretch."""
        spin = self.config.admission_spin_s
        delay = due - self.clock()
        if delay > spin:
            await asyncio.sleep(delay - spin)
        while self.clock() < due:  # noqa: ASYNC110 - a deadline finer than the loop timers
            await asyncio.sleep(0)

    # -- decide ---------------------------------------------------------------------------------
    def _decide(self, tr: _Tracker) -> Route:
        """Snapshot -> scheduler -> charge. No await: the snapshot is exact when routed."""
        req = tr.req
        pred = self.predictor.predict(req.prompt_tokens, req.output_tokens)
        if tr.slo_class is None:
            tr.slo_class = class_of(req.request_id, self.config.classes, self.config.class_seed)
        cls = tr.slo_class
        view = RequestView(
            request_id=req.request_id,
            arrival_s=req.arrival_s,
            prompt_tokens=req.prompt_tokens,
            output_tokens=req.output_tokens,
            work_s=pred.work_s,
            kv_bytes=pred.kv_bytes,
            slo_class=None if cls is None else cls.name,
            priority=0 if cls is None else cls.priority,
            ttft_slo_s=None if cls is None else cls.slo.ttft_s,
            tpot_slo_s=None if cls is None else cls.slo.tpot_s,
            e2e_slo_s=None if cls is None else cls.slo.e2e_s,
        )
        snap = self.ledger.snapshot(self.now_s(), pred.hop_s)
        try:
            route = tuple(self.scheduler.route(view, snap))
        except NoRouteError as exc:
            raise _Failed(f"no route: {exc}") from None
        try:
            self.ledger.check_route(route)
        except InvalidRouteError as exc:
            raise _Failed(f"invalid route: {exc}") from None
        self.ledger.charge(req.request_id, route, [pred.work_s[n] for n in route], pred.kv_bytes)
        tr.route = route
        tr.state = RequestState.DISPATCHED
        return route

    # -- act ------------------------------------------------------------------------------------
    async def _serve(self, tr: _Tracker, route: Route, slots: asyncio.Semaphore) -> None:
        """One request's life: attempts until it completes, fails, or runs out of retries."""
        rid = tr.req.request_id
        try:
            while True:
                try:
                    await self._attempt(tr, route)
                    self._finish(tr, "completed")
                    return
                except StageError as exc:  # the type and code decide, never the text
                    node = exc.stage or "?"
                    reason = getattr(exc, "reason", None) or str(exc)
                    self.ledger.leave(rid)
                    if not marks_node_down(exc):
                        await self._release(tr, route)
                        if isinstance(exc, StageRejectedError):
                            reason = f"HTTP {exc.status} {exc.code}: {exc.reason}"
                        raise _Failed(f"node {node}: {reason}") from None
                    self._node_down(node, reason)
                    await self._release(tr, route, skip=node)
                    if tr.retries >= self.config.max_retries:
                        raise _Failed(
                            f"node {node} down ({reason}); gave up after {tr.retries} re-routes"
                        ) from None
                    tr.retries += 1  # resumed: the new route re-runs prompt + tokens so far
                    route = self._decide(tr)
        except _Failed as exc:
            self.ledger.leave(rid)
            self._finish(tr, "failed", exc.reason)
        except Exception as exc:  # a bug or an unexpected reply: the request fails, loudly
            log.exception("request %s failed unexpectedly", rid)
            self.ledger.leave(rid)
            self._finish(tr, "failed", f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self.ledger.leave(rid)
            slots.release()

    def _stage_id(self, tr: _Tracker) -> str:
        return f"{self.run_tag}-{tr.req.request_id}-{tr.retries}"

    async def _attempt(self, tr: _Tracker, route: Route) -> None:
        req = tr.req
        sid = self._stage_id(tr)
        pred = self.predictor.predict(req.prompt_tokens, req.output_tokens)
        prompt = list(self.prompt_ids(req))
        if len(prompt) != req.prompt_tokens:
            raise _Failed(f"prompt has {len(prompt)} tokens, the trace says {req.prompt_tokens}")
        if tr.sent_s is None:
            tr.sent_s = self.now_s()
        tr.state = RequestState.RUNNING
        # a resumed request rebuilds its caches on the new route: prefill of the prompt and
        # every token generated so far, then decoding goes on from there
        prefix = prompt + tr.tokens
        data: object = prefix
        pos = 0
        for step in range(len(tr.tokens), req.output_tokens):
            first = data is prefix
            kind: StepKind = "prefill" if first else "decode"
            for s in range(len(route)):
                data = await self._call(tr, pred, s, route, sid, kind, step, pos, data)
            token = _as_token(data, route[-1])
            tr.tokens.append(token)
            tr.token_times_s.append(self.now_s())
            pos += len(prefix) if first else 1
            data = [token]  # forced length: whatever the token, it is fed back
        self.ledger.leave(req.request_id)
        await self._release(tr, route)

    async def _call(
        self,
        tr: _Tracker,
        pred: Prediction,
        s: int,
        route: Route,
        sid: str,
        kind: StepKind,
        step: int,
        pos: int,
        data: object,
    ) -> object:
        node = route[s]
        rid = tr.req.request_id
        sender = route[s - 1] if s > 0 else CLIENT
        waited_from = self.now_s()
        async with self._node_slots[node]:
            t0 = self.now_s()
            if t0 - waited_from > 1e-6:
                tr.spans.append(Span("queue", node, waited_from, t0, rid, s, kind, step))
            if not self.ledger.book(node).up:
                down = self.ledger.book(node).down_reason or "marked down"
                raise StageUnreachableError(node, down)
            cls = tr.slo_class if self.scheduler.orders_stage_queues else None
            res = await self.transport.forward(
                node, sid, kind, pos, data, timeout_s=self.config.call_timeout_s,
                slo_class=None if tr.slo_class is None else tr.slo_class.name,
                priority=0 if cls is None else cls.priority,
                slack_s=None if cls is None else self._slack_s(tr, t0),
            )  # fmt: skip
            t1 = self.now_s()
        service = min(max(res.service_s, 0.0), t1 - t0)
        queued = min(max(res.queue_s, 0.0), t1 - t0 - service)
        c0 = t1 - service
        q0 = c0 - queued
        tr.spans.append(
            Span("transfer", sender, t0, q0, rid, s, kind, step, peer=node, nbytes=res.nbytes)
        )
        if queued > 0:
            tr.spans.append(Span("queue", node, q0, c0, rid, s, kind, step))
        tr.spans.append(Span("compute", node, c0, t1, rid, s, kind, step, batch=res.batch_size))
        predicted = pred.prefill_s[node] if kind == "prefill" else pred.decode_step_s[node]
        self.ledger.progress(rid, s, predicted)
        self.scheduler.on_complete(StageCompletion(node, rid, predicted, service, t1, False))
        return res.output

    @staticmethod
    def _slack_s(tr: _Tracker, now_s: float) -> float | None:
        """Seconds until the request's next token is due by its class's SLO (the first by the
        TTFT target, the next by the last one's time + TPOT, else the E2E deadline); None
        without targets. The stages batch least slack first among equal priorities."""
        cls = tr.slo_class
        if cls is None:
            return None
        slo, arrival = cls.slo, tr.req.arrival_s
        if not tr.token_times_s and slo.ttft_s is not None:
            return arrival + slo.ttft_s - now_s
        if tr.token_times_s and slo.tpot_s is not None:
            return tr.token_times_s[-1] + slo.tpot_s - now_s
        if slo.e2e_s is not None:
            return arrival + slo.e2e_s - now_s
        return None

    async def _release(self, tr: _Tracker, route: Route, skip: str | None = None) -> None:
        """Free the request's caches on its route (best effort, bounded; errors are logged) and
        tell the scheduler the request left those nodes."""
        sid = self._stage_id(tr)

        async def one(node: str) -> None:
            try:
                await self.transport.release(node, sid, timeout_s=self.config.release_timeout_s)
            except (StageError, OSError, TimeoutError) as exc:
                log.debug("release of %s on %s failed: %s", sid, node, exc)

        async with asyncio.TaskGroup() as tg:
            for n in route:
                if n != skip and self.ledger.book(n).up:
                    tg.create_task(one(n))
        now = self.now_s()
        for n in route:  # nothing new to learn (no work, no time): only "it left"
            self.scheduler.on_complete(StageCompletion(n, tr.req.request_id, 0.0, 0.0, now, True))

    # -- bookkeeping ----------------------------------------------------------------------------
    def _node_down(self, node: str, reason: str, at_s: float | None = None) -> None:
        if self.ledger.mark_down(node, reason):
            ev = NodeEvent(node, self.now_s() if at_s is None else at_s, False, reason)
            self._events.append(ev)
            log.warning("node %s marked down: %s", node, reason)
            self.scheduler.on_node_change(node, False, ev.at_s)
            if self.on_node_event is not None:
                self.on_node_event(ev)

    def _finish(self, tr: _Tracker, status: str, reason: str | None = None) -> None:
        if tr.state >= RequestState.FINISHED:
            return
        tr.state = RequestState.FINISHED if status == "completed" else RequestState.FAILED
        end = tr.token_times_s[-1] if status == "completed" and tr.token_times_s else self.now_s()
        rec = tr.record(status, end, reason)
        self._records[tr.req.request_id] = rec
        if self.on_record is not None:
            self.on_record(rec)


def _as_token(data: object, node: str) -> int:
    if isinstance(data, int) and not isinstance(data, bool):
        return data
    if isinstance(data, list | tuple) and len(data) == 1 and isinstance(data[0], int):
        return int(data[0])
    raise StageProtocolError(node, f"the last stage returned {type(data).__name__}, not a token id")
