"""A small discrete-event simulator that replays requests through scheduled pipeline stages.

It runs the same scheduler objects the broker runs (the snapshot in, a route out, completions
fed back), so a policy can be tried in milliseconds before it runs on the emulated testbed.
For a whole scenario (plan, prefill and decode steps, links, KV memory) use :mod:`testbed.sim`
(``testbed simulate``). The model here is deliberately simple (store-and-forward at the request
level):

- Each request is routed once, at its arrival, to one replica per stage (``scheduler.route``).
- On each stage the request is one job of ``work_s(request, node)`` *predicted* seconds. The
  node really needs ``predicted / speed`` seconds: ``SimNode.speed`` is the truth, which may
  differ from the ``capacity`` prior the scheduler is shown.
- A node serves its jobs FIFO, ``slots`` at a time, each at full speed (a c-server queue).
- After stage s the request waits ``hop_s[s]`` seconds (transfer), then joins stage s+1's queue.
- The snapshot is the broker's: the shared :class:`~testbed.schedule.ledger.Ledger` keeps, per
  node, the requests routed there and not yet finished on it (``queue_len``, counted from routing, as the broker counts dispatches),
  their predicted work (``queued_work_s``), free memory after their KV reservations
  (``kv_bytes(request, stage)``, held from routing until the request leaves the node).
- When a job ends the scheduler gets a ``StageCompletion`` (predicted work, measured service
  time, ``finished=True``). Events at the same instant run completions first, then stage
  arrivals, then admissions; anything else ties by insertion order, so runs are deterministic.

A stage with no up replica makes ``route`` raise NoRouteError, which propagates.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from testbed.errors import ConfigError
from testbed.schedule.base import RequestView, Route, Scheduler, StageCompletion
from testbed.schedule.ledger import Ledger


@dataclass(frozen=True)
class SimRequest:
    arrival_s: float
    prompt_tokens: int = 0
    output_tokens: int = 0


@dataclass(frozen=True)
class SimNode:
    name: str
    speed: float = 1.0  # TRUE speed factor: service time = predicted work / speed
    capacity: float = 1.0  # prior shown to the scheduler (what the profile claims)
    mem_bytes: int = 2**62  # KV memory the node offers
    slots: int = 1  # jobs served at once, each at full speed
    up: bool = True


@dataclass(frozen=True)
class SimRecord:
    request_id: int
    arrival_s: float
    route: Route
    start_s: tuple[float, ...]  # per stage: service start
    end_s: tuple[float, ...]  # per stage: service end

    @property
    def latency_s(self) -> float:
        return self.end_s[-1] - self.arrival_s


@dataclass(frozen=True)
class SimResult:
    records: tuple[SimRecord, ...]  # in request order (request_id = index in the input)
    busy_s: Mapping[str, float]  # per node: total service time

    @property
    def latencies_s(self) -> np.ndarray:
        return np.array([r.latency_s for r in self.records], dtype=float)

    @property
    def mean_latency_s(self) -> float:
        return float(self.latencies_s.mean())

    def percentile_s(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q))

    def routed(self) -> dict[str, int]:
        """Per node: how many requests were routed to it."""
        counts = {name: 0 for name in self.busy_s}
        for r in self.records:
            for name in r.route:
                counts[name] += 1
        return counts


WorkFn = Callable[[SimRequest, str], float]  # (request, node name) -> predicted work, profile s
KvFn = Callable[[SimRequest, int], int]  # (request, stage index) -> KV bytes held on that stage


@dataclass
class _Node:  # mutable per-node server state during a run (the counters live in the Ledger)
    spec: SimNode
    busy: int = 0
    busy_s: float = 0.0
    waiting: deque[tuple[int, int]] = field(default_factory=deque)  # (request index, stage)


_END, _ARRIVE, _ADMIT = 0, 1, 2  # event kinds, in their order at equal times


def _as_request(r: Any) -> SimRequest:
    if isinstance(r, SimRequest):
        return r
    if hasattr(r, "arrival_s"):
        return SimRequest(float(r.arrival_s), int(r.prompt_tokens), int(r.output_tokens))
    return SimRequest(*r)


def simulate(
    requests: Iterable[SimRequest | tuple[float, int, int] | Any],
    stages: Sequence[Sequence[SimNode]],
    scheduler: Scheduler,
    work_s: WorkFn | Mapping[str, float],
    hop_s: Sequence[float] = (),
    kv_bytes: KvFn | None = None,
) -> SimResult:
    """Replay ``requests`` (arrival_s, prompt_tokens, output_tokens) and return per-request times.

    ``work_s`` is a callable (request, node) -> predicted seconds or a mapping node -> seconds
    (the same for every request). ``hop_s`` has one transfer time per hop (empty = no delay).
    The ``scheduler`` is used as is: its learned state carries over between calls.
    """
    reqs = [_as_request(r) for r in requests]
    if not stages or any(not st for st in stages):
        raise ConfigError("need at least one stage, each with at least one replica")
    hops = tuple(float(h) for h in hop_s) or (0.0,) * (len(stages) - 1)
    if len(hops) != len(stages) - 1 or any(h < 0 for h in hops):
        raise ConfigError(f"hop_s needs {len(stages) - 1} non-negative entries, got {hop_s!r}")
    nodes: dict[str, _Node] = {}
    for st in stages:
        for n in st:
            if n.name in nodes:
                raise ConfigError(f"node {n.name!r} appears twice")
            if n.speed <= 0 or n.slots < 1:
                raise ConfigError(f"node {n.name!r}: speed must be > 0 and slots >= 1")
            nodes[n.name] = _Node(n)
    ledger = Ledger(
        tuple(tuple(n.name for n in st) for st in stages),
        {name: node.spec.mem_bytes for name, node in nodes.items()},
        {name: node.spec.capacity for name, node in nodes.items()},
    )
    for name, node in nodes.items():
        if not node.spec.up:
            ledger.mark_down(name, "down in the simulation")
    work: WorkFn = work_s if callable(work_s) else (lambda _r, name: float(work_s[name]))

    routes: list[Route] = [()] * len(reqs)
    works: list[tuple[float, ...]] = [()] * len(reqs)
    kvs: list[tuple[int, ...]] = [()] * len(reqs)
    start: list[list[float]] = [[0.0] * len(stages) for _ in reqs]
    end: list[list[float]] = [[0.0] * len(stages) for _ in reqs]
    events: list[tuple[float, int, int, int, int]] = []  # (time, kind, seq, request, stage)
    seq = 0

    def push(t: float, kind: int, i: int, s: int) -> None:
        nonlocal seq
        heapq.heappush(events, (t, kind, seq, i, s))
        seq += 1

    def begin(node: _Node, i: int, s: int, now: float) -> None:
        node.busy += 1
        start[i][s] = now
        push(now + works[i][s] / node.spec.speed, _END, i, s)

    for i, r in enumerate(reqs):
        push(r.arrival_s, _ADMIT, i, 0)
    while events:
        now, kind, _, i, s = heapq.heappop(events)
        if kind == _ADMIT:
            r = reqs[i]
            kv = tuple(int(kv_bytes(r, j)) for j in range(len(stages))) if kv_bytes else ()
            view = RequestView(
                i,
                r.arrival_s,
                r.prompt_tokens,
                r.output_tokens,
                {name: float(work(r, name)) for name in nodes},
                kv,
            )
            route = tuple(scheduler.route(view, ledger.snapshot(now, hops)))
            ledger.check_route(route)
            routes[i], kvs[i] = route, kv or (0,) * len(stages)
            works[i] = tuple(view.work_s[name] for name in route)
            ledger.charge(i, route, works[i], kvs[i])
            push(now, _ARRIVE, i, 0)
        elif kind == _ARRIVE:
            node = nodes[routes[i][s]]
            if node.busy < node.spec.slots:
                begin(node, i, s, now)
            else:
                node.waiting.append((i, s))
        else:  # _END
            node = nodes[routes[i][s]]
            service = now - start[i][s]
            end[i][s] = now
            node.busy -= 1
            node.busy_s += service
            ledger.progress(i, s, works[i][s])
            ledger.leave_stage(i, s)
            scheduler.on_complete(
                StageCompletion(node.spec.name, i, works[i][s], service, now, True)
            )
            if node.waiting:
                begin(node, *node.waiting.popleft(), now)
            if s + 1 < len(stages):
                push(now + hops[s], _ARRIVE, i, s + 1)

    records = tuple(
        SimRecord(i, r.arrival_s, routes[i], tuple(start[i]), tuple(end[i]))
        for i, r in enumerate(reqs)
    )
    return SimResult(records, {name: n.busy_s for name, n in nodes.items()})
