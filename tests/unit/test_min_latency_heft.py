"""min_latency is the exact single-request optimum; heft is classic HEFT (never better at idle)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from testbed.errors import InfeasibleError
from testbed.partition import PARTITIONERS, PartitionProblem
from testbed.partition.base import request_latency
from testbed.partition.heft import heft_tiers


def random_problem(seed: int, *, comm: bool = True) -> PartitionProblem:
    rng = np.random.default_rng(seed)
    t = int(rng.integers(1, 5))
    n = int(rng.integers(t, 9))
    st = rng.uniform(0.1, 3.0, size=(t, n)) * rng.uniform(0.1, 5.0, size=(t, 1))
    lm = rng.integers(1, 4, size=n)
    tm = rng.integers(int(lm.max()), int(lm.sum()) + 2, size=t)
    kw: dict[str, object] = {}
    if comm:
        kw["hop_delay"] = rng.uniform(0.0, 2.0, size=t)
        kw["input_time"] = np.cumsum(rng.uniform(0.0, 1.0, size=t))
    tt = rng.uniform(0.0, 2.0, size=(t, n)) if comm else None
    return PartitionProblem.from_arrays(st, lm, tm, tt, [f"t{j}" for j in range(t)], **kw)  # type: ignore[arg-type]


def brute_force_latency(prob: PartitionProblem, allow_empty: bool, comm: bool) -> float | None:
    t, n = prob.num_tiers, prob.num_blocks
    inner = (
        itertools.combinations_with_replacement(range(n + 1), t - 1)
        if allow_empty
        else itertools.combinations(range(1, n), t - 1)
    )
    best = None
    for mid in inner:
        cuts = (0, *mid, n)
        if any(prob.layer_mem[cuts[j] : cuts[j + 1]].sum() > prob.tier_mem[j] for j in range(t)):
            continue
        lat = request_latency(prob, cuts, comm)
        best = lat if best is None else min(best, lat)
    return best


@pytest.mark.parametrize("seed", range(150))
def test_min_latency_equals_brute_force_and_heft_never_better(seed):
    comm = seed % 3 != 0
    prob = random_problem(seed, comm=comm)
    for allow_empty in (False, True):
        params = {"allow_empty": allow_empty, "include_transfer": comm}
        want = brute_force_latency(prob, allow_empty, comm)
        if want is None:
            with pytest.raises(InfeasibleError):
                PARTITIONERS.create("min_latency", params).split(prob)
            with pytest.raises(InfeasibleError):
                PARTITIONERS.create("heft", params).split(prob)
            continue
        best = PARTITIONERS.create("min_latency", params).split(prob)
        assert request_latency(prob, best.cuts, comm) == pytest.approx(want, rel=1e-9)
        heft = PARTITIONERS.create("heft", params).split(prob)
        heft_lat = request_latency(prob, heft.cuts, comm)
        assert heft_lat >= want - 1e-9 * max(1.0, want)
        # HEFT's own finish time is exactly the latency of the split it returns
        _, finish = heft_tiers(prob, comm, allow_empty)
        assert finish == pytest.approx(heft_lat, rel=1e-9)


SLOW_TO_FAST = [[10.0] * 6, [3.0] * 6, [1.0] * 6]  # edge, fog, cloud seconds per block


def test_heft_counts_the_hop_delay():
    # no occupancy, but every crossing costs 100 s of delay: HEFT stays on the edge until forced
    prob = PartitionProblem.from_arrays(
        SLOW_TO_FAST, [1] * 6, [6] * 3, [[0.0] * 6] * 3, hop_delay=[100.0, 100.0, 0.0]
    )
    assert PARTITIONERS.create("heft").split(prob).cuts == (0, 4, 5, 6)
    # without communication it runs everything it can on the cloud
    assert PARTITIONERS.create("heft", {"include_transfer": False}).split(prob).cuts == (0, 1, 2, 6)


def test_heft_counts_the_users_input_into_the_first_tier():
    # with empty tiers allowed, block 0 may start on any tier; reaching the cloud costs the
    # input's hops (50 s), more than running the whole model on the edge
    prob = PartitionProblem.from_arrays(
        SLOW_TO_FAST, [1] * 6, [6] * 3, [[100.0] * 6] * 3, input_time=[0.0, 40.0, 50.0]
    )
    heft = PARTITIONERS.create("heft", {"allow_empty": True}).split(prob)
    assert heft.cuts == (0, 6, 6, 6)
    assert request_latency(prob, heft.cuts) == 60.0
    cheap = PartitionProblem.from_arrays(
        SLOW_TO_FAST, [1] * 6, [6] * 3, [[100.0] * 6] * 3, input_time=[0.0, 1.0, 2.0]
    )
    assert PARTITIONERS.create("heft", {"allow_empty": True}).split(cheap).cuts == (0, 0, 0, 6)
    assert request_latency(cheap, (0, 0, 0, 6)) == 8.0


def test_min_latency_looks_ahead_where_heft_is_myopic():
    # one hop of 5 s to a tier 10x faster: worth it for the whole model, not for one block
    st = [[4.0] * 8, [0.4] * 8]
    prob = PartitionProblem.from_arrays(st, [1] * 8, [8, 8], [[5.0] * 8, [0.0] * 8])
    heft = PARTITIONERS.create("heft").split(prob)
    best = PARTITIONERS.create("min_latency").split(prob)
    assert heft.cuts == (0, 7, 8) and request_latency(prob, heft.cuts) == pytest.approx(33.4)
    assert best.cuts == (0, 1, 8) and request_latency(prob, best.cuts) == pytest.approx(11.8)


def test_min_latency_respects_memory():
    st = [[4.0] * 6, [0.5] * 6]
    prob = PartitionProblem.from_arrays(st, [1] * 6, [6, 3], [[0.1] * 6, [0.0] * 6])
    assert PARTITIONERS.create("min_latency").split(prob).cuts == (0, 3, 6)


def test_three_tier_phi3_medium_numbers_in_the_docstrings():
    """The numbers heft.py and the README quote (roofline, 512 + 128 tokens, float16)."""
    from pathlib import Path

    from testbed.cost.model import CostModel
    from testbed.cost.planner import build_problem
    from testbed.spec.model_profile import load_model_profile
    from testbed.spec.plan import RequestShape
    from testbed.spec.topology import load_topology

    root = Path(__file__).resolve().parents[2]
    topo = load_topology(root / "topologies" / "three-tier.yaml")
    prob, _ = build_problem(topo, CostModel(load_model_profile("phi-3-medium")), RequestShape())

    def sizes(name: str, **params: object) -> tuple[list[int], float, float]:
        s = PARTITIONERS.create(name, params).split(prob)
        counts = [s.cuts[j + 1] - s.cuts[j] for j in range(3)]
        return counts, round(s.bottleneck, 2), round(request_latency(prob, s.cuts), 1)

    assert sizes("heft") == ([38, 1, 1], 24.2, 29.0)
    assert sizes("min_latency") == ([1, 1, 38], 2.43, 8.3)
    assert sizes("heft", include_transfer=False)[:2] == ([1, 1, 38], 2.43)
    assert sizes("bsdp")[:2] == ([1, 12, 27], 1.76)
