"""HEFT-style per-block earliest-finish-time placement along the tier chain (baseline).

HEFT (Topcuoglu et al. 2002) ranks tasks by upward rank and puts each on the processor with the
earliest finish time. For a model the task graph is the chain of blocks, so the rank order is
simply block order, and the "processors" are the tiers in edge -> cloud order; a block may not
go back to an earlier tier (activations flow one way), so block i goes on a tier >= the tier of
block i-1. Ours (the adaptation to tiers): a single request's finish time

    finish_i = finish_{i-1} + hops(tier_{i-1} -> tier_i) + stage_time[tier_i][i]

where a hop from tier p to tier q > p costs ``transfer_time[k][i-1]`` summed over the links
k = p .. q-1 it crosses (0 when transfer is not counted, and 0 before block 0: the token ids
entering the pipeline are negligible). Ties go to the earlier tier (no transfer).

It greedily minimises one request's latency, not the pipeline's bottleneck: once the request
reaches the fastest tier, staying there never costs a transfer, so it piles nearly all blocks
onto the fastest reachable tier (and, with ``allow_empty``, leaves slower later tiers empty;
without it each remaining tier keeps the one block it must hold). That is why it is a useful
contrast to bsdp, which balances the tiers.

Memory is respected with a look-ahead: a tier is a candidate for block i only if the remaining
blocks can still be placed on the tiers after it (a reachability DP computed once), so the
greedy never runs into a dead end when some split fits; when none fits it raises
``InfeasibleError`` naming the binding tier.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from testbed.partition._common import (
    allowed_segments,
    check_block_count,
    cuts_from_tiers,
    infeasible_error,
    reach_backward,
    segment_mem,
)
from testbed.partition.base import PARTITIONERS, Partitioner, PartitionProblem, Split, split_cost


@PARTITIONERS.register("heft")
@dataclass(frozen=True)
class HEFT(Partitioner):
    """HEFT-style earliest-finish-time per block along the tier chain (greedy single-request latency)."""

    include_transfer: bool = True  # count link transfers in the finish times and the bottleneck
    allow_empty: bool = False  # may skip tiers (else every tier keeps >= 1 block)

    def split(self, problem: PartitionProblem) -> Split:
        t, n = problem.num_tiers, problem.num_blocks
        check_block_count(problem, self.allow_empty)
        allowed = allowed_segments(problem, segment_mem(problem), self.allow_empty)
        rest_fits = reach_backward(allowed)  # rest_fits[j][b]: blocks b.. fit on tiers j..
        if not rest_fits[0, 0]:
            raise infeasible_error(problem, self.allow_empty)
        tt = problem.transfer_time if self.include_transfer else None
        tiers: list[int] = []
        cur, start, finish = 0, 0, 0.0  # current tier, first block on it, finish time so far
        for i in range(n):
            if i == 0:
                options = range(t) if self.allow_empty else range(1)
            else:
                options = range(cur, t if self.allow_empty else min(cur + 2, t))
            best: tuple[float, int] | None = None
            for q in options:
                seg_start = start if (i > 0 and q == cur) else i
                # tier q holds seg_start..e-1 for some e > i, and blocks e.. fit on tiers q+1..
                if not (allowed[q][seg_start, i + 1 :] & rest_fits[q + 1][i + 1 :]).any():
                    continue
                hop = float(np.sum(tt[cur:q, i - 1])) if (tt is not None and i > 0) else 0.0
                eft = finish + hop + float(problem.stage_time[q, i])
                if best is None or eft < best[0]:
                    best = (eft, q)
            if best is None:  # pragma: no cover - the look-ahead keeps a completion open
                raise AssertionError(f"heft: no tier for block {i}")
            finish, q = best
            if i == 0 or q != cur:
                start = i
            cur = q
            tiers.append(q)
        cuts = cuts_from_tiers(tiers, t)
        return Split(cuts, max(split_cost(problem, cuts, self.include_transfer)))
