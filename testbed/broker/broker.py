"""The asyncio broker: admit each request at its trace time, route it, stream it through the stages.

For each request, in order:

1. **Admit** at its absolute time ``start + arrival_s`` (never chained sleeps): the loop
   sleeps until then on a kernel timer (:mod:`testbed.broker.timer`; without one, a timer
   sleep until ``admission_spin_s`` before the deadline, then yielding to the loop until it
   is reached: the event loop's timers are only as precise as epoll's millisecond).
   Admission is bounded (``max_active_requests``): when that many are unfinished the next
   one waits, and its injection lag shows it.
2. **Decide** (synchronously, no await between snapshot and charge): the cost model's
   :class:`~testbed.broker.layout.Prediction` gives the request's work on every replica, the
   :class:`~testbed.schedule.ledger.Ledger` the exact queue counts, queued work and KV headroom;
   the scenario's scheduler picks the route, and the ledger charges it.
3. **Act**: prefill through every stage of the route, then one decode step per further token
   (the KV caches stay on the route). The output length is forced to the trace's: the token
   the last stage returns is fed back whatever it is (EOS included). Every step's compute time
   (reported by the stage server), transfer and queueing become spans of the request's record;
   every step is fed to the scheduler as a :class:`StageCompletion` (ARTS learns capacity).
   ``config.transport``: ``relay`` sends every hop from here; ``forward`` sends each step to
   the route's first stage, which passes it on stage to stage (:mod:`testbed.broker.chain`).
4. **Leave**: the last step freed the caches on the route's nodes; the ledger is uncharged.

Per node, at most ``max_inflight_per_node`` calls are outstanding (the rest wait in the broker,
recorded as queueing, and take freed slots in the stages' batch order when the scheduler
orders them, :mod:`testbed.broker.slots`): backpressure is explicit. A node that does not
answer (timeout, refused, reset) is marked down; the request resumes on a new route up to
``max_retries`` times, its caches rebuilt there by one prefill of the prompt plus the tokens
generated so far, else it fails with the reason. Every ``probe_interval_s`` the nodes marked
down are health-checked; one that answers is re-admitted (``scheduler.on_node_change``). Every
request ends completed or failed with a reason; none is lost.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import secrets
import time
from collections.abc import Callable, Sequence

from testbed.broker.generation import Generation, Generational, routed_totals
from testbed.broker.health import NodeHealth
from testbed.broker.layout import Layout, WorkPredictor
from testbed.broker.slo import request_view
from testbed.broker.slots import NodeSlots
from testbed.broker.state import (
    CLIENT,
    BrokerConfig,
    BrokerResult,
    NodeEvent,
    RequestState,
    Tracker,
)
from testbed.broker.stepping import StepAt, StepSenders
from testbed.broker.timer import ArrivalTimer, arrival_timer
from testbed.broker.transport import (
    StageError,
    StageRejectedError,
    StageTransport,
    StepKind,
    as_token,
    marks_node_down,
)
from testbed.errors import ConfigError
from testbed.metrics.records import RequestRecord, Span
from testbed.schedule.base import NoRouteError, Route, Scheduler, StageCompletion
from testbed.schedule.ledger import InvalidRouteError
from testbed.spec.classes import class_of
from testbed.workload.request import TraceRequest

log = logging.getLogger(__name__)

__all__ = ["CLIENT", "Broker", "BrokerConfig", "BrokerResult", "NodeEvent", "RequestState"]


class _Failed(Exception):
    """Internal: the request ends as failed with ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


PromptFn = Callable[[TraceRequest], Sequence[int]]


class Broker(Generational, StepSenders):
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
        self.gen = Generation.of(0, layout, predictor)  # new requests' plan (generation.py)
        self.scheduler = scheduler
        self.transport = transport
        self.prompt_ids = prompt_ids
        self.config = config or BrokerConfig()
        self.clock = clock
        self.on_record = on_record
        self.on_spans: Callable[[list[Span]], None] | None = None
        self.generational = False  # steps name their blocks (a stage may hold two ranges)
        self.past: list[Generation] = []  # superseded plans (switch())
        self.health = NodeHealth(
            self.ledger, transport, scheduler, self.config, self.now_s, on_node_event
        )
        self.run_tag = secrets.token_hex(3)  # stage-side request ids are unique per run
        self._t0 = 0.0
        self._node_slots = {
            n: NodeSlots(self.config.max_inflight_per_node, self.now_s) for n in layout.nodes
        }
        self._records: dict[int, RequestRecord] = {}
        self._trackers: dict[int, Tracker] = {}
        self._started = False
        self._timer: ArrivalTimer | None = None
        self.clock_started = asyncio.Event()  # set when run() fixed the run clock's start

    # -- lifecycle ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the transport and probe every node; a node that does not answer is marked down
        (and a stage with no node up is an error)."""
        if self.config.transport == "forward" and not hasattr(self.transport, "forward_route"):
            raise ConfigError(
                f"transport: forward needs a stage transport that can send along a route; "
                f"{type(self.transport).__name__} cannot (use transport: relay)",
                field="transport",
            )
        await self.transport.start()
        self._started = True
        await self.health.probe_at_start(self.layout.node_names())
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
        prober = asyncio.create_task(self.health.readmit_down_nodes(), name="probe-down-nodes")
        self._timer = arrival_timer(self.clock)
        # the objects made before the replay (modules, torch, the layout) never become garbage
        # during it: out of the collector's sight, a full collection no longer walks them all
        # (it stopped the loop for ~160 ms at a few hundred req/s: injection lag)
        gc.freeze()
        try:
            async with asyncio.timeout(
                (admitted[-1].arrival_s if admitted else 0.0)
                + self.config.start_delay_s
                + self.config.drain_timeout_s
            ):
                async with asyncio.TaskGroup() as tg:
                    for req in admitted:
                        await self._until(self._t0 + req.arrival_s)
                        tr = Tracker(req, released_s=self.now_s())
                        self._trackers[req.request_id] = tr
                        await slots.acquire()
                        try:
                            route = self._decide(tr)
                        except _Failed as exc:
                            slots.release()
                            tr.gen.leave(req.request_id)
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
            gc.unfreeze()
            if self._timer is not None:
                self._timer.close()
                self._timer = None
            prober.cancel()
            await asyncio.gather(prober, return_exceptions=True)
        wall = self.now_s()
        for rid, tr in self._trackers.items():
            if tr.state < RequestState.FINISHED:
                (tr.gen or self.gen).leave(rid)
                self._finish(tr, "failed", "not finished within the drain timeout")
        self._trackers.clear()
        records = tuple(self._records[r.request_id] for r in admitted)
        ends = [r.finished_s for r in records if r.finished_s is not None]
        return BrokerResult(
            records=records,
            wall_s=max(ends) if ends else wall,
            node_events=tuple(self.health.events),
            routed=routed_totals([*self.past, self.gen]),
            scheduler=self.scheduler.describe(),
            not_admitted=len(reqs) - len(admitted),
        )

    async def _until(self, due: float) -> None:
        """Wait for the absolute clock time ``due``: on the kernel timer, else sleep, then
        yield for the last stretch."""
        if self._timer is not None:
            await self._timer.wait_until(due)
            return
        spin = self.config.admission_spin_s
        delay = due - self.clock()
        if delay > spin:
            await asyncio.sleep(delay - spin)
        while self.clock() < due:  # noqa: ASYNC110 - a deadline finer than the loop timers
            await asyncio.sleep(0)

    # -- decide ---------------------------------------------------------------------------------
    def _decide(self, tr: Tracker) -> Route:
        """Snapshot -> scheduler -> charge. No await: the snapshot is exact when routed."""
        req, gen = tr.req, self.gen
        if tr.gen is not gen:  # new, or re-routed after a newer plan took over
            if tr.gen is not None:
                tr.gen.leave(req.request_id)
            tr.gen = gen
            gen.join(req.request_id)
        pred = gen.predictor.predict(req.prompt_tokens, req.output_tokens)
        if tr.slo_class is None:
            tr.slo_class = class_of(req.request_id, self.config.classes, self.config.class_seed)
        view = request_view(req, pred, tr.slo_class)
        snap = gen.ledger.snapshot(self.now_s(), pred.hop_s)
        try:
            route = tuple(self.scheduler.route(view, snap))
        except NoRouteError as exc:
            raise _Failed(f"no route: {exc}") from None
        try:
            gen.ledger.check_route(route)
        except InvalidRouteError as exc:
            raise _Failed(f"invalid route: {exc}") from None
        gen.ledger.charge(req.request_id, route, [pred.work_s[n] for n in route], pred.kv_bytes)
        tr.route = route
        tr.state = RequestState.DISPATCHED
        return route

    # -- act ------------------------------------------------------------------------------------
    async def _serve(self, tr: Tracker, route: Route, slots: asyncio.Semaphore) -> None:
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
                    tr.gen.ledger.leave(rid)
                    if not marks_node_down(exc):
                        await self._release(tr, route)
                        if isinstance(exc, StageRejectedError):
                            reason = f"HTTP {exc.status} {exc.code}: {exc.reason}"
                        raise _Failed(f"node {node}: {reason}") from None
                    self.health.mark_down(node, reason)
                    await self._release(tr, route, skip=node)
                    if tr.retries >= self.config.max_retries:
                        raise _Failed(
                            f"node {node} down ({reason}); gave up after {tr.retries} re-routes"
                        ) from None
                    tr.retries += 1  # resumed: the new route re-runs prompt + tokens so far
                    route = self._decide(tr)
        except _Failed as exc:
            self._finish(tr, "failed", exc.reason)
        except Exception as exc:  # a bug or an unexpected reply: the request fails, loudly
            log.exception("request %s failed unexpectedly", rid)
            self._finish(tr, "failed", f"internal error: {type(exc).__name__}: {exc}")
        finally:
            tr.gen.leave(rid)  # and its ledger; the last request of an old plan drains it
            slots.release()

    def _stage_id(self, tr: Tracker) -> str:
        return f"{self.run_tag}-{tr.req.request_id}-{tr.retries}"

    async def _attempt(self, tr: Tracker, route: Route) -> None:
        req = tr.req
        sid = self._stage_id(tr)
        pred = tr.gen.predictor.predict(req.prompt_tokens, req.output_tokens)
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
            call = StepAt(tr, pred, route, sid, kind, step, pos)
            if self.config.transport == "forward":
                data = await self._chain(call, data)
            else:
                for s in range(len(route)):
                    data = await self._call(call, s, data)
            token = as_token(data, route[-1])
            tr.tokens.append(token)
            tr.token_times_s.append(self.now_s())
            pos += len(prefix) if first else 1
            data = [token]  # forced length: whatever the token, it is fed back
        tr.gen.ledger.leave(req.request_id)
        await self._release(tr, route, freed=True)  # the last step freed the caches

    async def _release(
        self, tr: Tracker, route: Route, skip: str | None = None, *, freed: bool = False
    ) -> None:
        """Free the request's caches on its route (best effort, bounded; errors are logged;
        not when its last step ``freed`` them) and tell the scheduler it left those nodes."""
        sid = self._stage_id(tr)

        async def one(node: str) -> None:
            try:
                await self.transport.release(node, sid, timeout_s=self.config.release_timeout_s)
            except (StageError, OSError, TimeoutError) as exc:
                log.debug("release of %s on %s failed: %s", sid, node, exc)

        targets = [] if freed else [n for n in route if n != skip and tr.gen.ledger.book(n).up]
        if targets:
            async with asyncio.TaskGroup() as tg:
                for n in targets:
                    tg.create_task(one(n))
        now = self.now_s()
        for n in route:  # nothing new to learn (no work, no time): only "it left"
            self.scheduler.on_complete(StageCompletion(n, tr.req.request_id, 0.0, 0.0, now, True))

    # -- bookkeeping ----------------------------------------------------------------------------
    def _finish(self, tr: Tracker, status: str, reason: str | None = None) -> None:
        if tr.state >= RequestState.FINISHED:
            return
        tr.state = RequestState.FINISHED if status == "completed" else RequestState.FAILED
        end = tr.token_times_s[-1] if status == "completed" and tr.token_times_s else self.now_s()
        rec = tr.record(status, end, reason)
        self._records[tr.req.request_id] = rec
        if self.on_record is not None:
            self.on_record(rec)
