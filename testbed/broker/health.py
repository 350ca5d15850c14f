"""Which nodes answer: the probe at start, marking a node down, and re-admitting it.

A node that does not answer a step (timeout, refused, reset) is marked down by the broker
(:meth:`NodeHealth.mark_down`); every ``probe_interval_s`` the nodes marked down are
health-checked (:meth:`NodeHealth.readmit_down_nodes`), and one that answers is re-admitted:
the ledger marks it up and the scheduler hears ``on_node_change``. Every change is a
:class:`~testbed.broker.state.NodeEvent` on the run clock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from testbed.broker.state import BrokerConfig, NodeEvent
from testbed.broker.transport import StageError, StageTransport
from testbed.schedule.base import Scheduler
from testbed.schedule.ledger import Ledger

log = logging.getLogger(__name__)


class NodeHealth:
    """The broker's view of which nodes are up; the ledger holds the state, this class the
    probing and the events."""

    def __init__(
        self,
        ledger: Ledger,
        transport: StageTransport,
        scheduler: Scheduler,
        config: BrokerConfig,
        now_s: Callable[[], float],
        on_event: Callable[[NodeEvent], None] | None = None,
    ) -> None:
        self.ledger = ledger
        self.transport = transport
        self.scheduler = scheduler
        self.config = config
        self.now_s = now_s
        self.on_event = on_event
        self.events: list[NodeEvent] = []

    async def probe_at_start(self, names: Sequence[str]) -> None:
        """Health-check every node at once; one that does not answer is marked down."""
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
                self.mark_down(name, "not healthy at start", at_s=0.0)

    def mark_down(self, node: str, reason: str, at_s: float | None = None) -> None:
        """Take ``node`` out of routing (once; a node already down is left as it is)."""
        if self.ledger.mark_down(node, reason):
            ev = NodeEvent(node, self.now_s() if at_s is None else at_s, False, reason)
            log.warning("node %s marked down: %s", node, reason)
            self._tell(ev)

    async def readmit_down_nodes(self) -> None:
        """Every ``probe_interval_s``, until cancelled: a node marked down whose health check
        answers again is re-admitted (the ledger marks it up; the scheduler hears
        ``on_node_change``)."""
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
                    log.warning("node %s re-admitted", node)
                    self._tell(ev)

    def _tell(self, ev: NodeEvent) -> None:
        self.events.append(ev)
        self.scheduler.on_node_change(ev.node, ev.up, ev.at_s)
        if self.on_event is not None:
            self.on_event(ev)
