"""Contract every registered partitioner keeps (parametrised from the registry)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from testbed.errors import InfeasibleError, TestbedError
from testbed.partition import PARTITIONERS, Partitioner, PartitionProblem, Split, split_cost

NAMES = PARTITIONERS.names()


def test_expected_partitioners_registered():
    assert {"bsdp", "even", "heft", "exhaustive", "min_latency"} <= set(NAMES)


def make_problem(seed: int, *, transfer: bool = True, tight: bool = True) -> PartitionProblem:
    """Small random instance (exhaustive can check it) that the even split also fits."""
    rng = np.random.default_rng(seed)
    t = int(rng.integers(1, 5))
    n = int(rng.integers(t, 10))
    st = rng.uniform(0.1, 3.0, size=(t, n)) * rng.uniform(0.2, 5.0, size=(t, 1))  # heterogeneous
    tt = rng.uniform(0.0, 0.5, size=(t, n)) if transfer else None
    lm = rng.integers(1, 4, size=n)
    even_need = -(-n // t) * int(lm.max())
    tm = rng.integers(even_need, even_need + (2 if tight else 3 * int(lm.sum())), size=t)
    return PartitionProblem.from_arrays(st, lm, tm, tt, [f"t{j}" for j in range(t)])


def variants(name: str) -> list[Partitioner]:
    """Default parameters, plus the flipped boolean options each partitioner has."""
    out = [PARTITIONERS.create(name)]
    for f in PARTITIONERS.params(name):
        if f.name in ("allow_empty", "include_transfer") and isinstance(f.default, bool):
            out.append(PARTITIONERS.create(name, {f.name: not f.default}))
    return out


def includes_transfer(p: Partitioner) -> bool:
    return bool(getattr(p, "include_transfer", True))


def allows_empty(p: Partitioner) -> bool:
    return bool(getattr(p, "allow_empty", False))


def check_split(p: Partitioner, problem: PartitionProblem, split: Split) -> None:
    t, n = problem.num_tiers, problem.num_blocks
    cuts = split.cuts
    assert isinstance(cuts, tuple) and len(cuts) == t + 1
    assert all(type(c) is int for c in cuts)
    assert cuts[0] == 0 and cuts[-1] == n
    placed = []
    for j in range(t):
        a, b = cuts[j], cuts[j + 1]
        assert a <= b, cuts
        if not allows_empty(p):
            assert a < b, f"{p}: empty tier {j} in {cuts}"
        assert problem.layer_mem[a:b].sum() <= problem.tier_mem[j], (p, j, cuts)
        placed.extend(range(a, b))
    assert placed == list(range(n))  # every block once, in order
    assert isinstance(split.bottleneck, float)
    assert split.bottleneck == max(split_cost(problem, cuts, includes_transfer(p)))


@pytest.mark.parametrize("name", NAMES)
def test_contract_on_random_instances(name):
    for seed in range(25):
        problem = make_problem(seed, transfer=seed % 3 != 0, tight=seed % 2 == 0)
        for p in variants(name):
            split = p.split(problem)
            check_split(p, problem, split)
            # deterministic: same object, a fresh instance, a copy of the problem
            assert p.split(problem) == split
            assert dataclasses.replace(p).split(problem) == split  # type: ignore[type-var]
            copy = PartitionProblem.from_arrays(
                problem.stage_time.copy(),
                problem.layer_mem.copy(),
                problem.tier_mem.copy(),
                None if problem.transfer_time is None else problem.transfer_time.copy(),
                problem.tier_names,
            )
            assert p.split(copy) == split


@pytest.mark.parametrize("name", NAMES)
def test_no_partitioner_beats_bsdp(name):
    for seed in range(25):
        problem = make_problem(100 + seed)
        for p in variants(name):
            opt = PARTITIONERS.create(
                "bsdp",
                {"include_transfer": includes_transfer(p), "allow_empty": allows_empty(p)},
            ).split(problem)
            assert opt.bottleneck <= p.split(problem).bottleneck * (1 + 1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_infeasible_memory_raises(name):
    problem = PartitionProblem.from_arrays(
        [[1.0] * 6] * 3, [2**30] * 6, [2**30, 2**30, 2**30], tier_names=["edge", "fog", "cloud"]
    )
    for p in variants(name):
        with pytest.raises(InfeasibleError) as info:
            p.split(problem)
        assert isinstance(info.value, ValueError) and isinstance(info.value, TestbedError)
        assert "tier '" in str(info.value) and "short by" in str(info.value), str(info.value)


@pytest.mark.parametrize("name", NAMES)
def test_fewer_blocks_than_tiers(name):
    problem = PartitionProblem.from_arrays([[1.0, 2.0]] * 3, [1, 1], [9, 9, 9])
    for p in variants(name):
        if allows_empty(p):
            check_split(p, problem, p.split(problem))
        else:
            with pytest.raises(InfeasibleError):
                p.split(problem)


@pytest.mark.parametrize("name", NAMES)
def test_is_a_frozen_dataclass_with_description(name):
    p = PARTITIONERS.create(name)
    assert dataclasses.is_dataclass(p)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.allow_empty = True  # type: ignore[misc]
    assert p.describe()["name"] == name
    assert any(d["name"] == name and d["doc"] for d in PARTITIONERS.describe())
