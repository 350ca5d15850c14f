"""Sending a request's steps to the stages, for :class:`testbed.broker.broker.Broker`: one hop
at a time (relay) or the whole route at once (forward, :mod:`testbed.broker.chain`), each
waiting for a slot on its node(s) in the scheduler's stage order, then recorded as spans, ledger
progress and a completion for the scheduler."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any, NamedTuple

from testbed.broker.chain import HopStep, HopTimes, chain_spans, hop_spans
from testbed.broker.layout import Prediction
from testbed.broker.slo import step_options, wait_order
from testbed.broker.slots import NodeSlots
from testbed.broker.state import Tracker
from testbed.broker.transport import ChainTransport, StageTransport, StageUnreachableError, StepKind
from testbed.metrics.records import Span
from testbed.schedule.base import Route, Scheduler, StageCompletion


class StepAt(NamedTuple):
    """Which step of which request, on which route (what every hop of it shares)."""

    tr: Tracker
    pred: Prediction
    route: Route
    sid: str  # the request's id on the stages (a resumed request gets a new one)
    kind: StepKind
    step: int  # output token index
    pos: int  # position of the step's first input token


class StepSenders:
    """Mixed into the broker, which sets these attributes."""

    config: Any
    scheduler: Scheduler
    transport: StageTransport
    generational: bool
    on_spans: Callable[[list[Span]], None] | None
    _node_slots: dict[str, NodeSlots]

    def now_s(self) -> float:
        raise NotImplementedError

    async def _call(self, call: StepAt, s: int, data: object) -> object:
        """One hop of a step (the relay transport): stage ``s`` of the route."""
        tr, pred, route, sid, kind, step, pos = call
        node = route[s]
        rid = tr.req.request_id
        waited_from = self.now_s()
        order = wait_order(tr, ordered=self.scheduler.orders_stage_queues)
        slots = self._node_slots[node]
        await slots.acquire(order)
        try:
            t0 = self.now_s()
            if t0 - waited_from > 1e-6:
                tr.spans.append(Span("queue", node, waited_from, t0, rid, s, kind, step))
            if not tr.gen.ledger.book(node).up:
                down = tr.gen.ledger.book(node).down_reason or "marked down"
                raise StageUnreachableError(node, down)
            opts = step_options(tr, t0, ordered=self.scheduler.orders_stage_queues)
            if self.generational:  # the stage may hold two ranges: say which one
                opts = replace(opts, blocks=tr.gen.blocks(s))
            res = await self.transport.forward(
                node, sid, kind, pos, data, timeout_s=self.config.call_timeout_s, options=opts
            )
            t1 = self.now_s()
        finally:
            slots.release()
        service = min(max(res.service_s, 0.0), t1 - t0)
        queued = min(max(res.queue_s, 0.0), t1 - t0 - service)
        c0 = t1 - service
        times = HopTimes(t0, c0 - queued, c0, t1)
        self._record_hop(tr, pred, route, times, HopStep(s, kind, step, res.nbytes, res.batch_size))
        return res.output

    async def _chain(self, call: StepAt, data: object) -> object:
        """One step through the whole route in the forward transport (:mod:`.chain`): a slot
        on every node of the route is held while the step is in the chain (taken in stage
        order, so two chains never wait on each other)."""
        tr, pred, route, sid, kind, step, pos = call
        rid = tr.req.request_id
        transport: ChainTransport = self.transport  # type: ignore[assignment]  # checked in start()
        waited_from = self.now_s()
        order = wait_order(tr, ordered=self.scheduler.orders_stage_queues)
        held: list[NodeSlots] = []
        try:
            for node in route:
                slots = self._node_slots[node]
                await slots.acquire(order)
                held.append(slots)
            t0 = self.now_s()
            if t0 - waited_from > 1e-6:
                tr.spans.append(Span("queue", route[0], waited_from, t0, rid, 0, kind, step))
            for node in route:
                if not tr.gen.ledger.book(node).up:
                    down = tr.gen.ledger.book(node).down_reason or "marked down"
                    raise StageUnreachableError(node, down)
            opts = step_options(tr, t0, ordered=self.scheduler.orders_stage_queues)
            if self.generational:  # each hop names its blocks (a stage may hold two ranges)
                blocks = tuple(tr.gen.blocks(s) for s in range(len(route)))
                opts = replace(opts, blocks=blocks[0], route_blocks=blocks[1:])
            res = await transport.forward_route(
                route, sid, kind, pos, data, timeout_s=self.config.call_timeout_s, options=opts
            )
            t1 = self.now_s()
        finally:
            for slots in reversed(held):
                slots.release()
        for s, (hop, at) in enumerate(zip(res.hops, chain_spans(t0, t1, res.hops), strict=True)):
            self._record_hop(
                tr, pred, route, at, HopStep(s, kind, step, hop.nbytes, hop.batch_size)
            )
        return res.output

    def _record_hop(
        self, tr: Tracker, pred: Prediction, route: Route, at: HopTimes, hop: HopStep
    ) -> None:
        """A hop's spans, its progress on the ledger, its completion for the scheduler."""
        node, rid, s = route[hop.stage], tr.req.request_id, hop.stage
        spans = hop_spans(route, rid, at, hop)
        tr.spans.extend(spans)
        if self.on_spans is not None:  # a live observer (adaptive re-partitioning's link meter)
            self.on_spans(spans)
        predicted = pred.prefill_s[node] if hop.kind == "prefill" else pred.decode_step_s[node]
        tr.gen.ledger.progress(rid, s, predicted)
        done = StageCompletion(node, rid, predicted, at.compute_s, at.compute_end_s, False)
        self.scheduler.on_complete(done)
