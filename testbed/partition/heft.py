"""Classic HEFT (Topcuoglu, Hariri and Wu, IEEE TPDS 2002) on the chain of blocks (baseline).

HEFT, as published: (1) rank tasks by upward rank, rank_u(i) = mean compute(i) + max over
successors s of (mean communication(i, s) + rank_u(s)); (2) take tasks in decreasing rank and
put each on the processor giving it the earliest finish time, EFT = max(processor available,
max over predecessors of (their finish + communication to this processor)) + compute. The
communication cost of an edge is data / bandwidth + the link's latency, 0 on the same processor.

On a model, the task graph is the chain of blocks, so every block's upward rank exceeds its
successor's and the order degenerates to block order; one request arrives at an idle system, so
"processor available" never binds and EFT(i, q) = finish(i-1) + comm(tier(i-1) -> q) +
stage_time[q][i]. Processors are the tiers (each one effective node). Communication, as here:

* between tiers p < q (crossing links p .. q-1): for each link, ``transfer_time[k][i-1]`` (the
  hidden states' bytes / bandwidth for the reference request) + ``hop_delay[k]`` (its one-way
  delay at every crossing: prefill and each decode step);
* the user's input into the first block's tier: ``input_time[q]`` (the prompt's token ids over
  the first tier's LAN, then over every link up to tier q).

``include_transfer: false`` sets every communication cost to 0 (HEFT without communication).

Ours (the adaptation to a pipeline): activations flow one way, so block i may only go on a tier
>= that of block i-1; without ``allow_empty`` every tier must keep >= 1 block, so the greedy may
advance at most one tier per block and is forced forward when exactly as many blocks remain as
tiers; memory is respected by a look-ahead (a tier is a candidate only if the blocks after it can
still be placed on the tiers after it), so it never dead-ends when some split fits, and raises
``InfeasibleError`` naming the binding tier when none does. Ties go to the earlier tier.

What it optimises and where it is weak: one request's latency, greedily, one block at a time.
It is myopic: moving the next block to a faster tier pays the whole hop at once while the gain
is one block's compute, so on a slow uplink it never leaves the first tier even when the rest of
the model would run much faster further on. On ``topologies/three-tier.yaml`` with phi-3-medium
(512 + 128 tokens, float16, roofline costs) it keeps 38 of the 40 blocks on the edge (edge
38 / fog 1 / cloud 1): a single request takes 29.0 s at idle where ``min_latency`` (the same
objective with full lookahead: edge 1 / fog 1 / cloud 38) takes 8.3 s, and its bottleneck is
24.2 s against bsdp's 1.76 s. With ``include_transfer: false`` it sees no hop cost and runs
every block it can on the fastest tier (edge 1 / fog 1 / cloud 38, bottleneck 2.43 s on cloud).
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


def heft_tiers(
    problem: PartitionProblem, include_transfer: bool = True, allow_empty: bool = False
) -> tuple[list[int], float]:
    """(tier of each block, the request's finish time) by HEFT's earliest-finish-time rule."""
    t, n = problem.num_tiers, problem.num_blocks
    check_block_count(problem, allow_empty)
    allowed = allowed_segments(problem, segment_mem(problem), allow_empty)
    rest_fits = reach_backward(allowed)  # rest_fits[j][b]: blocks b.. fit on tiers j..
    if not rest_fits[0, 0]:
        raise infeasible_error(problem, allow_empty)
    comm = include_transfer
    tt = problem.transfer_time if comm and problem.transfer_time is not None else np.zeros((t, n))
    hd = problem.hop_delay if comm and problem.hop_delay is not None else np.zeros(t)
    inp = problem.input_time if comm and problem.input_time is not None else np.zeros(t)
    tiers: list[int] = []
    cur, start, finish = 0, 0, 0.0  # current tier, first block on it, finish time so far
    for i in range(n):
        if i == 0:
            options = range(t) if allow_empty else range(1)
        else:
            options = range(cur, t if allow_empty else min(cur + 2, t))
        best: tuple[float, int] | None = None
        for q in options:
            seg_start = start if (i > 0 and q == cur) else i
            # tier q holds seg_start..e-1 for some e > i, and blocks e.. fit on tiers q+1..
            if not (allowed[q][seg_start, i + 1 :] & rest_fits[q + 1][i + 1 :]).any():
                continue
            if i == 0:
                ready = float(inp[q])
            else:
                ready = finish + float(np.sum(tt[cur:q, i - 1]) + np.sum(hd[cur:q]))
            eft = ready + float(problem.stage_time[q, i])
            if best is None or eft < best[0]:
                best = (eft, q)
        if best is None:  # pragma: no cover - the look-ahead keeps a completion open
            raise AssertionError(f"heft: no tier for block {i}")
        finish, q = best
        if i == 0 or q != cur:
            start = i
        cur = q
        tiers.append(q)
    return tiers, finish


@PARTITIONERS.register("heft")
@dataclass(frozen=True)
class HEFT(Partitioner):
    """Classic HEFT: earliest finish time per block in block order (greedy, myopic single-request latency)."""

    include_transfer: bool = True  # communication cost = bytes / bandwidth + delay (and the input)
    allow_empty: bool = False  # may skip tiers (else every tier keeps >= 1 block)

    def split(self, problem: PartitionProblem) -> Split:
        tiers, _ = heft_tiers(problem, self.include_transfer, self.allow_empty)
        cuts = cuts_from_tiers(tiers, problem.num_tiers)
        return Split(cuts, max(split_cost(problem, cuts, self.include_transfer)))
