"""The optimised engine's event loop, with its hottest paths written out.

:meth:`Simulator.run` hands its sorted arrivals to :func:`run_events`. Per event it does what
the engine's methods do (their docstrings give the rules and why each shortcut is exact), with
the common cases inlined: a step's end on a node, the start of the next step in the node's FIFO
(step times from per-node tables already scaled by the node's slowdown: the same product), the
send over the hop's pipes (``Pipe.send``'s arithmetic), the early arrival at the next stage
(:meth:`Simulator._forward`) and the early return of a token that is not the last
(:meth:`Simulator._send_token`). Everything else (admissions, arrival and token events, batched
forwards, finishes) goes through the engine's methods. As there, a node with ``max_batch`` > 1
starts batches (:mod:`testbed.sim.batching`), and when the scheduler orders the stage queues
(``slo``) the next step is the one :func:`~testbed.sim.classes.pop_next` picks and the early
arrival and token return are off (arrivals are processed at their time).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import TYPE_CHECKING

from testbed.sim.batching import batch_done, start_batch
from testbed.sim.classes import pop_next
from testbed.sim.links import expected_loss_s
from testbed.sim.state import _ARRIVE, _DONE, _INF, _TOKEN, CLIENT, _Node, _Req
from testbed.workload.request import TraceRequest

if TYPE_CHECKING:
    from testbed.sim.engine import Simulator


def step_s(sim: Simulator, node: _Node, r: _Req) -> float:
    """``r``'s next step on ``node`` in true seconds (the node's slowdown applied), cached per
    node: a prefill by prompt length, a decode step by context."""
    step = r.step
    if step:
        ctx = r.prompt + step - 1
        svc = node.dec_s.get(ctx)
        if svc is None:
            svc = node.dec_s[ctx] = sim.steps.decode_s(node.name, ctx) * node.slowdown
    else:
        svc = node.pre_s.get(r.prompt)
        if svc is None:
            svc = node.pre_s[r.prompt] = sim.steps.prefill_s(node.name, r.prompt) * node.slowdown
    return svc


def run_events(sim: Simulator, arrivals: Sequence[TraceRequest]) -> float:
    """Admit ``arrivals`` (sorted by time) and process every event; -> the last event's time."""
    heap = sim._heap
    pop, push, nxt = heapq.heappop, heapq.heappush, sim._next
    spans, ordered = sim._spans, sim._ordered
    done_add = sim._done.append
    fwd_pipes, back_pipes, overhead = sim.net.fwd, sim.net.back_pipes, sim.net.overhead_s
    act, slots, token_bytes = sim.act_bytes, sim.config.slots, sim.config.token_bytes
    finals, waiting, back_delay = sim._finals, sim._waiting, sim._back_delay_s

    def start(node: _Node, r: _Req, s: int, t0: float) -> None:
        """:meth:`Simulator._start`, written out."""
        if node.max_batch > 1:
            start_batch(sim, node, [(r, s)], t0)
            return
        node.busy += 1
        if t0 > r.ready_s:
            r.queue_s += t0 - r.ready_s
            if spans:
                sim._span(r, "queue", node.name, r.ready_s, t0, s)
        step = r.step
        if step:
            svc = node.dec_s.get(r.prompt + step - 1)
        else:
            svc = node.pre_s.get(r.prompt)
        if svc is None:
            svc = step_s(sim, node, r)
        r.service_s = svc
        r.start_s = t0
        push(heap, (t0 + svc, _DONE, nxt(), r, s))

    n_arr, k = len(arrivals), 0
    next_admit = sim._next_admit_s = arrivals[0].arrival_s if arrivals else _INF
    now = 0.0
    events = 0
    while True:
        if heap:
            if next_admit < heap[0][0]:
                now = next_admit
                events += 1
                k += 1
                next_admit = sim._next_admit_s = arrivals[k].arrival_s if k < n_arr else _INF
                sim._admit(arrivals[k - 1], now)
                continue
        elif k < n_arr:
            now = next_admit
            events += 1
            k += 1
            next_admit = sim._next_admit_s = arrivals[k].arrival_s if k < n_arr else _INF
            sim._admit(arrivals[k - 1], now)
            continue
        else:
            break
        now, kind, _, r, s = pop(heap)
        events += 1
        if kind != _DONE or s < 0:
            if s < 0:
                batch_done(sim, r, now)
            elif kind == _TOKEN:
                if s:
                    r.nodes[0].pending -= 1
                else:
                    finals.popleft()
                sim._token(r, now)
            else:
                sim._arrive_event(r, s, now)
            continue
        # a step ends on r.nodes[s]
        node = r.nodes[s]
        node.busy -= 1
        svc = r.service_s
        node.busy_s += svc
        r.compute[s] += svc
        if spans:
            sim._span(r, "compute", node.name, r.start_s, now, s)
        step = r.step
        predicted = r.work_dec[s] if step else r.work_pre[s]
        # ledger progress and the scheduler's completion: applied in this order before the
        # next decision or leave (Simulator._flush), the only times they are read
        done_add((node.name, r.rid, s, predicted, svc, now))
        if node.fifo:
            nr, ns = pop_next(node.fifo, now) if ordered else node.fifo.popleft()
            # an early-processed arrival may wait in the FIFO for its time
            start(node, nr, ns, now if now >= nr.ready_s else nr.ready_s)
        r.sent_s = now
        if s < r.last:  # the activations go to the next stage (Network.forward, written out)
            nbytes = act if step else act * r.prompt
            t = now
            for p in fwd_pipes[s]:
                free = p.free_at_s
                occ = nbytes * 8.0 / p.bandwidth_bps
                free = p.free_at_s = (t if t >= free else free) + occ
                p.busy_s += occ
                if p.loss:  # Network.forward's head-of-line retransmissions
                    free = p.free_at_s = free + expected_loss_s(nbytes, p.loss, p.delay_s)
                t = free + p.delay_s
            at = t + overhead
            s += 1
            node = r.nodes[s]
            # Simulator._forward, written out
            if (
                ordered
                or node.pending
                or (
                    node.kv_wait
                    and (
                        not r.held[s]
                        or sim._doomed
                        or (finals and finals[0] <= at)
                        or at - now >= back_delay
                    )
                )
            ):
                node.pending += 1
                push(heap, (at, _ARRIVE, nxt(), r, s))
                continue
            if not r.held[s]:
                need = r.pred.kv_bytes[s]
                if node.kv_used + need > node.kv_cap:  # may wait or fail: decide at its time
                    node.pending += 1
                    push(heap, (at, _ARRIVE, nxt(), r, s))
                    continue
                node.kv_used += need
                r.held[s] = True
            if at > now:
                r.hops[s] += at - now
                if spans:
                    sim._span(r, "transfer", r.route[s - 1], now, at, s, node.name)
            r.ready_s = at
            if node.busy < slots:
                start(node, r, s, at)
            else:
                node.fifo.append((r, s))
            continue
        # the token goes back to the client (Network.back and Simulator._send_token, written out)
        t = now
        for p in back_pipes:
            free = p.free_at_s
            occ = token_bytes * 8.0 / p.bandwidth_bps
            free = p.free_at_s = (t if t >= free else free) + occ
            p.busy_s += occ
            t = free + p.delay_s
        if step + 1 >= r.out:
            finals.append(t)
            push(heap, (t, _TOKEN, nxt(), r, 0))
            continue
        node = r.nodes[0]
        if (
            ordered
            or node.pending
            or overhead > 0
            or not r.held[0]
            or next_admit <= t
            or ((node.kv_wait or waiting) and (sim._doomed or (finals and finals[0] <= t)))
        ):
            node.pending += 1
            push(heap, (t, _TOKEN, nxt(), r, 1))
            continue
        if t > now:
            r.hops[-1] += t - now
            if spans:
                sim._span(r, "transfer", r.route[-1], now, t, r.last + 1, CLIENT)
        r.tokens.append(t)
        r.step = step + 1
        r.sent_s = r.ready_s = t
        if node.busy < slots:
            start(node, r, 0, t)
        else:
            node.fifo.append((r, 0))
    sim.events += events
    return now
