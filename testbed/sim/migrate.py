"""Adaptive re-partitioning in simulated time (``repartition:``, :mod:`testbed.spec.repartition`).

Every ``every`` seconds the :class:`Repartitioner` measures the state (each link as the
timeline's events so far left it; each node's speed from the scheduler's capacity estimates,
ARTS's C_hat) and asks :func:`testbed.cost.replan.decide`. When it says migrate, at time t:

- every node of the new plan loads the weights of the blocks it did not hold, all in parallel
  at ``load_bandwidth`` (:func:`testbed.cost.replan.migration_cost`); requests keep taking the
  current plan meanwhile;
- at t + load time the new plan becomes current (a new :class:`Generation` of the engine): new
  admissions take it, requests in flight finish on the old one. Until the old plan's last
  request leaves, a node holds the union of its old and new blocks, so its KV capacity is its
  memory minus that union;
- when the old plan has drained its blocks are unloaded: KV capacities are the new plan's.

Each plan keeps its own ledger, so during the overlap the scheduler's view for new requests
counts the new plan's queued work only (the nodes' real queues hold both; ours, a
simplification). One migration at a time: checks that fall while one is loading or draining are skipped (and
recorded as such). Every check is recorded (when, the decision and why, old and new cuts,
predicted bottlenecks); a migration also its load time, switch and drain times, and each node's
memory during the overlap (weights of both ranges + KV held at the switch, against its device
memory). Migrations are also listed with the timeline's events (``kind: replan``), so plots
and the Perfetto trace mark them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from testbed.broker.layout import Layout, WorkPredictor
from testbed.cost.model import CostModel
from testbed.cost.replan import (
    Confirmation,
    MeasuredState,
    decide,
    measured_topology,
    migration_cost,
)
from testbed.schedule.ledger import Ledger
from testbed.sim.links import Network, Pipe
from testbed.sim.reference import Generation, ReferenceSimulator, _Node
from testbed.sim.steps import CalibratedProfile, StepTimes, planner_times
from testbed.spec.plan import Plan, RequestShape
from testbed.spec.repartition import RepartitionSpec
from testbed.spec.timeline import TimelineEvent
from testbed.spec.topology import LinkSpec, Topology


@dataclass
class Repartitioner:
    """Checks, decides and migrates on one :class:`ReferenceSimulator` (see the module doc)."""

    spec: RepartitionSpec
    topology: Topology
    cost: CostModel
    shape: RequestShape
    plan: Plan  # the run's first plan
    events: Sequence[TimelineEvent] = ()  # the scenario's timeline (for the measured links)
    calibrated: CalibratedProfile | None = None
    overhead_s: float = 0.0  # per stage call (the Network's)
    checks: list[dict[str, Any]] = field(default_factory=list)
    migrations: list[dict[str, Any]] = field(default_factory=list)

    def install(self, sim: ReferenceSimulator) -> None:
        self._sim = sim
        self._cuts = tuple(self.plan.cuts)
        self._busy = False  # a migration is loading or draining
        self._confirm = Confirmation(self.spec.confirm)
        self._pipes: dict[int, tuple[Pipe, Pipe]] = {}
        sim.net.share(self._pipes, [st.tier_index for st in sim.layout.stages])
        sim.on_drained = self._drained
        sim.at(self.spec.every_s, self._check)

    def markers(self) -> list[dict[str, Any]]:
        """The migrations as timeline entries (plot markers, Perfetto instants)."""
        return [
            {"at_s": m["decided_s"], "applied_s": m["decided_s"], "kind": "replan",
             "what": f"re-plan {m['old_cuts']} -> {m['new_cuts']} (load {m['load_s']:.3g}s)"}
            for m in self.migrations
        ]  # fmt: skip

    def summary(self) -> dict[str, Any]:
        return {
            "spec": self.spec.model_dump(mode="json"),
            "checks": self.checks,
            "migrations": self.migrations,
        }

    # -- measure and decide ---------------------------------------------------------------------
    def links_at(self, now: float) -> tuple[LinkSpec, ...]:
        """Every inter-tier link as the timeline's events up to ``now`` left it."""
        links = [self.topology.uplink(j) for j in range(len(self.topology.tiers) - 1)]
        names = self.topology.tier_names
        for ev in sorted(self.events, key=lambda e: e.at_s):
            if ev.kind == "link" and ev.at_s <= now:
                j = min(names.index(ev.tiers[0]), names.index(ev.tiers[1]))
                old = links[j]
                assert old is not None
                links[j] = ev.apply_to_link(old)
        return tuple(ln for ln in links if ln is not None)

    def _check(self, sim: ReferenceSimulator, now: float) -> None:
        if sim._heap:  # more to come: the next check
            sim.at(now + self.spec.every_s, self._check)
        if self._busy:
            self.checks.append({"at_s": now, "migrate": False, "reason": "a migration is running"})
            return
        estimates = getattr(sim.scheduler, "capacity_estimates", None)
        speed = estimates() if callable(estimates) else {}
        state = MeasuredState(self.links_at(now), speed)
        d = decide(self._cuts, self.topology, self.cost, self.shape, state,
                   threshold=self.spec.threshold, allow_empty=self.spec.allow_empty,
                   node_block_s=planner_times(self.calibrated))  # fmt: skip
        self.checks.append(
            {"at_s": now, "migrate": d.migrate, "reason": d.reason, "old_cuts": list(d.old_cuts),
             "new_cuts": list(d.new_cuts), "old_bottleneck_s": d.old_bottleneck_s,
             "new_bottleneck_s": d.new_bottleneck_s, "node_speed": dict(sorted(speed.items()))}
        )  # fmt: skip
        if not self._confirm(d.migrate, d.new_cuts, self.checks[-1]):
            return
        topo = measured_topology(self.topology, state.links)
        layout = Layout.from_plan(d.plan, topo, {n.name: f"sim://{n.name}" for _, n in topo.nodes()},
                                  self.cost)  # fmt: skip
        old = _ranges(sim.layout)
        cost = migration_cost(self.cost, old, _ranges(layout), self.spec.load_bandwidth_Bps)
        self._busy = True
        self.migrations.append(
            {"decided_s": now, "reason": d.reason, "old_cuts": list(d.old_cuts),
             "new_cuts": list(d.new_cuts), "predicted_old_s": d.old_bottleneck_s,
             "predicted_new_s": d.new_bottleneck_s, "load_s": cost.load_s,
             "load_bytes": cost.load_bytes, "switched_s": None, "drained_s": None,
             "overlap_memory": {}}
        )  # fmt: skip
        self._cuts = d.new_cuts
        sim.at(now + cost.load_s, partial(self._switch, layout=layout, overlap=cost))

    # -- act ------------------------------------------------------------------------------------
    def _switch(self, sim: ReferenceSimulator, now: float, *, layout: Layout, overlap: Any) -> None:
        """The new blocks are loaded: new admissions take the new plan from now on."""
        net = Network(layout.hop_links, overhead_s=self.overhead_s)
        net.share(self._pipes, [st.tier_index for st in layout.stages])
        ledger = Ledger(
            tuple(st.nodes for st in layout.stages),
            {n: info.kv_capacity_bytes for n, info in layout.nodes.items()},
        )
        for name, why in sim.ledger.down_nodes().items():  # still down under the new plan
            if name in ledger.books:
                ledger.mark_down(name, why)
        pred = WorkPredictor(layout, self.cost)
        steps = StepTimes(layout, self.cost, self.calibrated)
        old = sim.gen
        memory = {}
        for name, weights in overlap.overlap_weight_bytes.items():
            _, spec = self.topology.node(name)
            node = sim.nodes.get(name)
            if node is None:
                info = layout.nodes[name]
                node = sim.nodes[name] = _Node(name, info.stage, 0, self._slowdown(sim, name, now))
            mem = int(spec.device.mem)
            node.kv_cap = max(0, mem - weights)
            memory[name] = {"weights_bytes": weights, "kv_used_bytes": node.kv_used,
                            "mem_bytes": mem, "fits": weights + node.kv_used <= mem}  # fmt: skip
        sim.use(Generation(len(sim.gens), layout, pred, steps, net, ledger))
        m = self.migrations[-1]
        m["switched_s"], m["overlap_memory"] = now, memory
        if old.active == 0:
            self._drained(old, now)

    def _drained(self, gen: Generation, now: float) -> None:
        """The old plan (``gen``) has no request left: its blocks are unloaded."""
        sim = self._sim
        for name, node in sim.nodes.items():
            info = sim.layout.nodes.get(name)
            if info is not None and name in gen.layout.nodes:
                node.kv_cap = info.kv_capacity_bytes
                sim._wake_kv(node, now)  # the freed memory may let waiting caches in
        self.migrations[-1]["drained_s"] = now
        self._busy = False

    def _slowdown(self, sim: ReferenceSimulator, name: str, now: float) -> float:
        """A node new to the run: its configured slowdown, over the last speed event so far."""
        base = float(sim.config.slowdown.get(name, 1.0))
        speeds = [e.speed for e in sorted(self.events, key=lambda e: e.at_s)
                  if e.node == name and e.at_s <= now and e.speed is not None]  # fmt: skip
        return base / speeds[-1] if speeds else base


def _ranges(layout: Layout) -> dict[str, tuple[int, int]]:
    return {n: (st.start, st.end) for st in layout.stages for n in st.nodes}
