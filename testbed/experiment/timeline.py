"""Drive a scenario's timeline against a running testbed, on the replay's clock.

Each event fires at its absolute time ``t0 + at`` on the broker's run clock (never a chain of
sleeps, so a slow event does not shift the next ones) and acts through the runtime interface
(:mod:`testbed.runtime.control`), the same for every runtime:

- link: the link's new values, in place, on every node it feeds, both directions;
- down crash: the node's stage server killed; down partition: all its traffic dropped;
- up: restarted (blocks loaded anew, link shaped as it is now) or healed; the broker
  re-admits the node once its health check answers (its own probe, not told);
- speed: an emulated device's step windows / speed (its stage's POST /speed); a real node's
  CPU quota x speed (locally: a SIGSTOP/SIGCONT duty cycle);
- rate_scale: already in the arrival times (:func:`testbed.spec.timeline.scale_arrivals`).

A failed step aborts the run (an unapplied change would invalidate the results). Every
applied event is recorded (:class:`AppliedEvent`) for ``summary.json``, the plots and the
trace.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from testbed.errors import RuntimeBackendError
from testbed.runtime import control
from testbed.spec.timeline import TimelineEvent

if TYPE_CHECKING:
    from testbed.runtime.base import RunningTestbed
    from testbed.spec.topology import LinkSpec, Topology


@dataclass(frozen=True)
class AppliedEvent:
    """One timeline event as it happened on the run clock."""

    at_s: float  # when the timeline asked for it
    applied_s: float  # when it was in force (run clock)
    kind: str
    what: str
    detail: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {
            "at_s": self.at_s,
            "applied_s": self.applied_s,
            "kind": self.kind,
            "what": self.what,
        } | self.detail


class LinkState:
    """The topology's inter-tier links as they are now (changed by link events)."""

    def __init__(self, topology: Topology) -> None:
        self.tiers = topology.tier_names
        self.links: list[LinkSpec] = []
        for j in range(len(self.tiers) - 1):
            link = topology.uplink(j)
            assert link is not None
            self.links.append(link)

    def index(self, a: str, b: str) -> int:
        return min(self.tiers.index(a), self.tiers.index(b))

    def feeding(self, tier_index: int) -> LinkSpec | None:
        return self.links[tier_index - 1] if tier_index > 0 else None


class TimelineApplier:
    """Fires ``events`` against ``tb`` at their times on the run clock ``now_s``."""

    def __init__(
        self,
        tb: RunningTestbed,
        topology: Topology,
        events: Sequence[TimelineEvent],
        *,
        on_event: Callable[[AppliedEvent], None] | None = None,
    ) -> None:
        self.tb = tb
        self.events = sorted(events, key=lambda e: e.at_s)  # stable: file order at one time
        self.links = LinkState(topology)
        self.applied: list[AppliedEvent] = []
        self.on_event = on_event
        self._down: dict[str, str] = {}  # node -> crash | partition

    async def run(self, now_s: Callable[[], float]) -> None:
        """Apply every event when the run clock ``now_s()`` reaches its ``at`` (each wait is
        measured from the clock's start, not from the previous event); returns after the
        last (the caller cancels it when the replay ends first)."""
        for ev in self.events:
            delay = ev.at_s - now_s()
            if delay > 0:
                await asyncio.sleep(delay)
            detail = await self.apply(ev)
            rec = AppliedEvent(ev.at_s, now_s(), ev.kind, ev.describe(), detail)
            self.applied.append(rec)
            if self.on_event is not None:
                self.on_event(rec)

    async def apply(self, ev: TimelineEvent) -> dict[str, Any]:
        tb = self.tb
        try:
            if ev.kind == "link":
                a, b = ev.tiers
                j = self.links.index(a, b)
                old = self.links.links[j]
                new = ev.apply_to_link(old)
                src, dst = self.links.tiers[j], self.links.tiers[j + 1]
                await control.set_link(tb, src, dst, new, previous=old)
                self.links.links[j] = new
                return {"bandwidth_bps": new.bandwidth_bps, "delay_s": new.delay_s,
                        "jitter_s": new.jitter_s, "loss_pct": new.loss_pct}  # fmt: skip
            if ev.kind == "rate_scale":
                return {"rate_scale": ev.rate_scale, "note": "applied to the arrival times"}
            node = ev.node
            assert node is not None
            if node not in tb.nodes:  # holds no blocks in this plan: not running
                return {"node": node, "note": "node not running in this plan; nothing to do"}
            link = self.links.feeding(tb.nodes[node].tier_index)
            if ev.kind == "down":
                assert ev.down is not None
                if ev.down == "crash":
                    await control.crash_node(tb, node)
                else:
                    await control.partition_node(tb, node, True, link)
                self._down[node] = ev.down
                return {"node": node, "down": ev.down}
            if ev.kind == "up":
                how = self._down.pop(node, "crash")
                if how == "crash":
                    await control.restart_node(tb, node, link)
                else:
                    await control.partition_node(tb, node, False, link)
                return {"node": node, "up": True, "was": how}
            assert ev.speed is not None
            crashed = self._down.get(node) == "crash"
            await control.set_node_speed(tb, node, ev.speed, crashed=crashed)
            ep = tb.nodes[node]
            if ep.emulated:  # its stage paces at the new speed (from its restart if crashed)
                return {"node": node, "speed": ev.speed, "emulated": True}
            return {"node": node, "speed": ev.speed, "cpus": ep.cpus}
        except RuntimeBackendError as exc:
            raise RuntimeBackendError(
                f"timeline event at {ev.at_s:g}s ({ev.describe()}) failed: {exc}"
            ) from exc
