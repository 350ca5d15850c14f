"""`testbed reproduce hyperion --emulate`: experiment (a) on emulated devices (the Docker or
local testbed, `execution: emulated` scenarios run through `testbed compare`'s code), each point
also simulated on the same requests for the agreement table."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from testbed.errors import ConfigError
from testbed.experiment.reproduce import (
    Progress,
    ReproConfig,
    ReproResult,
    point_from,
    sweep_scenario,
    write_scenario,
)
from testbed.experiment.reproduce_sim import pair_setups, simulate_at
from testbed.sim.sweep import mean_rate


def emulation_available() -> bool:
    """Whether this checkout has emulated devices (a scenario's ``execution: emulated``)."""
    from testbed.spec.scenario import Scenario

    return "execution" in Scenario.model_fields


def require_emulation() -> None:
    if not emulation_available():
        raise ConfigError(
            "--emulate needs emulated devices (scenario field `execution: emulated`, package "
            "testbed/emulation), which this checkout does not have; use --simulate, or update "
            "to a version with emulated devices",
            field="--emulate",
        )


async def run_emulated(
    cfg: ReproConfig, out_dir: Path, console: Any, progress: Progress = lambda _m: None
) -> ReproResult:
    """(a) at a few loads where every pair is stable, on the Docker testbed with emulated
    devices (`execution: emulated`, through `testbed compare`'s code), each point also
    simulated on the same requests for the agreement table. Short requests: the devices run in
    real time."""
    import asyncio

    from testbed.experiment.compare import compare_scenario
    from testbed.experiment.replay import ReplayOptions
    from testbed.sim.run import prepare_sim

    require_emulation()
    t0 = time.perf_counter()
    res = ReproResult(cfg, "emulated")
    folder = out_dir / "scenarios"
    for model in cfg.models:
        base = sweep_scenario(
            cfg, folder, model, "emulated-probe", cfg.emu_requests, cfg.emu_max_prompt_tokens,
            cfg.emu_max_output_tokens,
        )  # fmt: skip
        _, caps = pair_setups(base, cfg.pairs)
        weakest = min(c.capacity_rps for c in caps.values())
        for frac in cfg.emu_fractions:
            rate = frac * weakest
            # the same requests at this rate, as a scenario the replay reads
            data = yaml.safe_load(base.path.read_text(encoding="utf-8"))
            data["name"] = f"hyperion-{model}-emulated-{frac:g}"
            data["workload"]["rate_rps"] = rate
            data.update(execution="emulated", runtime=cfg.emu_runtime)
            if cfg.emu_dilation != 1.0:
                data["dilation"] = cfg.emu_dilation
            loaded = write_scenario(folder, data)
            res.scenarios.append(loaded.path)
            progress(f"{model}: emulated, {rate:.3g} req/s ({frac:g} of the weakest capacity)")
            opts = ReplayOptions(
                runtime=cfg.emu_runtime, output=out_dir / "emulated", progress=False, plots=False
            )
            cmp = await compare_scenario(loaded, list(cfg.pairs), opts, console)
            for run in cmp.runs:
                setup = await asyncio.to_thread(prepare_sim, loaded, run.label)
                reqs = setup.requests
                offered = mean_rate(reqs) or rate  # the drawn arrivals' rate, not the nominal
                emu = point_from("emulated", "emulated", model, run.label, offered, reqs,
                                 caps[run.label], run.summary, setup.prep.topology)  # fmt: skip
                sim_summary, _ = await asyncio.to_thread(simulate_at, setup, None)
                sim = point_from("simulated", "emulated", model, run.label, offered, reqs,
                                 caps[run.label], sim_summary, setup.prep.topology)  # fmt: skip
                pacing = getattr(run, "emulation", None)  # fidelity of the emulated run
                if isinstance(pacing, dict) and "overrun_fraction" in pacing:
                    emu = replace(emu, overrun_fraction=float(pacing["overrun_fraction"]))
                res.points.append(emu)
                res.agreement.append((emu, sim))
    res.wall_s = time.perf_counter() - t0
    return res
