"""The reference engine: the first event-per-step simulator, kept unchanged (frozen) so tests can
check that the optimised :mod:`testbed.sim.engine` gives exactly the same records. Slow: one
heap event per arrival, step end and token. Do not optimise this file; use ``Simulator``.

It is also the engine of scenarios with a ``timeline:`` (:mod:`testbed.sim.timeline`): an event
that changes a link or takes a node down invalidates the exact shortcuts of the optimised
engine (arrival and token times it settles ahead), so timelines run here, one event per step.

The event loop: requests through routes of stage servers and links, in simulated time.

Per request: admission (bounded by ``max_active_requests``, as the broker), then the broker's
decide step with the same objects (the :class:`WorkPredictor`'s prediction, the shared
:class:`Ledger`'s snapshot, ``scheduler.route``, ``Ledger.check_route``, ``Ledger.charge``),
then the prefill through every stage of the route and one decode step per further output token.
Between stages the hidden states cross the hop's links (forward pipes); after the last stage
the sampled token goes back along the chain (reverse pipes), as the broker relays it. Every
step is charged off the ledger and fed to the scheduler as a :class:`StageCompletion` (ARTS
learns from simulated service times); leaving releases the KV caches and the ledger.

Each node behaves as the stage server: FIFO, ``slots`` steps computed at once (the server's
``max_inflight``), and a KV-cache capacity (node memory minus its weights, as the broker's
layout computes): a request's first step on a node reserves its whole KV cache there (prompt +
output tokens); if it does not fit the step waits, FIFO, until a request leaving frees enough.
A request whose cache can never fit the node fails, as the stage server refuses it.

Events at the same instant run step ends first, then arrivals at nodes, then tokens, then
admissions; ties keep insertion order, so runs are deterministic for a seed.

Request classes as in the optimised engine (:mod:`testbed.sim.classes`): the class's targets
in the scheduler's view, and the stage order (priority, least slack) for ``slo``.

A plan's parts (layout, predictor, step times, links, ledger) form a :class:`Generation`; a run
has one, unless adaptive re-partitioning (:mod:`testbed.sim.migrate`) switches to a new plan:
each request keeps the generation it was admitted on (its steps, ledger and hops), new
admissions take the current one, and the nodes (their queues and KV caches) are shared.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from testbed.broker.layout import Layout, Prediction, WorkPredictor
from testbed.broker.slo import request_view
from testbed.metrics.records import RequestRecord, Span
from testbed.schedule.base import NoRouteError, Scheduler, StageCompletion
from testbed.schedule.ledger import InvalidRouteError, Ledger
from testbed.sim.classes import batch_limits, pop_next, request_class
from testbed.sim.engine import SimConfig, SimOutcome
from testbed.sim.links import Network
from testbed.sim.steps import StepTimes
from testbed.spec.classes import RequestClass
from testbed.workload.request import TraceRequest

CLIENT = "client"
_DONE, _ARRIVE, _TOKEN, _ADMIT, _EXTERNAL = 0, 1, 2, 3, 4


@dataclass(eq=False)
class Generation:
    """One plan's parts; requests admitted while it is current run on it to the end."""

    index: int  # 0: the run's first plan
    layout: Layout
    predictor: WorkPredictor
    steps: StepTimes
    net: Network
    ledger: Ledger
    dec: list[dict[int, float]] = field(default_factory=list)  # steps.decode_tables()
    gid: dict[str, int] = field(default_factory=dict)  # node -> its StepTimes group
    active: int = 0  # requests on it, not finished

    def __post_init__(self) -> None:
        self.dec = self.steps.decode_tables()
        self.gid = {n: self.steps.group(n) for n in self.layout.nodes}


@dataclass
class _Node:
    name: str
    stage: int
    kv_cap: int
    slowdown: float
    busy: int = 0
    busy_s: float = 0.0
    kv_used: int = 0
    fifo: deque[tuple[_Req, int]] = field(default_factory=deque)
    kv_wait: deque[tuple[_Req, int]] = field(default_factory=deque)


@dataclass(eq=False)
class _Req:
    req: TraceRequest
    pred: Prediction
    gen: Generation | None = None  # the plan it runs on (set when admitted)
    route: tuple[str, ...] = ()
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
    cls: RequestClass | None = None  # its request class (scenario ``classes``)
    nodes: list[_Node] = field(default_factory=list)  # the route's servers
    work_pre: list[float] = field(default_factory=list)  # per stage: predicted prefill work
    work_dec: list[float] = field(default_factory=list)  # per stage: predicted decode step
    compute: list[float] = field(default_factory=list)  # per stage: compute seconds
    hops: list[float] = field(default_factory=list)  # per hop into stage s (len(route): back)


class ReferenceSimulator:
    """The unoptimised simulator (same constructor and ``run`` as :class:`Simulator`); ``run(requests)`` returns the records the broker would write."""

    def __init__(
        self,
        layout: Layout,
        predictor: WorkPredictor,
        scheduler: Scheduler,
        steps: StepTimes,
        network: Network,
        config: SimConfig | None = None,
        on_record: Callable[[RequestRecord], None] | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.config = config or SimConfig()
        self.on_record = on_record
        ledger = Ledger(
            tuple(st.nodes for st in layout.stages),
            {n: info.kv_capacity_bytes for n, info in layout.nodes.items()},
        )
        self.gens: list[Generation] = []  # every plan of the run, in order
        self.use(Generation(0, layout, predictor, steps, network, ledger))
        # called when a request leaves a generation that is no longer current and it empties
        self.on_drained: Callable[[Generation, float], None] | None = None
        self.nodes = {
            n: _Node(n, info.stage, info.kv_capacity_bytes, float(self.config.slowdown.get(n, 1.0)))
            for n, info in layout.nodes.items()
        }
        self.act_bytes = predictor.cost.profile.activation_bytes_per_token()
        self._heap: list[tuple[float, int, int, Any, int]] = []
        self._seq = 0
        self._records: dict[int, RequestRecord] = {}
        self._active = 0
        self._waiting: deque[TraceRequest] = deque()
        self.events = 0
        if any(v != 1 for v in batch_limits(self.config, layout.nodes).values()):
            raise ValueError("the reference engine has no batching (max_batch must be 1)")
        self._ordered = scheduler.orders_stage_queues  # stage queues by (priority, slack)
        self._spans = self.config.record_spans
        # a scheduler that keeps the base class's no-op hook is not fed step completions
        self._learns = type(scheduler).on_complete is not Scheduler.on_complete

    def use(self, gen: Generation) -> None:
        """Make ``gen`` current: requests admitted from now on run on it."""
        if gen not in self.gens:
            self.gens.append(gen)
        self.gen = gen
        self.layout, self.predictor, self.steps = gen.layout, gen.predictor, gen.steps
        self.net, self.ledger = gen.net, gen.ledger

    def bind(self, r: _Req, now: float) -> None:
        """Put ``r`` on the current generation (admitted, or re-routed after a crash)."""
        old = r.gen
        r.gen = self.gen
        self.gen.active += 1
        if old is not None:
            self._left(old, now)

    def _left(self, gen: Generation, now: float) -> None:
        gen.active -= 1
        if gen.active == 0 and gen is not self.gen and self.on_drained is not None:
            self.on_drained(gen, now)

    # -- the loop -------------------------------------------------------------------------------
    def at(self, t: float, fn: Callable[[ReferenceSimulator, float], None]) -> None:
        """Call ``fn(self, now)`` at simulated time ``t`` (after the requests' events of that
        instant): the hook scenario timelines use (:mod:`testbed.sim.timeline`)."""
        self._push(t, _EXTERNAL, fn)

    def _push(self, t: float, kind: int, obj: Any, s: int = 0) -> None:
        heapq.heappush(self._heap, (t, kind, self._seq, obj, s))
        self._seq += 1

    def run(
        self, requests: Sequence[TraceRequest], *, stop_after_s: float | None = None
    ) -> SimOutcome:
        admitted = [r for r in requests if stop_after_s is None or r.arrival_s <= stop_after_s]
        for r in admitted:
            self._push(r.arrival_s, _ADMIT, r)
        now = 0.0
        heap, pop = self._heap, heapq.heappop
        while heap:
            now, kind, _, obj, s = pop(heap)
            self.events += 1
            if kind == _DONE:
                self._done(obj, s, now)
            elif kind == _ARRIVE:
                self._arrive(obj, s, now)
            elif kind == _TOKEN:
                self._token(obj, now)
            elif kind == _ADMIT:
                self._admit(obj, now)
            else:
                obj(self, now)  # an external event (testbed.sim.timeline): it acts on the state
        first = self.gens[0]  # links named by the first plan's hops (pipes are shared)
        links = {
            f"hop{h}.{d}[{k}]": p.busy_s
            for h in range(len(first.net.fwd))
            for d, pipes in (("fwd", first.net.fwd[h]), ("rev", first.net.rev[h]))
            for k, p in enumerate(pipes)
        }
        names = list(dict.fromkeys(n for g in self.gens for n in g.layout.node_names()))
        routed: dict[str, int] = {}
        for g in self.gens:
            for n, b in g.ledger.books.items():
                routed[n] = routed.get(n, 0) + b.routed_total
        return SimOutcome(
            records=tuple(self._records[r.request_id] for r in admitted),
            node_busy_s={n: self.nodes[n].busy_s for n in names},
            link_busy_s=links,
            routed=routed,
            scheduler=self.scheduler.describe(),
            events=self.events,
            sim_end_s=now,
        )

    # -- decide ---------------------------------------------------------------------------------
    def _admit(self, req: TraceRequest, now: float) -> None:
        if self._active >= self.config.max_active_requests:
            self._waiting.append(req)
            return
        self._active += 1
        pred = self.predictor.predict(req.prompt_tokens, req.output_tokens)
        cls = request_class(req.request_id, self.config)
        r = _Req(req, pred, held=[False] * len(self.layout.stages), admitted_s=now, cls=cls)
        self.bind(r, now)
        view = request_view(req, pred, cls)
        try:
            route = tuple(self.scheduler.route(view, self.ledger.snapshot(now, pred.hop_s)))
            self.ledger.check_route(route)
        except (NoRouteError, InvalidRouteError) as exc:
            self._finish(r, now, f"no route: {exc}")
            return
        self.ledger.charge(req.request_id, route, [pred.work_s[n] for n in route], pred.kv_bytes)
        r.route = route
        r.nodes = [self.nodes[n] for n in route]
        r.work_pre = [pred.prefill_s[n] for n in route]
        r.work_dec = [pred.decode_step_s[n] for n in route]
        r.compute = [0.0] * len(route)
        r.hops = [0.0] * (len(route) + 1)
        self._first_hop(r, now)

    def _first_hop(self, r: _Req, now: float) -> None:
        """Client -> stage 0: no shaped link, only the per-call overhead (if calibrated)."""
        r.sent_s = now
        if self.net.overhead_s > 0:
            self._push(now + self.net.overhead_s, _ARRIVE, r, 0)
        else:
            self._arrive(r, 0, now)

    # -- act ------------------------------------------------------------------------------------
    def _arrive(self, r: _Req, s: int, now: float) -> None:
        node = r.nodes[s]
        if now > r.sent_s:
            r.hops[s] += now - r.sent_s
            if self._spans:
                sender = r.route[s - 1] if s > 0 else CLIENT
                self._span(r, "transfer", sender, r.sent_s, now, s, node.name)
        r.ready_s = now
        if not r.held[s]:
            need = r.pred.kv_bytes[s]
            if need > node.kv_cap:
                self._finish(
                    r, now,
                    f"node {node.name}: KV cache full (needs {need} B, holds {node.kv_cap} B)",
                )  # fmt: skip
                return
            if node.kv_used + need > node.kv_cap or node.kv_wait:
                node.kv_wait.append((r, s))
                return
            node.kv_used += need
            r.held[s] = True
        self._enqueue(node, r, s, now)

    def _enqueue(self, node: _Node, r: _Req, s: int, now: float) -> None:
        if node.busy < self.config.slots:
            self._start(node, r, s, now)
        else:
            node.fifo.append((r, s))

    def _start(self, node: _Node, r: _Req, s: int, now: float) -> None:
        node.busy += 1
        if now > r.ready_s:
            r.queue_s += now - r.ready_s
            if self._spans:
                self._span(r, "queue", node.name, r.ready_s, now, s)
        p = r.req.prompt_tokens
        g = r.gen
        assert g is not None
        if r.step == 0:
            base = g.steps.prefill_s(node.name, p)
        else:
            base = g.dec[g.gid[node.name]].get(p + r.step - 1) or g.steps.decode_s(
                node.name, p + r.step - 1
            )
        r.service_s = base * node.slowdown
        r.start_s = now
        self._push(now + r.service_s, _DONE, r, s)

    def _done(self, r: _Req, s: int, now: float) -> None:
        node = r.nodes[s]
        node.busy -= 1
        node.busy_s += r.service_s
        r.compute[s] += r.service_s
        if self._spans:
            self._span(r, "compute", node.name, r.start_s, now, s)
        predicted = r.work_pre[s] if r.step == 0 else r.work_dec[s]
        rid = r.req.request_id
        g = r.gen
        assert g is not None
        g.ledger.progress(rid, s, predicted)
        if self._learns:
            self.scheduler.on_complete(
                StageCompletion(node.name, rid, predicted, r.service_s, now, False)
            )
        if node.fifo:
            nr, ns = pop_next(node.fifo, now) if self._ordered else node.fifo.popleft()
            self._start(node, nr, ns, now)
        r.sent_s = now
        if s + 1 < len(r.route):
            nbytes = self.act_bytes * (r.req.prompt_tokens if r.step == 0 else 1)
            self._push(g.net.forward(s, now, nbytes), _ARRIVE, r, s + 1)
        else:
            self._push(g.net.back(now, self.config.token_bytes), _TOKEN, r)

    def _token(self, r: _Req, now: float) -> None:
        if now > r.sent_s:
            r.hops[-1] += now - r.sent_s
            if self._spans:
                self._span(r, "transfer", r.route[-1], r.sent_s, now, len(r.route), CLIENT)
        r.tokens.append(now)
        r.step += 1
        if r.step < r.req.output_tokens:
            self._first_hop(r, now)
        else:
            self._finish(r, now, None)

    def _finish(self, r: _Req, now: float, reason: str | None) -> None:
        rid = r.req.request_id
        if r.route and r.gen is not None:
            r.gen.ledger.leave(rid)
            for s, name in enumerate(r.route):
                node = self.nodes[name]
                if r.held[s]:
                    node.kv_used -= r.pred.kv_bytes[s]
                    r.held[s] = False
                self.scheduler.on_complete(StageCompletion(name, rid, 0.0, 0.0, now, True))
                self._wake_kv(node, now)
        req = r.req
        self._records[rid] = RequestRecord(
            request_id=rid,
            arrival_s=req.arrival_s,
            status="completed" if reason is None else "failed",
            prompt_tokens=req.prompt_tokens,
            output_tokens=req.output_tokens,
            route=r.route,
            slo_class=None if r.cls is None else r.cls.name,
            reason=reason,
            token_times_s=tuple(r.tokens) if reason is None else (),
            end_s=now,
            injection_lag_s=None if r.admitted_s is None else r.admitted_s - req.arrival_s,
            queueing_s=r.queue_s,
            stage_compute_s=_per_node(r.route, r.compute),
            hop_transfer_s=_per_hop(r.route, r.hops),
            spans=tuple(r.spans),
        )
        if self.on_record is not None:
            self.on_record(self._records[rid])
        self._active -= 1
        if r.gen is not None:
            self._left(r.gen, now)
        if self._waiting:
            self._admit(self._waiting.popleft(), now)

    def _wake_kv(self, node: _Node, now: float) -> None:
        while node.kv_wait:
            r, s = node.kv_wait[0]
            need = r.pred.kv_bytes[s]
            if node.kv_used + need > node.kv_cap:
                return
            node.kv_wait.popleft()
            node.kv_used += need
            r.held[s] = True
            self._enqueue(node, r, s, now)

    def _span(
        self, r: _Req, kind: str, node: str, t0: float, t1: float, s: int, peer: str | None = None
    ) -> None:
        phase = "prefill" if r.step == 0 else "decode"
        nbytes = None
        if kind == "transfer":
            nbytes = (
                self.config.token_bytes
                if peer == CLIENT or node == CLIENT
                else self.act_bytes * (r.req.prompt_tokens if r.step == 0 else 1)
            )
        r.spans.append(
            Span(kind, node, t0, t1, r.req.request_id, s, phase, r.step, peer, nbytes)  # type: ignore[arg-type]
        )


def _per_node(route: tuple[str, ...], values: list[float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, v in zip(route, values, strict=False):
        out[name] = out.get(name, 0.0) + v
    return out


def _per_hop(route: tuple[str, ...], values: list[float]) -> dict[str, float]:
    names = (CLIENT, *route, CLIENT)
    return {f"{names[s]}->{names[s + 1]}": v for s, v in enumerate(values) if v > 0}
