"""A scenario timeline in simulated time: the same events as on a testbed, applied to the
simulator's state through its one hook (:meth:`Simulator.at`).

- link: the link's pipes (both directions, every hop that crosses it) take the new bandwidth
  and delay for messages sent from then on (a message already in a pipe keeps its timing);
- down (crash or partition): the node is marked down (ledger, ``scheduler.on_node_change``);
  every request whose route holds it is resumed as the broker does: its caches on the old
  route are freed and it is re-routed, re-running the prompt plus the tokens generated so far
  as one prefill, then decoding on; after ``max_retries`` re-routes, or with no replica up,
  it fails with the reason. The simulator sees the failure at once (the broker sees a crash
  at once too, a partition only when its call times out);
- up: the node is re-admitted at once (the broker: at its next health probe);
- speed: the node's steps take 1/speed as long from then on (steps already running keep theirs);
- rate_scale: already in the arrival times (:func:`testbed.spec.timeline.scale_arrivals`).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from testbed.schedule.base import NoRouteError, RequestView, StageCompletion
from testbed.schedule.ledger import InvalidRouteError
from testbed.sim.reference import _DONE, _Req
from testbed.sim.reference import ReferenceSimulator as Simulator
from testbed.spec.timeline import TimelineEvent
from testbed.spec.topology import Topology

MAX_RETRIES = 2  # as the broker's default (BrokerConfig.max_retries)


@dataclass
class SimTimeline:
    """Schedules ``events`` on a simulator and records what each did."""

    topology: Topology
    events: Sequence[TimelineEvent]
    max_retries: int = MAX_RETRIES

    def __post_init__(self) -> None:
        self.applied: list[dict[str, Any]] = []
        self._orig: dict[int, tuple[int, int, int]] = {}  # rid -> (prompt, output, retries)

    def install(self, sim: Simulator) -> None:
        self._base_slowdown = {n: node.slowdown for n, node in sim.nodes.items()}
        for ev in sorted(self.events, key=lambda e: e.at_s):
            sim.at(ev.at_s, partial(self._apply, event=ev))

    def fix_records(self, sim: Simulator) -> None:
        """Resumed requests ran as (prompt + tokens so far, tokens left): record them with
        their trace lengths and their re-route count."""
        for rid, (p, o, n) in self._orig.items():
            rec = sim._records.get(rid)
            if rec is not None:
                sim._records[rid] = replace(rec, prompt_tokens=p, output_tokens=o, retries=n)

    # -- events ---------------------------------------------------------------------------------
    def _apply(self, sim: Simulator, now: float, *, event: TimelineEvent) -> None:
        ev = event
        detail: dict[str, Any] = {}
        if ev.kind == "link":
            detail = self._link(sim, ev)
        elif ev.kind == "speed":
            assert ev.node is not None and ev.speed is not None
            if ev.node in sim.nodes:
                base = self._base_slowdown.get(ev.node, float(sim.config.slowdown.get(ev.node, 1)))
                sim.nodes[ev.node].slowdown = base / ev.speed
        elif ev.kind == "down":
            assert ev.node is not None
            if ev.node in sim.nodes:
                detail = {"resumed_or_failed": self._down(sim, ev.node, f"{ev.down}", now)}
        elif ev.kind == "up":
            assert ev.node is not None
            if ev.node in sim.nodes:
                for g in sim.gens:  # every plan's ledger that knows it (re-partitioned runs)
                    if ev.node in g.ledger.books:
                        g.ledger.mark_up(ev.node)
                sim.scheduler.on_node_change(ev.node, True, now)
        self.applied.append(
            {"at_s": ev.at_s, "applied_s": now, "kind": ev.kind, "what": ev.describe()} | detail
        )

    def _link(self, sim: Simulator, ev: TimelineEvent) -> dict[str, Any]:
        tiers = self.topology.tier_names
        a, b = ev.tiers
        j = min(tiers.index(a), tiers.index(b))
        new = None
        pipes_at = [  # the pipes of link j in every plan's hops (plans share them)
            pipes[j - g.layout.stages[h].tier_index]
            for g in sim.gens
            for h in range(len(g.layout.stages) - 1)
            for pipes in (g.net.fwd[h], g.net.rev[h])
            if 0 <= j - g.layout.stages[h].tier_index < len(pipes)
        ]
        for pipe in {id(p): p for p in pipes_at}.values():
            if ev.bandwidth_bps is not None:
                pipe.bandwidth_bps = ev.bandwidth_bps
            if ev.delay_s is not None:
                pipe.delay_s = ev.delay_s
            new = (pipe.bandwidth_bps, pipe.delay_s)
        if new is None:
            return {"note": "no hop of this plan crosses the link"}
        return {"bandwidth_bps": new[0], "delay_s": new[1]}

    def _down(self, sim: Simulator, node: str, how: str, now: float) -> int:
        """Mark ``node`` down and resume (or fail) every request whose route holds it."""
        reason = f"node {node} down ({how}) at {now:.3f}s"
        for g in sim.gens:
            if node in g.ledger.books:
                g.ledger.mark_down(node, reason)
        sim.scheduler.on_node_change(node, False, now)
        hit: dict[int, _Req] = {}
        kept = []
        for entry in sim._heap:
            obj = entry[3]
            if isinstance(obj, _Req) and node in obj.route:
                hit[id(obj)] = obj
                if entry[1] == _DONE:  # it was computing on route[s]: that server is free
                    sim.nodes[obj.route[entry[4]]].busy -= 1
            else:
                kept.append(entry)
        for n in sim.nodes.values():
            for q in (n.fifo, n.kv_wait):
                left = [(r, s) for r, s in q if node not in r.route]
                hit.update({id(r): r for r, _ in q if node in r.route})
                q.clear()
                q.extend(left)
        sim._heap[:] = kept
        heapq.heapify(sim._heap)
        down = sim.nodes[node]
        down.busy = 0
        for r in sorted(hit.values(), key=lambda r: r.req.request_id):
            self._resume(sim, r, reason, now)
        for n in sim.nodes.values():  # servers freed above take their next step
            while n.name != node and n.busy < sim.config.slots and n.fifo:
                nr, ns = n.fifo.popleft()
                sim._start(n, nr, ns, now)
        return len(hit)

    def _resume(self, sim: Simulator, r: _Req, reason: str, now: float) -> None:
        rid = r.req.request_id
        assert r.gen is not None
        r.gen.ledger.leave(rid)
        for s, name in enumerate(r.route):
            n = sim.nodes[name]
            if r.held[s]:
                n.kv_used -= r.pred.kv_bytes[s]
                r.held[s] = False
            sim.scheduler.on_complete(StageCompletion(name, rid, 0.0, 0.0, now, True))
        for name in r.route:
            sim._wake_kv(sim.nodes[name], now)
        p0, o0, tries = self._orig.get(rid, (r.req.prompt_tokens, r.req.output_tokens, 0))
        done = len(r.tokens)
        if tries >= self.max_retries:
            self._orig[rid] = (p0, o0, tries)
            sim._finish(r, now, f"{reason}; gave up after {tries} re-routes")
            return
        self._orig[rid] = (p0, o0, tries + 1)
        # the rest of the request: prompt + tokens so far as one prefill, then the rest
        req = replace(r.req, prompt_tokens=p0 + done, output_tokens=o0 - done)
        pred = sim.predictor.predict(req.prompt_tokens, req.output_tokens)
        view = RequestView(rid, req.arrival_s, req.prompt_tokens, req.output_tokens,
                           pred.work_s, pred.kv_bytes)  # fmt: skip
        try:
            route = tuple(sim.scheduler.route(view, sim.ledger.snapshot(now, pred.hop_s)))
            sim.ledger.check_route(route)
        except (NoRouteError, InvalidRouteError) as exc:
            r.req = replace(r.req, prompt_tokens=p0, output_tokens=o0)
            self._orig[rid] = (p0, o0, tries)  # not re-routed after all
            sim._finish(r, now, f"{reason}; no route: {exc}")
            return
        sim.ledger.charge(rid, route, [pred.work_s[n] for n in route], pred.kv_bytes)
        sim.bind(r, now)  # it runs on the current plan from here on
        r.req, r.pred, r.route, r.step = req, pred, route, 0
        r.nodes = [sim.nodes[n] for n in route]
        r.held = [False] * len(route)
        r.work_pre = [pred.prefill_s[n] for n in route]
        r.work_dec = [pred.decode_step_s[n] for n in route]
        r.compute = [0.0] * len(route)
        r.hops = [0.0] * (len(route) + 1)
        sim._first_hop(r, now)
