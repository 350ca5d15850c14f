"""`testbed compare`: the same workload under several policy pairs, side by side."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from testbed.errors import ConfigError
from testbed.experiment.adaptive import check_adaptive
from testbed.experiment.lifecycle import (
    plan_matches,
    reload_announced,
    reload_refusal,
    take_down,
    up_announced,
)
from testbed.experiment.prepare import load_parts, prepare
from testbed.experiment.replay import ReplayOptions, ReplayRun, output_dir, replay_once
from testbed.runtime.base import RunningTestbed
from testbed.runtime.interface import RUNTIMES
from testbed.spec.repartition import split_pair
from testbed.spec.scenario import LoadedScenario, parse_pair


@dataclass(frozen=True)
class CompareResult:
    out_dir: Path
    runs: tuple[ReplayRun, ...]
    files: dict[str, Path]


def check_pairs(loaded: LoadedScenario, pairs: Sequence[str]) -> None:
    if not pairs:
        raise ConfigError(
            "no policy pairs to compare: give --policies bsdp+arts,even+round_robin,... or a "
            "`compare:` list in the scenario",
            source=str(loaded.path),
        )
    if len(set(pairs)) != len(pairs):
        raise ConfigError(f"--policies lists a pair twice: {', '.join(pairs)}")
    for p in pairs:
        parse_pair(p)


async def compare_scenario(
    loaded: LoadedScenario,
    pairs: Sequence[str],
    opts: ReplayOptions,
    console: Console,
    *,
    reload: bool = True,
) -> CompareResult:
    """For each pair, a testbed with that partitioner's plan, the same workload, then a
    side-by-side table with ratios to the first pair. One testbed serves every pair it can:
    reused as is while the next plan holds the same block ranges, else given the new ranges by
    a load into its running nodes (``reload``, default) when those nodes include the plan's;
    otherwise (or with ``reload=False``) taken down and brought up with the new plan."""
    from testbed.metrics.report import write_comparison

    check_pairs(loaded, pairs)
    runtime = RUNTIMES.create(opts.runtime or loaded.spec.runtime, field="--runtime")
    if any(split_pair(p)[1] for p in pairs):  # before any testbed comes up
        check_adaptive(str(loaded.path), opts.runtime or loaded.spec.runtime)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = output_dir(loaded, opts)
    out = root / f"{stamp}-{loaded.spec.name}-compare"
    k = 1
    while out.exists():
        k += 1
        out = root / f"{stamp}-{loaded.spec.name}-compare-{k}"
    parts = await asyncio.to_thread(load_parts, loaded)
    runs: list[ReplayRun] = []
    current: RunningTestbed | None = None  # the testbed up now
    try:
        for i, pair in enumerate(pairs):
            console.rule(f"[bold]{i + 1}/{len(pairs)}: {pair}")
            prep = await asyncio.to_thread(prepare, parts, pair, opts.requests)
            if current is not None and not plan_matches(current, prep.plan):
                why = reload_refusal(current, prep) if reload else "--no-reload"
                if why is None:
                    await reload_announced(current, prep, console)
                else:
                    console.print(f"cannot reuse testbed {current.run_id} ({why})")
                    console.print(f"down: {await take_down(current.run_id)}")
                    current = None
            elif current is not None:
                console.print(f"same block ranges: reusing testbed {current.run_id}")
            if current is None:
                current = await up_announced(prep, runtime, console, opts.health_timeout_s)
            run = await replay_once(
                prep,
                current,
                out / pair,
                config=opts.broker,
                console=console,
                progress=opts.progress,
                plots=opts.plots,
                transport=opts.transport,
            )
            runs.append(run)
    finally:
        if current is not None:
            console.print(f"down: {await asyncio.shield(take_down(current.run_id))}")
    summaries = [(r.label, r.summary.to_dict()) for r in runs]
    files = await asyncio.to_thread(
        write_comparison,
        out,
        summaries,
        records=[r.records for r in runs],
        plots=opts.plots,
    )
    return CompareResult(out, tuple(runs), files)
