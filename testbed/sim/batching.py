"""Continuous batching in the simulated node model (a node's ``max_batch`` > 1).

A node that starts computing takes the steps waiting in its FIFO that have arrived by then
(prefills and decode steps of different requests; requests join and leave at step
boundaries), up to the node's ``max_batch``, as one forward timed by :meth:`StepTimes.batch_s`. Every
step of the batch takes the batch's time (what a stage server would measure for it); the node
is busy once per batch.
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

from testbed.sim.classes import pop_next
from testbed.sim.state import _DONE, _Node, _Req

if TYPE_CHECKING:
    from testbed.sim.engine import Simulator


def start_batch(sim: Simulator, node: _Node, batch: list[tuple[_Req, int]], now: float) -> None:
    """Start one batched forward at ``now``: ``batch`` plus the steps waiting in the FIFO
    that have arrived by then, up to max_batch (requests join at step boundaries)."""
    fifo, cap = node.fifo, node.max_batch
    if sim._ordered:  # by (priority, least slack): every waiting step has arrived
        while fifo and len(batch) < cap:
            batch.append(pop_next(fifo, now))
    while fifo and len(batch) < cap and fifo[0][0].ready_s <= now:
        batch.append(fifo.popleft())
    node.busy += 1
    prompts, contexts = [], []
    for r, _ in batch:
        if r.step == 0:
            prompts.append(r.prompt)
        else:
            contexts.append(r.prompt + r.step - 1)
    svc = sim.steps.batch_s(node.name, prompts, contexts) * node.slowdown
    for r, s in batch:
        if now > r.ready_s:
            r.queue_s += now - r.ready_s
            if sim._spans:
                sim._span(r, "queue", node.name, r.ready_s, now, s)
        r.service_s, r.start_s = svc, now
    sim.batches += 1
    sim.batched_steps += len(batch)
    heapq.heappush(sim._heap, (now + svc, _DONE, sim._next(), batch, -1))


def batch_done(sim: Simulator, batch: list[tuple[_Req, int]], now: float) -> None:
    """A batched forward ended: every step in it is done (one busy period for the node)."""
    r0, s0 = batch[0]
    node = r0.nodes[s0]
    node.busy -= 1
    svc = r0.service_s
    node.busy_s += svc
    for r, s in batch:
        r.compute[s] += svc
        if sim._spans:
            sim._span(r, "compute", node.name, r.start_s, now, s)
        predicted = r.work_pre[s] if r.step == 0 else r.work_dec[s]
        sim._done.append((node.name, r.rid, s, predicted, svc, now))
    if node.fifo:
        nr, ns = pop_next(node.fifo, now) if sim._ordered else node.fifo.popleft()
        start_batch(sim, node, [(nr, ns)], now if now >= nr.ready_s else nr.ready_s)
    for r, s in batch:
        r.sent_s = now
        if s < r.last:
            nbytes = sim.act_bytes * (r.prompt if r.step == 0 else 1)
            sim._forward(r, s + 1, sim.net.forward(s, now, nbytes))
        else:
            sim._send_token(r, now)
