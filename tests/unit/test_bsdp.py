"""BSDP (testbed.partition.bsdp): exact optimum vs brute force, tie rule, errors, speed."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest

from testbed.errors import InfeasibleError, TestbedError
from testbed.partition import PARTITIONERS, PartitionProblem, split_cost
from testbed.partition.bsdp import solve_split
from testbed.units import fmt_bytes

GiB = 2**30


def brute_force(st, lm, tm, tt, allow_empty):
    """Independent reference in plain Python: (bottleneck, total, cuts) or None.

    Cost straight from the issue: tier j holding a..b-1 costs sum(st[j][a:b]) plus
    tt[j][b-1] when transfer is given and a < b < N; empty tiers cost 0."""
    t, n = len(st), len(st[0])
    mids = (
        itertools.combinations_with_replacement(range(n + 1), t - 1)
        if allow_empty
        else itertools.combinations(range(1, n), t - 1)
    )
    best = None
    for mid in mids:
        cuts = (0, *mid, n)
        costs, fits = [], True
        for j in range(t):
            a, b = cuts[j], cuts[j + 1]
            if sum(lm[a:b]) > tm[j]:
                fits = False
                break
            c = sum(st[j][a:b])
            if tt is not None and a < b < n:
                c += tt[j][b - 1]
            costs.append(c)
        if fits:
            key = (max(costs), sum(costs), cuts)
            best = key if best is None or key < best else best
    return best


def minimax_dp(st, lm, tm, tt, allow_empty):
    """Second independent oracle for larger instances: min over paths of the max segment cost."""
    t, n = len(st), len(st[0])
    inf = math.inf
    best = [0.0] + [inf] * n  # best[b]: blocks 0..b-1 placed on the tiers so far
    for j in range(t):
        new = [inf] * (n + 1)
        for a in range(n + 1):
            if best[a] == inf:
                continue
            c, m = 0.0, 0
            for b in range(a, n + 1):
                if b > a:
                    c += st[j][b - 1]
                    m += lm[b - 1]
                if m > tm[j]:
                    break
                if b == a and not allow_empty:
                    continue
                cost = c + (tt[j][b - 1] if tt is not None and a < b < n else 0.0)
                new[b] = min(new[b], max(best[a], cost))
        best = new
    return best[n]


def random_instance(rng, *, n, t, integer, transfer, memory):
    if integer:
        st = rng.integers(0, 5, size=(t, n)).tolist()
        tt = rng.integers(0, 3, size=(t, n)).tolist() if transfer else None
    else:
        st = rng.uniform(0.0, 2.0, size=(t, n)).tolist()
        tt = rng.uniform(0.0, 1.0, size=(t, n)).tolist() if transfer else None
    lm = rng.integers(1, 6, size=n).tolist()
    total = sum(lm)
    if memory == "none":
        tm = [total * 2] * t
    elif memory == "tight":
        tm = rng.integers(max(lm), max(max(lm), total // max(t - 1, 1)) + 2, size=t).tolist()
    else:  # "random": often infeasible
        tm = rng.integers(0, total + 1, size=t).tolist()
    return st, lm, tm, tt


CASES = [
    (seed, integer, transfer, memory, allow_empty)
    for seed in range(40)
    for integer in (True, False)
    for transfer in (False, True)
    for memory in ("none", "tight", "random")
    for allow_empty in (False, True)
    if (seed + integer + transfer) % 2 == 0 or memory != "none"
]


def test_case_count_is_hundreds():
    assert len(CASES) >= 400


@pytest.mark.parametrize("chunk", range(8))
def test_bsdp_equals_brute_force(chunk):
    feasible = infeasible = 0
    for seed, integer, transfer, memory, allow_empty in CASES[chunk::8]:
        rng = np.random.default_rng([seed, integer, transfer, len(memory), allow_empty])
        n, t = int(rng.integers(1, 9)), int(rng.integers(1, 5))
        st, lm, tm, tt = random_instance(
            rng, n=n, t=t, integer=integer, transfer=transfer, memory=memory
        )
        ref = brute_force(st, lm, tm, tt, allow_empty)
        ctx = f"seed={seed} int={integer} tt={transfer} mem={memory} empty={allow_empty} st={st} lm={lm} tm={tm} tt={tt}"
        if ref is None:
            infeasible += 1
            with pytest.raises(InfeasibleError) as info:
                solve_split(st, lm, tm, tt, allow_empty=allow_empty)
            assert isinstance(info.value, ValueError) and isinstance(info.value, TestbedError)
            assert "tier" in str(info.value) or "blocks" in str(info.value), ctx
            continue
        feasible += 1
        split = solve_split(st, lm, tm, tt, allow_empty=allow_empty)
        problem = PartitionProblem.from_arrays(st, lm, tm, tt)
        assert split.bottleneck == max(split_cost(problem, split.cuts, include_transfer=True))
        assert isinstance(split.bottleneck, float)
        assert all(type(c) is int for c in split.cuts)
        if integer:  # exact arithmetic: the same split, tie rule included
            assert split.cuts == ref[2], ctx
            assert split.bottleneck == ref[0], ctx
        else:
            assert math.isclose(split.bottleneck, ref[0], rel_tol=1e-12), ctx
        # contiguity and memory
        cuts = split.cuts
        assert len(cuts) == t + 1 and cuts[0] == 0 and cuts[-1] == n
        for j in range(t):
            assert cuts[j] < cuts[j + 1] or (allow_empty and cuts[j] == cuts[j + 1])
            assert sum(lm[cuts[j] : cuts[j + 1]]) <= tm[j]
    assert feasible > 0 and (infeasible > 0 or chunk % 2 == 1)


@pytest.mark.parametrize("seed", range(6))
def test_bsdp_equals_minimax_dp_on_medium_instances(seed):
    rng = np.random.default_rng(1000 + seed)
    n, t = int(rng.integers(20, 48)), int(rng.integers(2, 6))
    transfer = seed % 2 == 0
    st, lm, tm, tt = random_instance(
        rng, n=n, t=t, integer=False, transfer=transfer, memory="tight"
    )
    allow_empty = seed % 3 == 0
    ref = minimax_dp(st, lm, tm, tt, allow_empty)
    if ref == math.inf:
        with pytest.raises(InfeasibleError):
            solve_split(st, lm, tm, tt, allow_empty=allow_empty)
        return
    split = solve_split(st, lm, tm, tt, allow_empty=allow_empty)
    assert math.isclose(split.bottleneck, ref, rel_tol=1e-12)


def test_paper_example_by_hand():
    # edge 4 s/block, fog 2 s/block, cloud 1 s/block, 7 blocks: 1 + 2 + 4 blocks -> 4 s each.
    st = [[4] * 7, [2] * 7, [1] * 7]
    assert solve_split(st, [1] * 7, [10, 10, 10]).cuts == (0, 1, 3, 7)
    assert solve_split(st, [1] * 7, [10, 10, 10]).bottleneck == 4.0
    # the cloud holds at most 3 blocks: the fog takes 3 -> 6 s
    split = solve_split(st, [1] * 7, [10, 10, 3])
    assert split.cuts == (0, 1, 4, 7) and split.bottleneck == 6.0


def test_paper_special_case_constant_transfer():
    """The paper: one effective node per tier, a constant inter-tier latency outside the cut
    choice (transfer_time=None). A constant per-hop transfer counted in the tier costs adds the
    same constant to every non-last tier; zero transfer equals the paper's form."""
    rng = np.random.default_rng(7)
    for _ in range(30):
        n, t = int(rng.integers(3, 9)), int(rng.integers(2, 4))
        st = rng.integers(1, 9, size=(t, n)).tolist()
        lm, tm = [1] * n, [n] * t
        paper = solve_split(st, lm, tm)
        assert paper.cuts == brute_force(st, lm, tm, None, False)[2]
        assert solve_split(st, lm, tm, [[0] * n] * t).cuts == paper.cuts
        c = int(rng.integers(1, 5))
        const = solve_split(st, lm, tm, [[c] * n] * t)
        assert const.cuts == brute_force(st, lm, tm, [[c] * n] * t, False)[2]
        assert const.bottleneck <= paper.bottleneck + c  # the paper's cuts cost at most +c each


def test_ties_smallest_total_then_lexicographic():
    # (0,1,3): costs 2, 3 -> 3, total 5; (0,2,3): costs 3, 1 -> 3, total 4 -> wins.
    assert solve_split([[2, 1, 1], [2, 2, 1]], [1] * 3, [9, 9]).cuts == (0, 2, 3)
    # all zero: everything ties -> lexicographically smallest cuts
    assert solve_split([[0] * 4] * 3, [1] * 4, [9] * 3).cuts == (0, 1, 2, 4)
    assert solve_split([[0] * 4] * 3, [1] * 4, [9] * 3, allow_empty=True).cuts == (0, 0, 0, 4)


def test_transfer_changes_the_split():
    st = [[1] * 6, [1] * 6]
    assert solve_split(st, [1] * 6, [9, 9]).cuts == (0, 3, 6)
    # shipping block 1's or 2's output is expensive, block 3's is free
    tt = [[0, 5, 5, 0, 0, 0], [0] * 6]
    split = solve_split(st, [1] * 6, [9, 9], tt)
    assert split.cuts == (0, 4, 6) and split.bottleneck == 4.0


def test_single_tier_and_allow_empty():
    assert solve_split([[1, 2, 3]], [1, 1, 1], [3]).cuts == (0, 3)
    # fast cloud, slow edge: with empty tiers allowed the edge is skipped
    st = [[10, 10, 10], [1, 1, 1]]
    assert solve_split(st, [1] * 3, [9, 9]).cuts == (0, 1, 3)
    assert solve_split(st, [1] * 3, [9, 9], allow_empty=True).cuts == (0, 0, 3)


def test_infeasible_names_binding_tier_and_shortfall():
    lm = [3 * GiB] + [GiB] * 9  # block 0 carries the embedding
    st = [[1.0] * 10] * 3
    names = ["edge", "fog", "cloud"]
    with pytest.raises(InfeasibleError) as info:
        solve_split(st, lm, [2 * GiB, 2 * GiB, 100 * GiB], tier_names=names)
    err = info.value
    assert isinstance(err, ValueError) and isinstance(err, TestbedError)
    msg = str(err)
    assert "tier 'edge' (index 0)" in msg, msg
    assert f"short by {fmt_bytes(GiB)}" in msg, msg
    assert "allow empty tiers" in msg, msg
    assert err.tier_index == 0 and err.tier_name == "edge" and err.shortfall_bytes == GiB
    # allowing empty tiers fixes it: the cloud takes block 0
    split = solve_split(st, lm, [2 * GiB, 2 * GiB, 100 * GiB], allow_empty=True)
    assert split.cuts[1] == 0


def test_infeasible_total_memory_names_cheapest_tier():
    lm = [GiB] * 10
    with pytest.raises(InfeasibleError) as info:
        solve_split([[1.0] * 10] * 2, lm, [3 * GiB, 5 * GiB], tier_names=["fog", "cloud"])
    # 10 GiB needed, 8 offered: either tier short by 2 GiB; the first is named
    assert info.value.shortfall_bytes == 2 * GiB
    assert "tier 'fog'" in str(info.value) and "short by 2.00GiB" in str(info.value)
    assert "allow empty" not in str(info.value)  # would not help
    assert "need 10.00GiB but the tiers offer 8.00GiB together" in str(info.value)


def test_infeasible_when_no_single_tier_can_fix_it():
    with pytest.raises(InfeasibleError) as info:
        solve_split([[1.0] * 4] * 3, [GiB] * 4, [0.5 * GiB, 0.5 * GiB, 9 * GiB])
    msg = str(info.value)
    assert "tier 'tier0'" in msg and "tier 'tier1'" in msg, msg
    assert "give them more memory" in msg and info.value.tier_index == 0


def test_fewer_blocks_than_tiers():
    with pytest.raises(InfeasibleError, match="2 block"):
        solve_split([[1, 1]] * 3, [1, 1], [9] * 3)
    # costs (0, 1, 1) beat (0, 0, 2) on the bottleneck, and (1, 1, 0) on the lexicographic rule
    assert solve_split([[1, 1]] * 3, [1, 1], [9] * 3, allow_empty=True).cuts == (0, 0, 1, 2)


@pytest.mark.parametrize(
    "args",
    [
        ([1, 2], [1, 1], [9]),  # stage_time not 2-D
        ([[1, 2]], [1], [9]),  # layer_mem length
        ([[1, 2]], [1, 1], [9, 9]),  # tier_mem length
        ([[1, -2]], [1, 1], [9]),  # negative time
        ([[1, float("nan")]], [1, 1], [9]),
    ],
)
def test_malformed_arrays_are_value_errors(args):
    with pytest.raises(ValueError):
        solve_split(*args)


def test_registered_class_options():
    problem = PartitionProblem.from_arrays(
        [[1] * 6, [1] * 6], [1] * 6, [9, 9], [[0, 5, 5, 0, 0, 0], [0] * 6]
    )
    assert PARTITIONERS.create("bsdp").split(problem).cuts == (0, 4, 6)
    no_tt = PARTITIONERS.create("bsdp", {"include_transfer": False}).split(problem)
    assert no_tt.cuts == (0, 3, 6) and no_tt.bottleneck == 3.0


def test_200_blocks_5_tiers_is_fast():
    rng = np.random.default_rng(3)
    times = []
    for _ in range(3):
        st = rng.uniform(0.5, 2.0, size=(5, 200))
        tt = rng.uniform(0.0, 1.0, size=(5, 200))
        lm = rng.integers(GiB // 8, GiB // 2, size=200)
        tm = np.full(5, lm.sum() / 3)
        t0 = time.perf_counter()
        split = solve_split(st, lm, tm, tt)
        times.append(time.perf_counter() - t0)
        assert len(split.cuts) == 6
    assert sorted(times)[1] < 0.5, times
