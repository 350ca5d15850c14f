"""BSDP: Hyperion's Stage 1 (binary search + DP), exact, in the general form of ALGORITHMS.md.

From the paper (Hyperion, arXiv 2511.14450, "BSDP" / v2 "HypSplit-DP"): choose cuts
``p_1 < ... < p_{T-1}`` over the N decoder blocks so that the slowest tier's compute time is
minimal, every tier gets >= 1 block and every tier's segment fits its memory; each tier is one
effective node; the method is a binary search over the bottleneck value with a DP feasibility
check. Inter-tier latency is a constant there and drops out of the cut choice: that special
case is ``transfer_time=None``.

Ours (the paper's method section is not at hand, so these are our reconstruction):

* ``transfer_time[j][i]`` per tier and block, charged to the sending tier's cost (a tier that
  ends at block b-1 < N-1 pays shipping b-1's output); Hyperion treats it as a constant.
* ``allow_empty``: tiers may hold no block (cost 0, no memory).
* Exactness: the optimum bottleneck is one of the finitely many segment costs, so we bisect over
  the sorted set of the costs of all memory-feasible segments (at most T*(N+1)*N/2 values), not
  over a float interval with a tolerance. Feasibility of a bound tau is a reachability DP over
  (tier, blocks placed): O(T*N^2) boolean work per probe, vectorised with numpy.
* Ties: among all splits with the optimal bottleneck, we return the one with the smallest
  *total* cost (the sum of tier costs: a single request's latency through the pipeline), and
  among those the lexicographically smallest cut tuple (earlier cuts first: fewer blocks on
  the early tiers). Found by a min-sum suffix DP restricted to segments of cost <= tau*.
* Arithmetic: segment costs are summed once per segment in float64 and compared exactly. The
  returned ``bottleneck`` is recomputed with :func:`testbed.partition.base.split_cost`, so it
  agrees bit for bit with that definition (it may differ from the internal sum by an ulp).
* Cost: O(T*N^2) time and memory (the segment-cost matrices), a few ms for 200 x 5 (see
  ``benchmarks/bench_bsdp.py``); a topology of any size reduces to T effective nodes first.
* When no split fits memory the error names the binding tier (the one whose enlargement alone
  would fix it at the least cost) and its shortfall in bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from testbed.partition._common import (
    allowed_segments,
    check_block_count,
    infeasible_error,
    reach_forward,
    segment_costs,
    segment_mem,
)
from testbed.partition.base import PARTITIONERS, Partitioner, PartitionProblem, Split, split_cost

ArrayLike2D = Sequence[Sequence[float]] | np.ndarray
ArrayLike1D = Sequence[float] | np.ndarray


def solve_split(
    stage_time: ArrayLike2D,
    layer_mem: ArrayLike1D,
    tier_mem: ArrayLike1D,
    transfer_time: ArrayLike2D | None = None,
    allow_empty: bool = False,
    *,
    tier_names: Sequence[str] = (),
) -> Split:
    """Optimal contiguous split of N blocks over T tiers (minimise the slowest tier's cost).

    ``stage_time`` and ``transfer_time`` are T x N (seconds), ``layer_mem`` N entries and
    ``tier_mem`` T entries (bytes); any array-likes of finite values >= 0. Transfer is counted
    iff ``transfer_time`` is given. Returns ``Split(cuts, bottleneck)`` with ``cuts`` a tuple of
    T+1 python ints (``0 = c_0 < ... < c_T = N``, ``<=`` with ``allow_empty``) and
    ``bottleneck`` = max over tiers of ``split_cost``. Ties are broken by the smallest total
    cost, then the lexicographically smallest cuts.

    Raises ``InfeasibleError`` (also a ``TestbedError`` and a ``ValueError``) when no split fits
    memory or there are fewer blocks than tiers without ``allow_empty``, naming the binding tier
    (by ``tier_names`` when given) and its shortfall; ``ValueError`` for malformed arrays.
    """
    problem = PartitionProblem.from_arrays(
        stage_time, layer_mem, tier_mem, transfer_time, tier_names
    )
    return solve_problem(problem, include_transfer=True, allow_empty=allow_empty)


def solve_problem(
    problem: PartitionProblem, *, include_transfer: bool = True, allow_empty: bool = False
) -> Split:
    """:func:`solve_split` on a :class:`PartitionProblem` (transfer counted when
    ``include_transfer`` and the problem has a ``transfer_time``)."""
    t, n = problem.num_tiers, problem.num_blocks
    check_block_count(problem, allow_empty)
    allowed = allowed_segments(problem, segment_mem(problem), allow_empty)
    if not reach_forward(allowed)[t, n]:
        raise infeasible_error(problem, allow_empty)
    cost = np.where(allowed, segment_costs(problem, include_transfer), np.inf)

    # Candidate bottlenecks: every memory-feasible segment's cost. The optimum is one of them and
    # the largest is feasible (a memory-feasible split exists), so bisect for the smallest
    # feasible candidate: exact, about log2(T*N^2/2) probes.
    cands = np.unique(cost[np.isfinite(cost)])
    lo, hi = 0, len(cands) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if _feasible(cost, float(cands[mid])):
            hi = mid
        else:
            lo = mid + 1
    tau = float(cands[lo])
    cuts = _min_total_lexmin(cost, tau)
    return Split(cuts, max(split_cost(problem, cuts, include_transfer)))


def _feasible(cost: np.ndarray, tau: float) -> bool:
    """Can all blocks be placed with every tier's (allowed) segment cost <= tau?"""
    t, n1, _ = cost.shape
    reach = np.zeros(n1, dtype=bool)
    reach[0] = True
    for j in range(t - 1):
        reach = (cost[j][reach] <= tau).any(axis=0)
        if not reach.any():
            return False
    return bool((cost[t - 1][reach, n1 - 1] <= tau).any())


def _min_total_lexmin(cost: np.ndarray, tau: float) -> tuple[int, ...]:
    """Among splits whose segments all cost <= tau: the smallest total, then the
    lexicographically smallest cuts (suffix DP, then a forward walk taking the first argmin)."""
    t, n1, _ = cost.shape
    capped = np.where(cost <= tau, cost, np.inf)
    best = np.full((t + 1, n1), np.inf)  # best[j][a]: min total of blocks a.. on tiers j..
    best[t, n1 - 1] = 0.0
    for j in range(t - 1, -1, -1):
        best[j] = (capped[j] + best[j + 1][None, :]).min(axis=1)
    cuts = [0]
    a = 0
    for j in range(t):
        a = int(np.argmin(capped[j][a] + best[j + 1]))  # first index = smallest cut
        cuts.append(a)
    if cuts[-1] != n1 - 1 or not np.isfinite(best[0, 0]):  # pragma: no cover - invariant
        raise AssertionError(f"BSDP reconstruction failed: cuts {cuts}, tau {tau}")
    return tuple(cuts)


@PARTITIONERS.register("bsdp")
@dataclass(frozen=True)
class BSDP(Partitioner):
    """Hyperion's BSDP: exact min-bottleneck contiguous split (binary search + DP), memory-aware."""

    include_transfer: bool = True  # charge each tier the transfer of its last block's output (ours)
    allow_empty: bool = False  # let tiers hold no block (ours; the paper requires >= 1)

    def split(self, problem: PartitionProblem) -> Split:
        return solve_problem(
            problem, include_transfer=self.include_transfer, allow_empty=self.allow_empty
        )
