"""The broker's plans over a run (adaptive re-partitioning, :mod:`testbed.experiment.adaptive`).

A :class:`Generation` is one plan as the broker uses it: its :class:`Layout` (stages, block
ranges, replicas), the predictor of work on it and the ledger of the requests routed on it.
The broker routes every new request on the current generation and a request keeps its
generation to the end (a retry after a node failure re-routes on the current one: it rebuilds
its caches anyway). :meth:`Broker.switch <testbed.broker.broker.Broker.switch>` makes a new
generation current once every stage server has loaded its blocks; the old one *drains* as its
last request leaves (:attr:`Generation.drained`), after which its block ranges may be unloaded.

While two generations run, each has its own ledger: the scheduler's view for a new request
counts the new plan's queued work only (the nodes' real queues hold both; the simulator makes
the same simplification, :mod:`testbed.sim.migrate`). Down marks are copied to the new
ledger, and the health checks follow the current one.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from testbed.broker.layout import Layout, WorkPredictor
from testbed.broker.slots import NodeSlots
from testbed.schedule.ledger import Ledger


@dataclass(eq=False)
class Generation:
    number: int
    layout: Layout
    predictor: WorkPredictor
    ledger: Ledger
    requests: set[int] = field(default_factory=set)  # request ids routed on it, not finished
    drained: asyncio.Event = field(default_factory=asyncio.Event)  # set once superseded+empty
    current: bool = True

    @classmethod
    def of(cls, number: int, layout: Layout, predictor: WorkPredictor) -> Generation:
        ledger = Ledger(
            tuple(st.nodes for st in layout.stages),
            {n: info.kv_capacity_bytes for n, info in layout.nodes.items()},
        )
        return cls(number, layout, predictor, ledger)

    def blocks(self, stage: int) -> tuple[int, int]:
        """The block range of the route's ``stage``-th hop on this plan."""
        st = self.layout.stages[stage]
        return st.start, st.end

    def join(self, request_id: int) -> None:
        self.requests.add(request_id)

    def leave(self, request_id: int) -> None:
        """The request left this plan (finished, or re-routed on a newer one)."""
        self.requests.discard(request_id)
        self.ledger.leave(request_id)
        if not self.current and not self.requests:
            self.drained.set()

    def supersede(self) -> None:
        """A newer plan takes new requests; this one drains."""
        self.current = False
        if not self.requests:
            self.drained.set()


class Generational:
    """The broker's side of the generations (mixed into :class:`testbed.broker.broker.Broker`,
    which sets ``gen``, ``past``, ``generational``, ``config``, ``health``, ``_node_slots``)."""

    gen: Generation
    past: list[Generation]
    generational: bool
    config: Any
    health: Any
    _node_slots: dict[str, NodeSlots]

    def now_s(self) -> float:
        raise NotImplementedError

    @property
    def layout(self) -> Layout:
        return self.gen.layout

    @property
    def predictor(self) -> WorkPredictor:
        return self.gen.predictor

    @property
    def ledger(self) -> Ledger:
        return self.gen.ledger

    def switch(self, layout: Layout, predictor: WorkPredictor) -> Generation:
        """New requests take ``layout`` from now on (its stage servers hold its blocks);
        requests in flight finish on theirs. The old generation (returned) drains."""
        old, self.gen = self.gen, successor(self.gen, layout, predictor)
        self.past.append(old)
        self.generational = True
        self.health.ledger = self.gen.ledger
        for n in layout.nodes:
            self._node_slots.setdefault(n, NodeSlots(self.config.max_inflight_per_node, self.now_s))
        old.supersede()
        return old


def successor(old: Generation, layout: Layout, predictor: WorkPredictor) -> Generation:
    """The next generation after ``old`` (down marks carried over)."""
    new = Generation.of(old.number + 1, layout, predictor)
    for name, why in old.ledger.down_nodes().items():
        if name in new.ledger.books:
            new.ledger.mark_down(name, why)
    return new


def routed_totals(gens: list[Generation]) -> dict[str, int]:
    """Requests routed to each node over every generation."""
    out: dict[str, int] = {}
    for g in gens:
        for n, b in g.ledger.books.items():
            out[n] = out.get(n, 0) + b.routed_total
    return out
