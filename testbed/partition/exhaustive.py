"""Brute-force reference: try every cut tuple (for checks and tiny instances only).

Ours, not from a paper. Enumerates all C(N-1, T-1) splits with non-empty tiers (all
C(N+T-1, T-1) non-decreasing cut tuples with ``allow_empty``), keeps those that fit memory, costs each
with :func:`split_cost`, and returns the one with the smallest bottleneck, then the smallest
total cost, then the lexicographically smallest cuts - the same rule as bsdp, so the two must
agree wherever the float sums agree (always, for integer-valued times). Refuses instances with
more than ``max_splits`` splits instead of running for hours.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from testbed.errors import ConfigError
from testbed.partition._common import check_block_count, infeasible_error, segment_mem
from testbed.partition.base import PARTITIONERS, Partitioner, PartitionProblem, Split, split_cost


def count_splits(num_blocks: int, num_tiers: int, allow_empty: bool) -> int:
    """Number of cut tuples (non-empty tiers: C(N-1, T-1); else C(N+T-1, T-1))."""
    if allow_empty:
        return math.comb(num_blocks + num_tiers - 1, num_tiers - 1)
    return math.comb(num_blocks - 1, num_tiers - 1) if num_blocks >= num_tiers else 0


@PARTITIONERS.register("exhaustive")
@dataclass(frozen=True)
class Exhaustive(Partitioner):
    """Brute force over every cut tuple (reference for small instances; same tie rule as bsdp)."""

    include_transfer: bool = True
    allow_empty: bool = False
    max_splits: int = 200_000  # refuse larger instances (use bsdp)

    def split(self, problem: PartitionProblem) -> Split:
        t, n = problem.num_tiers, problem.num_blocks
        check_block_count(problem, self.allow_empty)
        total = count_splits(n, t, self.allow_empty)
        if total > self.max_splits:
            raise ConfigError(
                f"partitioner 'exhaustive' refuses {n} blocks x {t} tiers: {total:,} splits is more "
                f"than max_splits={self.max_splits:,}; use 'bsdp' (exact and fast) or raise max_splits"
            )
        inner = (
            itertools.combinations_with_replacement(range(n + 1), t - 1)
            if self.allow_empty
            else itertools.combinations(range(1, n), t - 1)
        )
        mem = segment_mem(problem).tolist()  # the same sums bsdp compares
        offer = problem.tier_mem.tolist()
        best: tuple[float, float, tuple[int, ...]] | None = None
        for mid in inner:
            cuts = (0, *mid, n)
            if any(mem[cuts[j]][cuts[j + 1]] > offer[j] for j in range(t)):
                continue
            costs = split_cost(problem, cuts, self.include_transfer)
            key = (max(costs), sum(costs), cuts)
            if best is None or key < best:
                best = key
        if best is None:
            raise infeasible_error(problem, self.allow_empty)
        return Split(best[2], best[0])
