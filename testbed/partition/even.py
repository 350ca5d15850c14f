"""GPipe-style even split: equal block counts per tier, heterogeneity ignored (baseline).

GPipe balances partitions by cost on identical accelerators; the baseline the Hyperion paper
compares against (and ALGORITHMS.md's "GPipe (even)") gives every tier the same number of
blocks whatever its speed or memory. Ours: the remainder of N / T goes one block each to the
earliest tiers (edge first), so the split is deterministic. It does not adapt: when a tier's
share does not fit its memory this raises ``InfeasibleError`` naming the tier and the shortfall
instead of moving blocks (that is bsdp's job). With fewer blocks than tiers the first N tiers
get one block each and the rest stay empty, which needs ``allow_empty``.
"""

from __future__ import annotations

from dataclasses import dataclass

from testbed.partition._common import check_block_count, check_cuts_fit
from testbed.partition.base import PARTITIONERS, Partitioner, PartitionProblem, Split, split_cost


@PARTITIONERS.register("even")
@dataclass(frozen=True)
class Even(Partitioner):
    """GPipe-style equal block counts per tier (remainder to the earliest tiers); no adaptation."""

    include_transfer: bool = True  # only affects the reported bottleneck
    allow_empty: bool = False  # with N < T, leave the last tiers empty instead of failing

    def split(self, problem: PartitionProblem) -> Split:
        t, n = problem.num_tiers, problem.num_blocks
        check_block_count(problem, self.allow_empty)
        q, r = divmod(n, t)
        cuts = [0]
        for j in range(t):
            cuts.append(cuts[-1] + q + (1 if j < r else 0))
        check_cuts_fit(problem, cuts, "the even (GPipe-style) split")
        return Split(tuple(cuts), max(split_cost(problem, cuts, self.include_transfer)))
