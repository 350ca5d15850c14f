"""`testbed reproduce hyperion` in simulation (the default): experiments (a) and (b) of
:mod:`testbed.experiment.reproduce` for every model, each point one simulated run."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from testbed.experiment.reproduce import (
    GPIPE,
    HYPERION,
    Point,
    Progress,
    ReproConfig,
    ReproResult,
    pair_capacity,
    point_from,
    rate_grid,
    scenario_dict,
    sweep_scenario,
    write_scenario,
)

if TYPE_CHECKING:
    from testbed.cost.capacity import PlanCapacity as Capacity
    from testbed.metrics.summary import Summary
    from testbed.sim.run import SimSetup
    from testbed.spec.scenario import LoadedScenario
    from testbed.workload.request import TraceRequest


def simulate_at(setup: SimSetup, rate: float | None) -> tuple[Summary, Sequence[TraceRequest]]:
    """The setup's requests (rescaled to ``rate``, when given) simulated and summarised."""
    from testbed.sim.run import simulate, summarize_outcome
    from testbed.sim.sweep import vary

    reqs = list(setup.requests) if rate is None else vary(setup.requests, "rate", rate)
    return summarize_outcome(setup, simulate(setup, requests=reqs)), reqs


def pair_setups(
    loaded: LoadedScenario, pairs: Sequence[str]
) -> tuple[dict[str, SimSetup], dict[str, Capacity]]:
    """Every pair prepared for simulation (the scenario's parts loaded once), and the capacity
    of its plan as its scheduler dispatches."""
    from testbed.experiment.prepare import load_parts
    from testbed.sim.run import prepare_sim

    parts = load_parts(loaded, simulate=True)
    setups = {pair: prepare_sim(parts, pair) for pair in pairs}
    return setups, {pair: pair_capacity(s.prep.plan, pair) for pair, s in setups.items()}


def simulated_point(
    experiment: str, model: str, setup: SimSetup, cap: Capacity, rate: float
) -> Point:
    """The setup's pair simulated at ``rate``, as a point of ``experiment``."""
    summary, reqs = simulate_at(setup, rate)
    return point_from(
        "simulated", experiment, model, setup.pair, rate, reqs, cap, summary, setup.prep.topology
    )


def rate_sweep(
    cfg: ReproConfig, model: str, folder: Path, progress: Progress
) -> tuple[list[Point], Path]:
    """(a) every pair at every rate of :func:`rate_grid`."""
    loaded = sweep_scenario(
        cfg, folder, model, "rate", cfg.requests, cfg.max_prompt_tokens, cfg.max_output_tokens
    )
    setups, caps = pair_setups(loaded, cfg.pairs)
    rates = rate_grid({p: c.capacity_rps for p, c in caps.items()}, cfg)
    progress(f"{model}: {len(cfg.pairs)} pairs x {len(rates)} rates, {cfg.requests} requests each")
    points = []
    for pair, setup in setups.items():
        points += [simulated_point("rate", model, setup, caps[pair], rate) for rate in rates]
        progress(f"  {pair} done")
    return points, loaded.path


def long_sequences(
    cfg: ReproConfig, model: str, folder: Path, progress: Progress
) -> tuple[list[Point], list[Path]]:
    """(b) Hyperion vs GPipe, fixed prompt, each output length, plans made for that length."""
    points, paths = [], []
    for out_tokens in cfg.long_outputs:
        name = f"hyperion-{model}-long{out_tokens}"
        shape = {"prompt_tokens": cfg.long_prompt_tokens, "output_tokens": out_tokens,
                 "concurrency": 8}  # fmt: skip
        work = {"kind": "synthetic", "rate_rps": 1.0, "num_requests": cfg.long_requests,
                "prompt_tokens": cfg.long_prompt_tokens, "output_tokens": out_tokens,
                "seed": cfg.seed}  # fmt: skip
        loaded = write_scenario(
            folder, scenario_dict(name, model, cfg.topology, shape, work, cfg.seed)
        )
        paths.append(loaded.path)
        setups, caps = pair_setups(loaded, (HYPERION, GPIPE))
        weaker = min(c.capacity_rps for c in caps.values())
        for frac in cfg.long_fractions:
            rate = frac * weaker
            for pair, setup in setups.items():
                points.append(simulated_point("long", model, setup, caps[pair], rate))
        progress(f"{model}: long sequences, {out_tokens} output tokens done")
    return points, paths


def run_simulated(
    cfg: ReproConfig, out_dir: Path, progress: Progress = lambda _m: None
) -> ReproResult:
    """All three experiments in simulation."""
    t0 = time.perf_counter()
    res = ReproResult(cfg, "simulated")
    folder = out_dir / "scenarios"
    for model in cfg.models:
        pts, path = rate_sweep(cfg, model, folder, progress)
        res.points += pts
        res.scenarios.append(path)
        lpts, lpaths = long_sequences(cfg, model, folder, progress)
        res.points += lpts
        res.scenarios += lpaths
    res.wall_s = time.perf_counter() - t0
    return res
