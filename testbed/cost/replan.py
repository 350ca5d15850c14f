"""Adaptive re-partitioning's decision (pure): re-solve the split on the measured state and
say whether migrating to it is worth it.

The measured state is what a run observes now: every inter-tier link's bandwidth and delay (in
the simulator, the link parameters after the timeline's events) and every node's speed relative
to the cost model's prediction (the capacity estimates C_hat ARTS learns from completions; 1
for a node with none). Both the current split and the candidate are priced on that state with
BSDP's objective (the slowest tier's compute plus its transfer, :func:`split_cost`), so the
comparison is like for like. The candidate is BSDP's optimum there (``allow_empty`` lets it
leave a tier without blocks: the only way around a slow link, since every cut between two
non-empty tiers ships the same hidden states over it). Migrate when the predicted bottleneck
improves by at least ``threshold`` (a fraction).

What a migration costs (:func:`migration_cost`): each node loads the weights of the blocks it
did not hold (those it already holds are reused), all nodes in parallel at ``load_Bps``; until
the old plan's requests have drained a node holds the union of its old and new blocks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from testbed.cost.model import CostModel
from testbed.cost.planner import NodeBlockFn, build_problem, make_plan
from testbed.partition.base import split_cost
from testbed.partition.bsdp import BSDP
from testbed.spec.plan import Plan, RequestShape
from testbed.spec.topology import LinkSpec, Topology

Ranges = Mapping[str, tuple[int, int]]  # node -> its blocks [start, end)


@dataclass(frozen=True)
class MeasuredState:
    links: tuple[LinkSpec, ...]  # per tier j -> j+1, as observed now
    node_speed: Mapping[str, float] = field(default_factory=dict)  # x predicted (absent: 1)


@dataclass(frozen=True)
class ReplanDecision:
    migrate: bool
    reason: str
    old_cuts: tuple[int, ...]
    new_cuts: tuple[int, ...]
    old_bottleneck_s: float  # the current split, priced on the measured state
    new_bottleneck_s: float  # the candidate, priced the same way
    plan: Plan  # the candidate on the measured topology

    @property
    def improvement(self) -> float:
        """Predicted bottleneck reduction as a fraction of the current one (0.25: 25% faster)."""
        old = self.old_bottleneck_s
        return 0.0 if old <= 0 else (old - self.new_bottleneck_s) / old


def measured_topology(topology: Topology, links: Sequence[LinkSpec]) -> Topology:
    """``topology`` with its inter-tier links as measured (``links[j]``: tier j -> j+1)."""
    if len(links) != len(topology.tiers) - 1:
        raise ValueError(f"need {len(topology.tiers) - 1} links, got {len(links)}")
    names = topology.tier_names
    new = []
    for link in topology.links:
        j = min(names.index(link.src), names.index(link.dst))
        m = links[j]
        new.append(
            link.model_copy(
                update={
                    "bandwidth_bps": m.bandwidth_bps,
                    "delay_s": m.delay_s,
                    "jitter_s": min(m.jitter_s, m.delay_s),
                    "loss_pct": m.loss_pct,
                }
            )
        )
    return topology.model_copy(update={"links": tuple(new)})


def decide(
    current_cuts: Sequence[int],
    topology: Topology,
    cost: CostModel,
    shape: RequestShape,
    state: MeasuredState,
    *,
    threshold: float,
    allow_empty: bool = True,
    node_block_s: NodeBlockFn | None = None,
) -> ReplanDecision:
    """Re-solve BSDP on the measured state; migrate iff the bottleneck improves by >= threshold."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be a fraction in (0, 1], got {threshold!r}")
    topo = measured_topology(topology, state.links)
    speed = {n: s for n, s in state.node_speed.items() if s > 0}
    problem, _ = build_problem(topo, cost, shape, node_block_s, speed)
    old = tuple(int(c) for c in current_cuts)
    if len(old) != problem.num_tiers + 1 or old[-1] != problem.num_blocks:
        raise ValueError(f"cuts {old} do not split {problem.num_blocks} blocks over the tiers")
    plan = make_plan(topo, cost, BSDP(allow_empty=allow_empty), shape,
                     node_block_s=node_block_s, node_speed=speed)  # fmt: skip
    old_s = max(split_cost(problem, old))
    new_s = max(split_cost(problem, plan.cuts))
    d = ReplanDecision(False, "", old, plan.cuts, old_s, new_s, plan)
    gain = d.improvement
    what = f"bottleneck {old_s:.3g}s -> {new_s:.3g}s ({-100 * gain:+.1f}%)"
    if plan.cuts == old:
        reason = f"the current split {list(old)} is still the best ({old_s:.3g}s)"
    elif gain >= threshold:
        reason = f"{what} >= {100 * threshold:g}% better: migrate {list(old)} -> {list(plan.cuts)}"
    else:
        reason = f"{what}: below the {100 * threshold:g}% threshold, keep {list(old)}"
    return ReplanDecision(plan.cuts != old and gain >= threshold, reason, old, plan.cuts,
                          old_s, new_s, plan)  # fmt: skip


def range_weight_bytes(cost: CostModel, start: int, end: int) -> int:
    """Weight bytes of blocks start..end-1 (the embedding with block 0, the head with the last)."""
    if end <= start:
        return 0
    p = cost.profile
    nbytes = (end - start) * p.block_weight_bytes()
    nbytes += p.embed_weight_bytes() if start == 0 else 0
    nbytes += p.head_weight_bytes() if end == p.num_blocks else 0
    return int(nbytes)


def _new_blocks(cost: CostModel, old: tuple[int, int] | None, new: tuple[int, int]) -> int:
    """Weight bytes of ``new``'s blocks not in ``old`` (the embedding and head counted once)."""
    if old is None or old[1] <= old[0]:
        return range_weight_bytes(cost, *new)
    lo, hi = max(old[0], new[0]), min(old[1], new[1])
    if hi <= lo:
        return range_weight_bytes(cost, *new)
    return range_weight_bytes(cost, *new) - range_weight_bytes(cost, lo, hi)


@dataclass(frozen=True)
class MigrationCost:
    load_bytes: dict[str, int]  # node -> weight bytes it loads
    load_s: float  # the slowest node's load (nodes load in parallel)
    overlap_weight_bytes: dict[str, int]  # node -> weights it holds until the old plan drains


def migration_cost(cost: CostModel, old: Ranges, new: Ranges, load_Bps: float) -> MigrationCost:
    """What moving from ``old`` to ``new`` block ranges costs (module docstring)."""
    if load_Bps <= 0:
        raise ValueError(f"load_Bps must be > 0, got {load_Bps!r}")
    load = {n: _new_blocks(cost, old.get(n), r) for n, r in sorted(new.items())}
    overlap = {}
    for n in sorted(set(old) | set(new)):
        a, b = old.get(n, (0, 0)), new.get(n, (0, 0))
        overlap[n] = range_weight_bytes(cost, *a) + (_new_blocks(cost, a, b) if b[1] > b[0] else 0)
    return MigrationCost(load, max(load.values(), default=0) / load_Bps, overlap)


@dataclass
class Confirmation:
    """``repartition: confirm``: a migration goes ahead once ``need`` checks in a row proposed
    the same new split (damping for noisy measurements; 1: at once)."""

    need: int = 1
    _cuts: tuple[int, ...] | None = None
    _count: int = 0

    def __call__(self, migrate: bool, cuts: tuple[int, ...], check: dict[str, Any]) -> bool:
        """Whether a check that says ``migrate`` to ``cuts`` goes ahead; a wait is noted in
        ``check`` (its ``migrate`` set false, the count added to its ``reason``)."""
        if not migrate:
            self._cuts, self._count = None, 0
            return False
        self._count = self._count + 1 if self._cuts == cuts else 1
        self._cuts = cuts
        if self._count < self.need:
            check["migrate"] = False
            check["reason"] += f" (proposed {self._count} of {self.need} checks in a row: wait)"
            return False
        self._cuts, self._count = None, 0
        return True


def normalized_speed(
    estimates: Mapping[str, float], nodes: Sequence[str], band: float = 2.0
) -> dict[str, float]:
    """Every node's speed relative to the median of the measured ones, counted when it is at
    least ``band`` times off (1 otherwise, and for a node without an estimate). A factor common
    to every node (a cost model off by a constant, e.g. the per-call overhead of a tiny model
    on a busy host) is taken out, and so is the noise of a few steps' timings: a re-plan moves
    blocks for nodes clearly slower or faster than the others, and for the links."""
    got = sorted(v for n, v in estimates.items() if n in nodes and v > 0)
    if not got:
        return {}
    k = len(got) // 2
    mid = got[k] if len(got) % 2 else (got[k - 1] + got[k]) / 2
    out = {}
    for n in nodes:
        r = estimates.get(n, 0.0) / mid
        out[n] = r if r > 0 and (r >= band or r <= 1 / band) else 1.0
    return out
