"""Behaviour of the baseline partitioners: even (GPipe-style), heft, exhaustive."""

from __future__ import annotations

import pytest

from testbed.errors import ConfigError, InfeasibleError
from testbed.partition import PARTITIONERS, PartitionProblem
from testbed.partition.exhaustive import count_splits

GiB = 2**30


def problem(st, lm=None, tm=None, tt=None, names=()):
    n, t = len(st[0]), len(st)
    return PartitionProblem.from_arrays(
        st, lm if lm is not None else [1] * n, tm if tm is not None else [n] * t, tt, names
    )


def split(name, prob, **params):
    return PARTITIONERS.create(name, params).split(prob)


# -- even ---------------------------------------------------------------------------------


def test_even_counts_and_remainder_to_earliest_tiers():
    st = [[1] * 10, [5] * 10, [0.1] * 10]
    assert split("even", problem(st)).cuts == (0, 4, 7, 10)
    assert split("even", problem([[1] * 9] * 3)).cuts == (0, 3, 6, 9)
    # heterogeneity ignored: the slow fog tier holds as many blocks as the others
    assert split("even", problem(st)).bottleneck == 15.0


def test_even_leaves_last_tiers_empty_only_when_allowed():
    prob = problem([[1, 1]] * 4)
    assert split("even", prob, allow_empty=True).cuts == (0, 1, 2, 2, 2)
    with pytest.raises(InfeasibleError, match="at least one"):
        split("even", prob)


def test_even_does_not_adapt_to_memory():
    prob = problem([[1] * 6] * 2, [GiB] * 6, [2 * GiB, 10 * GiB], names=["edge", "cloud"])
    with pytest.raises(InfeasibleError) as info:
        split("even", prob)
    msg = str(info.value)
    assert "blocks 0..2" in msg and "tier 'edge' (index 0)" in msg and "short by 1.00GiB" in msg
    assert info.value.shortfall_bytes == GiB
    assert split("bsdp", prob).cuts == (0, 2, 6)  # while bsdp adapts


# -- heft ---------------------------------------------------------------------------------


SLOW_TO_FAST = [[10] * 6, [3] * 6, [1] * 6]  # edge, fog, cloud seconds per block


def test_heft_piles_onto_fastest_tier():
    assert split("heft", problem(SLOW_TO_FAST), allow_empty=True).cuts == (0, 0, 0, 6)
    # with >= 1 block per tier: block 0 on the edge, one on the fog, the rest on the cloud
    assert split("heft", problem(SLOW_TO_FAST)).cuts == (0, 1, 2, 6)


def test_heft_transfers_keep_blocks_where_they_are():
    tt = [[100] * 6, [100] * 6, [0] * 6]
    # moving costs more than running on the slow edge: stay until forced to move
    assert split("heft", problem(SLOW_TO_FAST, tt=tt)).cuts == (0, 4, 5, 6)
    # with empty tiers allowed block 0 may start anywhere (token ids ship for free): the cloud
    assert split("heft", problem(SLOW_TO_FAST, tt=tt), allow_empty=True).cuts == (0, 0, 0, 6)
    # not counting transfer brings back the pile-up
    assert split("heft", problem(SLOW_TO_FAST, tt=tt), include_transfer=False).cuts == (0, 1, 2, 6)


def test_heft_multi_hop_transfer_cost():
    # block 0 is fastest on the edge; then skipping the fog crosses two links: 3 + 3 + 5 > 10
    st = [[1, 10, 10], [10, 10, 10], [5, 5, 5]]
    tt = [[3, 3, 3], [3, 3, 3], [0, 0, 0]]
    assert split("heft", problem(st, tt=tt), allow_empty=True).cuts == (0, 3, 3, 3)
    tt2 = [[1, 1, 1], [1, 1, 1], [0, 0, 0]]
    assert split("heft", problem(st, tt=tt2), allow_empty=True).cuts == (0, 1, 1, 3)


def test_heft_looks_ahead_for_memory():
    # the fast cloud holds only 2 blocks: heft must not start there and run out
    prob = problem([[5] * 5, [1] * 5], [1] * 5, [5, 2])
    assert split("heft", prob, allow_empty=True).cuts == (0, 3, 5)
    assert split("heft", prob).cuts == (0, 3, 5)


# -- exhaustive ---------------------------------------------------------------------------


def test_exhaustive_counts_and_refuses_large():
    assert count_splits(7, 3, False) == 15 and count_splits(2, 3, False) == 0
    assert count_splits(2, 3, True) == 6
    prob = problem([[1] * 200] * 5)
    with pytest.raises(ConfigError, match="use 'bsdp'"):
        split("exhaustive", prob)


def test_exhaustive_agrees_with_bsdp_on_hand_example():
    prob = problem([[4] * 7, [2] * 7, [1] * 7], [1] * 7, [10, 10, 3])
    assert split("exhaustive", prob) == split("bsdp", prob)
