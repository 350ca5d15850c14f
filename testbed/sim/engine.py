"""The event loop: requests through routes of stage servers and links, in simulated time.

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
A request whose cache can never fit the node fails, as the stage server refuses it. Records,
spans and the outcome are written as the broker writes them (:mod:`testbed.sim.records`).

With ``max_batch`` > 1 (continuous batching, per node) a node that starts computing takes the
waiting steps that have arrived, up to its ``max_batch``, as one forward timed by
``StepTimes.batch_s``. Requests carry their class (``SimConfig.classes``); when the scheduler
orders the stage queues (``slo``) a node takes the waiting steps by (priority, least slack)
instead of FIFO (:mod:`testbed.sim.classes`), and arrivals are processed at their time.

Events at the same instant run step ends first, then arrivals at nodes, then tokens, then
admissions; ties keep insertion order, so runs are deterministic for a seed.

Exact shortcuts (the records equal :mod:`testbed.sim.reference`'s, the first event-per-step
engine, kept to test this: tests/unit/test_sim_exact.py):

- Admissions are merged from the arrivals sorted by time, not pushed as heap events.
- Step completions reach the ledger (``progress_many``) and the scheduler (ARTS's
  ``step_observer``, else ``on_complete``) in one batch of ``StepDone`` tuples, in their
  original order, just before the next decision or leave - the only moments either is read.
- Arrival after a forward hop: every arrival at a node of stage s >= 1 comes through the hop's
  FIFO pipes, which deliver in send order, so when the node has no arrival event pending and
  the step's KV fits now (which stays true since only releases can come first), the arrival
  is processed when it is sent: FIFO position, start time (``max(arrival, node free)``) and
  reservation are what they would be at its time. With requests waiting for KV room there,
  only for a step that holds its cache and when no request can finish before it arrives.
- A token that is not the request's last: its return and the next step's arrival at the first
  stage are processed when it is sent, under the same conditions plus: no admission before it,
  and no finish before it that could admit a waiting request (see ``_send_token``).
- ARTS decides from the ledger's per-stage numpy arrays (``Arts.route_ledger``) over many
  replicas instead of a snapshot and a loop; step-time tables per (stage, device, length),
  and per node with its slowdown applied (the same product).

The loop itself is :func:`testbed.sim.fastpath.run_events`: these methods' hot paths written
out, the rest called. The two early-processing shortcuts are off with ordered stage queues.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from testbed.broker.layout import Layout, WorkPredictor
from testbed.broker.slo import request_view
from testbed.metrics.records import RequestRecord
from testbed.schedule.base import NoRouteError, Scheduler, StageCompletion, StepDone
from testbed.schedule.ledger import InvalidRouteError, Ledger
from testbed.sim.batching import start_batch
from testbed.sim.classes import batch_limits, request_class
from testbed.sim.fastpath import run_events, step_s
from testbed.sim.links import Network
from testbed.sim.records import outcome, request_record, step_span
from testbed.sim.state import (
    _ARRIVE,
    _DONE,
    _INF,
    _TOKEN,
    CLIENT,
    SimConfig,
    SimOutcome,
    _Node,
    _Req,
)
from testbed.sim.steps import StepTimes
from testbed.workload.request import TraceRequest

__all__ = ["CLIENT", "SimConfig", "SimOutcome", "Simulator"]


class Simulator:
    """One simulated replay; ``run(requests)`` returns the records the broker would write."""

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
        self.layout, self.predictor, self.scheduler = layout, predictor, scheduler
        self.steps, self.net = steps, network
        self.config = config or SimConfig()
        self.on_record = on_record
        self.ledger = Ledger(
            tuple(st.nodes for st in layout.stages),
            {n: info.kv_capacity_bytes for n, info in layout.nodes.items()},
        )
        limits = batch_limits(self.config, layout.nodes)  # per node (testbed.spec.batching)
        slow = self.config.slowdown
        self.nodes = {
            n: _Node(n, info.stage, info.kv_capacity_bytes, float(slow.get(n, 1.0)), limits[n])
            for n, info in layout.nodes.items()
        }
        self.act_bytes = predictor.cost.profile.activation_bytes_per_token()
        self._heap: list[tuple[float, int, int, Any, int]] = []
        self._next = itertools.count().__next__  # event sequence numbers (ties: push order)
        self._records: dict[int, RequestRecord] = {}
        self._active = 0
        self._waiting: deque[TraceRequest] = deque()
        self.events = 0
        # stages batch by (priority, least slack) for this scheduler (testbed.sim.classes);
        # then arrivals are processed at their time (the FIFO shortcuts below do not apply)
        self._ordered = scheduler.orders_stage_queues
        self.batches = self.batched_steps = 0  # batched forwards started, steps in them
        self._next_admit_s = _INF  # arrival time of the next admission not yet processed
        # times of the last-token events pending, in order (their finish releases KV room and
        # may admit a waiting request); the reverse pipes are FIFO, so the times never decrease
        self._finals: deque[float] = deque()
        self._doomed = 0  # requests in flight whose KV cache cannot fit a node of their route
        # the shortest trip of a token back to the first stage (propagation delays)
        self._back_delay_s = sum(p.delay_s for hop in network.rev for p in hop)
        self._spans = self.config.record_spans
        # a scheduler that keeps the base class's no-op hook is not fed step completions
        self._learns = type(scheduler).on_complete is not Scheduler.on_complete
        # exact fast hooks of schedulers that offer them (ARTS): a decision from the ledger's
        # arrays, and a step's completion without building the StageCompletion
        self._route_ledger = getattr(scheduler, "route_ledger", None)
        observer = getattr(scheduler, "step_observer", None)
        self._observe_many = observer() if observer is not None else None
        self._done: list[StepDone] = []  # steps finished since the last _flush, in order

    # -- the loop -------------------------------------------------------------------------------
    def _push(self, t: float, kind: int, obj: Any, s: int = 0) -> None:
        heapq.heappush(self._heap, (t, kind, self._next(), obj, s))

    def run(
        self, requests: Sequence[TraceRequest], *, stop_after_s: float | None = None
    ) -> SimOutcome:
        admitted = [r for r in requests if stop_after_s is None or r.arrival_s <= stop_after_s]
        # Admissions are not heap events: a stable sort by arrival time gives the order the heap
        # gave them (they were pushed first, so they had the lowest sequence numbers), and at an
        # equal time every other kind of event goes first, as before. The heap stays small.
        arrivals = sorted(admitted, key=lambda q: q.arrival_s)
        now = run_events(self, arrivals)
        self._flush()
        return outcome(
            admitted, self._records, self.nodes, self.layout.node_names(), self.net,
            {n: b.routed_total for n, b in self.ledger.books.items()},
            self.scheduler.describe(), self.events, now,
        )  # fmt: skip

    def _flush(self) -> None:
        """Apply the step completions since the last decision, in the order they happened: the
        ledger's progress, then the scheduler's feedback (the two are independent objects, and
        each sees the calls in the original order, before anything reads them)."""
        done = self._done
        if not done:
            return
        self.ledger.progress_many(done)
        if self._learns:
            if self._observe_many is not None:
                self._observe_many(done)
            else:
                on_complete = self.scheduler.on_complete
                for name, rid, _, predicted, svc, t in done:
                    on_complete(StageCompletion(name, rid, predicted, svc, t, False))
        done.clear()

    # -- decide ---------------------------------------------------------------------------------
    def _admit(self, req: TraceRequest, now: float) -> None:
        if self._active >= self.config.max_active_requests:
            self._waiting.append(req)
            return
        self._active += 1
        self._flush()
        pred = self.predictor.predict(req.prompt_tokens, req.output_tokens)
        cls = request_class(req.request_id, self.config)
        r = _Req(
            req, pred, rid=req.request_id, prompt=req.prompt_tokens, out=req.output_tokens,
            held=[False] * len(self.layout.stages), admitted_s=now, cls=cls,
        )  # fmt: skip
        view = request_view(req, pred, cls)
        try:
            if self._route_ledger is not None:
                route = tuple(self._route_ledger(view, self.ledger, now, pred.hop_s))
            else:
                route = tuple(self.scheduler.route(view, self.ledger.snapshot(now, pred.hop_s)))
            self.ledger.check_route(route)
        except (NoRouteError, InvalidRouteError) as exc:
            self._finish(r, now, f"no route: {exc}")
            return
        self.ledger.charge(req.request_id, route, [pred.work_s[n] for n in route], pred.kv_bytes)
        r.route = route
        r.last = len(route) - 1
        if any(k > self.nodes[n].kv_cap for n, k in zip(route, pred.kv_bytes, strict=False)):
            r.doomed = True  # it will fail where it does not fit (a finish: see _send_token)
            self._doomed += 1
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
            r.nodes[0].pending += 1
            self._push(now + self.net.overhead_s, _ARRIVE, r, 0)
        else:
            self._arrive(r, 0, now)

    # -- act ------------------------------------------------------------------------------------
    def _arrive_event(self, r: _Req, s: int, now: float) -> None:
        r.nodes[s].pending -= 1
        self._arrive(r, s, now)

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
        """Start ``r``'s step on ``node`` at ``now`` (>= when it arrived there)."""
        if node.max_batch > 1:
            start_batch(self, node, [(r, s)], now)
            return
        node.busy += 1
        if now > r.ready_s:
            r.queue_s += now - r.ready_s
            if self._spans:
                self._span(r, "queue", node.name, r.ready_s, now, s)
        svc = r.service_s = step_s(self, node, r)
        r.start_s = now
        heapq.heappush(self._heap, (now + svc, _DONE, self._next(), r, s))

    def _forward(self, r: _Req, s: int, at: float) -> None:
        """The step's activations reach stage ``s`` (>= 1) at ``at``. Exact shortcut: every
        arrival at a stage-s node comes through the hop's FIFO pipes, so arrivals there happen
        in send order, and nothing reaches the node before ``at`` that is not already known.
        When the node has no earlier arrival still pending and the step needs no KV decision
        that a release before ``at`` could change, the arrival is processed now (FIFO position,
        start time, KV reservation: all as at ``at``) instead of as an event at ``at``. With
        requests waiting for KV room there, only a step that holds its cache, when no request
        can finish by ``at`` (a release would let a waiting one in first): no pending last
        token or doomed request does, and a last token sent from now on cannot arrive in time.
        (A request admitted later reaches this node through the same pipes, after ``at``.)"""
        node = r.nodes[s]
        if (
            self._ordered
            or node.pending
            or (
                node.kv_wait
                and (
                    not r.held[s]
                    or self._release_by(at)
                    or at - r.sent_s >= self._back_delay_s  # a last token sent later may beat it
                )
            )
        ):
            node.pending += 1
            self._push(at, _ARRIVE, r, s)
            return
        if not r.held[s]:
            need = r.pred.kv_bytes[s]
            if node.kv_used + need > node.kv_cap:  # may wait or fail: decide at its time
                node.pending += 1
                self._push(at, _ARRIVE, r, s)
                return
            node.kv_used += need  # fits now, so it fits at `at` (only releases come between)
            r.held[s] = True
        if at > r.sent_s:
            r.hops[s] += at - r.sent_s
            if self._spans:
                self._span(r, "transfer", r.route[s - 1], r.sent_s, at, s, node.name)
        r.ready_s = at
        if node.busy < self.config.slots:
            self._start(node, r, s, at)
        else:
            node.fifo.append((r, s))

    def _send_token(self, r: _Req, now: float) -> None:
        """The last stage sent r's token back at ``now``. Exact shortcut: when it is not the
        last token, the next step's arrival at the first stage is processed now (at its time
        ``t``) instead of as an event at ``t``, if nothing can reach that node before ``t``
        unseen: tokens come back through FIFO pipes in send order (earlier ones are already
        processed or counted as pending at their node), no admission falls before ``t``, and
        no finish before ``t`` can admit a waiting request or free KV room the node waits for.
        """
        t = self.net.back(now, self.config.token_bytes)
        if r.step + 1 >= r.req.output_tokens:
            self._finals.append(t)
            heapq.heappush(self._heap, (t, _TOKEN, self._next(), r, 0))
            return
        x0 = r.nodes[0]
        if (
            self._ordered
            or x0.pending
            or self.net.overhead_s > 0
            or not r.held[0]
            or self._next_admit_s <= t
            or ((x0.kv_wait or self._waiting) and self._release_by(t))
        ):
            x0.pending += 1
            heapq.heappush(self._heap, (t, _TOKEN, self._next(), r, 1))
            return
        if t > now:  # as _token, _first_hop and _arrive do at t
            r.hops[-1] += t - now
            if self._spans:
                self._span(r, "transfer", r.route[-1], now, t, len(r.route), CLIENT)
        r.tokens.append(t)
        r.step += 1
        r.sent_s = r.ready_s = t
        if x0.busy < self.config.slots:
            self._start(x0, r, 0, t)
        else:
            x0.fifo.append((r, 0))

    def _release_by(self, t: float) -> bool:
        """Can a request finish at or before ``t`` (freeing KV room that a waiting step may take,
        or an admission slot)? Finishes come from last tokens (pending, in time order) and from
        requests that fail where their cache does not fit (``_doomed``)."""
        return bool(self._doomed) or (bool(self._finals) and self._finals[0] <= t)

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
        if r.doomed:
            self._doomed -= 1
        self._flush()
        if r.route:
            self.ledger.leave(rid)
            for s, name in enumerate(r.route):
                node = self.nodes[name]
                if r.held[s]:
                    node.kv_used -= r.pred.kv_bytes[s]
                    r.held[s] = False
                self.scheduler.on_complete(StageCompletion(name, rid, 0.0, 0.0, now, True))
                self._wake_kv(node, now)
        self._records[rid] = request_record(r, now, reason)
        if self.on_record is not None:
            self.on_record(self._records[rid])
        self._active -= 1
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
        tb = self.config.token_bytes
        r.spans.append(step_span(r, kind, node, t0, t1, s, peer, tb, self.act_bytes))
