"""Exact single-request latency-optimal contiguous split (baseline: HEFT with full lookahead).

Ours (a standard shortest path, stated here so the baseline is exact): minimise one reference
request's end-to-end time with no other request in the system, :func:`request_latency`:

    input_time[first tier]  +  sum over blocks of stage_time[tier][block]
                            +  sum over links crossed of (transfer_time + hop_delay)

where stage_time is a block's compute for the whole reference request (prefill + every decode
step, as the planner's cost model defines it), transfer_time the link's occupancy by the
hidden states and hop_delay its one-way delay times the crossings. Each tier's term depends
only on its own range and its cut, so a DP over (tier, blocks placed) - a shortest path over
blocks x tiers - is exact in O(T*N^2); memory is respected per tier, each tier gets >= 1 block
unless ``allow_empty``. Ties: the smallest bottleneck (as :func:`split_cost` counts it), then the
lexicographically smallest cuts.

What it optimises and where it is weak: latency at idle, so it is the strongest load-unaware
baseline (HEFT is its greedy, one-block-lookahead version and can never beat it at idle); it
ignores the pipeline's rate, so on a heterogeneous chain it tends to put most blocks on the
tier that is fastest after paying the hops, and under load that tier saturates first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from testbed.partition._common import (
    allowed_segments,
    check_block_count,
    infeasible_error,
    reach_forward,
    segment_costs,
    segment_mem,
    segment_sums,
)
from testbed.partition.base import (
    PARTITIONERS,
    Partitioner,
    PartitionProblem,
    Split,
    link_costs,
    split_cost,
)


def min_latency_cuts(
    problem: PartitionProblem, include_transfer: bool = True, allow_empty: bool = False
) -> tuple[int, ...]:
    """Cuts of the split with the least :func:`request_latency` (see the module docstring)."""
    t, n = problem.num_tiers, problem.num_blocks
    check_block_count(problem, allow_empty)
    allowed = allowed_segments(problem, segment_mem(problem), allow_empty)
    if not reach_forward(allowed)[t, n]:
        raise infeasible_error(problem, allow_empty)
    links = link_costs(problem, include_transfer)
    # seg[j][a][b]: tier j holds a..b-1 and then pays its link at cut b
    seg = np.where(allowed, segment_sums(problem.stage_time) + links[:, None, :], np.inf)
    occ = np.where(allowed, segment_costs(problem, include_transfer), np.inf)  # split_cost's
    # best[j][a]: (latency, bottleneck) of the best placement of blocks a.. on tiers j..,
    # compared lexicographically; found by a suffix DP, then a forward walk (first argmin).
    lat = np.full((t + 1, n + 1), np.inf)
    bott = np.full((t + 1, n + 1), np.inf)
    lat[t, n], bott[t, n] = 0.0, 0.0
    for j in range(t - 1, -1, -1):
        cand_lat = seg[j] + lat[j + 1][None, :]
        cand_bott = np.maximum(occ[j], bott[j + 1][None, :])
        for a in range(n + 1):
            k = _argbest(cand_lat[a], cand_bott[a])
            lat[j, a], bott[j, a] = cand_lat[a, k], cand_bott[a, k]
    cuts, a = [0], 0
    for j in range(t):
        a = _argbest(seg[j][a] + lat[j + 1], np.maximum(occ[j][a], bott[j + 1]))
        cuts.append(a)
    if cuts[-1] != n or not np.isfinite(lat[0, 0]):  # pragma: no cover - invariant
        raise AssertionError(f"min_latency reconstruction failed: cuts {cuts}")
    return tuple(cuts)


def _argbest(lat: np.ndarray, bott: np.ndarray) -> int:
    """First index with the least latency (up to float noise), then the least bottleneck."""
    lo = float(lat.min())
    if not np.isfinite(lo):
        return int(np.argmin(lat))
    near = np.flatnonzero(lat <= lo + 1e-12 * max(1.0, abs(lo)))
    return int(near[np.argmin(bott[near])])


@PARTITIONERS.register("min_latency")
@dataclass(frozen=True)
class MinLatency(Partitioner):
    """Exact single-request latency-optimal split (shortest path over blocks x tiers; load-unaware)."""

    include_transfer: bool = True  # count link occupancy, delays and the input's hops
    allow_empty: bool = False  # may skip tiers (else every tier keeps >= 1 block)

    def split(self, problem: PartitionProblem) -> Split:
        cuts = min_latency_cuts(problem, self.include_transfer, self.allow_empty)
        return Split(cuts, max(split_cost(problem, cuts, self.include_transfer)))
