"""BSDP solve time: 200 blocks x 5 tiers, a 1,000-node topology's plan, and ratios to brute force.

Run: ``.venv/bin/python benchmarks/bench_bsdp.py [--repeat 7]``. Prints medians over several
random instances / repetitions, measured in this one run on this machine.

1. ``solve_split`` on random 200-block x 5-tier instances (heterogeneous tier speeds, per-block
   transfer, memory that binds), with and without empty tiers.
2. BSDP vs the registered ``exhaustive`` partitioner (brute force) side by side where brute
   force is still runnable (24 blocks x 5 tiers: 8,855 splits), and the brute-force time for
   200 x 5 extrapolated from its measured time per split (it is not run).
3. A generated topology of 1,000 nodes (5 tiers x 200 heterogeneous nodes, phi-3-medium):
   building the topology, reducing it to the partitioning problem (one effective node per
   tier: the strongest), the BSDP solve, and the whole ``testbed.cost.planner.make_plan``.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from testbed.partition import PARTITIONERS, PartitionProblem
from testbed.partition.bsdp import solve_split
from testbed.partition.exhaustive import count_splits

GiB = 2**30


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """Median wall time of ``repeat`` calls (and the last result)."""
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


Arrays = tuple[
    np.ndarray, np.ndarray, np.ndarray, np.ndarray
]  # stage_time, layer_mem, tier_mem, transfer


def random_arrays(rng: np.random.Generator, n: int, t: int) -> Arrays:
    speed = rng.uniform(0.2, 5.0, size=(t, 1))  # tiers differ up to 25x
    st = rng.uniform(0.5, 1.5, size=(t, n)) / speed
    tt = np.repeat(rng.uniform(0.0, 0.5, size=(t, 1)), n, axis=1)
    lm = rng.integers(GiB // 4, GiB, size=n)
    tm = rng.uniform(0.25, 0.6, size=t) * lm.sum()  # memory binds on some tiers
    return st, lm, tm, tt


def feasible_instances(n: int, t: int, count: int, seed: int) -> list[Arrays]:
    rng = np.random.default_rng(seed)
    out: list[Arrays] = []
    while len(out) < count:
        arrays = random_arrays(rng, n, t)
        try:
            solve_split(*arrays)
        except ValueError:
            continue
        out.append(arrays)
    return out


def fmt_s(s: float) -> str:
    return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def bench_random(repeat: int) -> None:
    print("== solve_split, 200 blocks x 5 tiers (random heterogeneous instances) ==")
    for allow_empty in (False, True):
        meds = []
        for arrays in feasible_instances(200, 5, 7, seed=1):
            run = functools.partial(solve_split, *arrays, allow_empty=allow_empty)
            med, _ = timed(run, repeat)
            meds.append(med)
        print(
            f"  allow_empty={allow_empty!s:5}: median {fmt_s(statistics.median(meds))} "
            f"(min {fmt_s(min(meds))}, max {fmt_s(max(meds))}) over {len(meds)} instances"
        )


def bench_vs_exhaustive(repeat: int) -> None:
    print("== BSDP vs brute force (registered 'exhaustive'), same instances ==")
    n, t = 24, 5
    bsdp = PARTITIONERS.create("bsdp")
    brute = PARTITIONERS.create("exhaustive")
    ratios, per_split = [], []
    for arrays in feasible_instances(n, t, 3, seed=2):
        problem = PartitionProblem.from_arrays(*arrays)
        tb, sb = timed(functools.partial(bsdp.split, problem), repeat)
        te, se = timed(functools.partial(brute.split, problem), 1)
        assert math.isclose(sb.bottleneck, se.bottleneck, rel_tol=1e-12), (sb, se)
        ratios.append(te / tb)
        per_split.append(te / count_splits(n, t, False))
        print(
            f"  {n} x {t} ({count_splits(n, t, False):,} splits): bsdp {fmt_s(tb)}, "
            f"exhaustive {fmt_s(te)}, same bottleneck, exhaustive/bsdp = {te / tb:,.0f}x"
        )
    splits = count_splits(200, 5, False)
    est = statistics.median(per_split) * splits
    print(
        f"  200 x 5 has {splits:,} splits: brute force would take about {est / 3600:.1f} h "
        f"at the measured {statistics.median(per_split) * 1e6:.1f} us per split (not run)"
    )


def thousand_node_topology() -> dict[str, Any]:
    """5 tiers x 200 nodes, heterogeneous devices (memory overridden per node)."""
    from testbed.spec.devices import CATALOG

    rng = np.random.default_rng(3)
    plan = [
        ("edge", ["jetson-orin-nano", "jetson-agx-orin", "raspberry-pi-5"]),
        ("access", ["jetson-agx-orin", "cpu-generic", "l4"]),
        ("fog", ["rtx-3090", "a10", "l4"]),
        ("metro", ["a10", "rtx-4090", "a100-40gb"]),
        ("cloud", ["a100-80gb", "h100", "a100-40gb"]),
    ]
    tiers = []
    for name, devices in plan:
        nodes = []
        for k in range(200):
            dev = devices[int(rng.integers(len(devices)))]
            mem = int(CATALOG[dev]["mem"] * float(rng.uniform(0.5, 1.0)))  # usable share
            nodes.append({"name": f"{name}-{k}", "device": {"base": dev, "mem": mem}})
        tiers.append({"name": name, "nodes": nodes})
    links = [
        {"from": plan[j][0], "to": plan[j + 1][0], "bandwidth": bw, "delay": d}
        for j, (bw, d) in enumerate(
            [("100Mbit", "5ms"), ("1Gbit", "10ms"), ("1Gbit", "20ms"), ("10Gbit", "30ms")]
        )
    ]
    return {"name": "thousand", "tiers": tiers, "links": links}


def bench_topology(repeat: int) -> None:
    print("== plan of a 1,000-node topology (5 tiers x 200 nodes, phi-3-medium fp16) ==")
    try:
        from testbed.cost.model import CostModel
        from testbed.cost.planner import build_problem, make_plan
        from testbed.spec.model_profile import load_model_profile
        from testbed.spec.plan import RequestShape
        from testbed.spec.topology import topology_from_dict
    except ImportError as exc:  # the planner lives in another area; say what is missing
        print(f"  skipped: planner not importable ({exc})")
        return
    data = thousand_node_topology()
    t_topo, topo = timed(lambda: topology_from_dict(data, "<generated>"), 1)
    nodes = sum(len(t.nodes) for t in topo.tiers)
    cost = CostModel(load_model_profile("phi-3-medium"))
    shape = RequestShape()
    bsdp = PARTITIONERS.create("bsdp")
    t_red, (problem, effective) = timed(lambda: build_problem(topo, cost, shape), repeat)
    t_solve, split = timed(lambda: bsdp.split(problem), repeat)
    t_plan, plan = timed(lambda: make_plan(topo, cost, bsdp, shape), repeat)
    assert plan.cuts == split.cuts
    print(
        f"  {nodes} nodes -> {problem.num_tiers} tiers x {problem.num_blocks} blocks; "
        f"effective nodes {', '.join(effective)}"
    )
    print(f"  cuts {split.cuts}, bottleneck {split.bottleneck * 1e3:.1f} ms per request")
    print(
        f"  validate topology {fmt_s(t_topo)} (once) | reduce to tiers {fmt_s(t_red)} | "
        f"bsdp solve {fmt_s(t_solve)} | whole make_plan {fmt_s(t_plan)} (medians of {repeat})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="repetitions per measurement (median)")
    args = ap.parse_args()
    bench_random(args.repeat)
    bench_vs_exhaustive(args.repeat)
    bench_topology(args.repeat)


if __name__ == "__main__":
    main()
