"""`testbed replay` and `testbed compare`: replay a scenario's workload through the stages."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from testbed.cli.common import console
from testbed.cli.main import app

T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, with SIGTERM cancelling the run like Ctrl-C does, so a testbed that was
    brought up here is always brought down."""

    async def main() -> T:
        task = asyncio.ensure_future(coro)
        loop = asyncio.get_running_loop()
        owner = os.getpid()

        # Not loop.add_signal_handler: its wakeup fd is inherited by forked children (pyroute2
        # forks a helper per network namespace and stops it with SIGTERM), and the child's
        # signal would then cancel this run. A plain handler acts only in this process.
        def on_term(signum: int, _frame: object) -> None:
            if os.getpid() != owner:
                os._exit(128 + signum)
            loop.call_soon_threadsafe(task.cancel)

        previous = signal.signal(signal.SIGTERM, on_term)
        try:
            return await task
        finally:
            signal.signal(signal.SIGTERM, previous)

    try:
        return asyncio.run(main())
    except (KeyboardInterrupt, asyncio.CancelledError):
        console.print("[yellow]interrupted[/]")
        raise SystemExit(130) from None


def _summary_and_paths(run: object) -> None:
    from testbed.metrics.compare import summary_table

    s = run.summary.to_dict()  # type: ignore[attr-defined]
    console.print(summary_table(s, title=f"{run.label}: summary"))  # type: ignore[attr-defined]
    failed = s.get("failed_by_reason") or {}
    for reason, n in failed.items():
        console.print(f"[red]{n} failed[/]: {reason}")


def _check_strict(runs: list[Any], strict: bool) -> None:
    """Emulated runs: --strict turns an overrun fraction above 1 % into exit code 1."""
    from testbed.emulation.report import overrun_warning

    bad = [(r.label, w) for r in runs if r.emulation and (w := overrun_warning(r.emulation))]
    if strict and bad:
        for label, warn in bad:
            console.print(f"[red]{label}[/]: {warn}")
        raise SystemExit(1)


@app.command("replay")
def replay_cmd(
    scenario: Annotated[Path, typer.Argument(help="scenario YAML file")],
    run_id: Annotated[
        str | None, typer.Option("--run-id", help="the running testbed to use (default: latest)")
    ] = None,
    up: Annotated[
        bool | None,
        typer.Option(
            "--up/--no-up",
            help="bring a testbed up for this replay and down after it (default: use the running "
            "one, else bring one up)",
        ),
    ] = None,
    runtime: Annotated[
        str | None, typer.Option("--runtime", help="local | docker (default: the scenario's)")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", help="results root (default: the scenario's)")
    ] = None,
    requests: Annotated[
        int | None,
        typer.Option(
            "--requests", "--max-requests", min=1, help="replay only the first N requests"
        ),
    ] = None,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict", help="emulated runs: fail (exit 1) when over 1 % of steps overran"
        ),
    ] = False,
    policy: Annotated[
        str | None,
        typer.Option("--policy", help="PARTITIONER+SCHEDULER instead of the scenario's"),
    ] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="no progress bar")] = False,
) -> None:
    """Replay the scenario's workload through the testbed and write a results folder."""
    from testbed.broker.replay import ReplayOptions, check_runtime, replay_scenario
    from testbed.spec.scenario import load_scenario

    check_runtime(runtime)
    loaded = load_scenario(scenario)
    opts = ReplayOptions(
        run_id=run_id,
        up=up,
        runtime=runtime,
        output=output.resolve() if output else None,
        requests=requests,
        progress=not no_progress,
    )
    run = _run(replay_scenario(loaded, opts, console, pair=policy))
    _summary_and_paths(run)
    console.print(f"results: [bold]{run.out_dir}[/]")
    _check_strict([run], strict)


@app.command("compare")
def compare_cmd(
    scenario: Annotated[Path, typer.Argument(help="scenario YAML file")],
    policies: Annotated[
        str | None,
        typer.Option(
            "--policies",
            help="comma-separated PARTITIONER+SCHEDULER pairs, the first is the reference "
            "(default: the scenario's compare list)",
        ),
    ] = None,
    runtime: Annotated[
        str | None, typer.Option("--runtime", help="local | docker (default: the scenario's)")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", help="results root (default: the scenario's)")
    ] = None,
    requests: Annotated[
        int | None,
        typer.Option(
            "--requests", "--max-requests", min=1, help="replay only the first N requests"
        ),
    ] = None,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict", help="emulated runs: fail (exit 1) when over 1 % of steps overran"
        ),
    ] = False,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="no progress bar")] = False,
) -> None:
    """Replay the same workload under several policy pairs, each on its own testbed, and
    compare them side by side (ratios to the first pair)."""
    from testbed.broker.replay import ReplayOptions, check_runtime, compare_scenario
    from testbed.metrics.compare import compare_rows, rich_table
    from testbed.spec.scenario import load_scenario

    check_runtime(runtime)
    loaded = load_scenario(scenario)
    pairs = (
        [p.strip() for p in policies.split(",") if p.strip()]
        if policies is not None
        else list(loaded.spec.compare)
    )
    opts = ReplayOptions(
        up=True,
        runtime=runtime,
        output=output.resolve() if output else None,
        requests=requests,
        progress=not no_progress,
    )
    res = _run(compare_scenario(loaded, pairs, opts, console))
    labels = [r.label for r in res.runs]
    rows = compare_rows([(r.label, r.summary.to_dict()) for r in res.runs])
    console.print(rich_table(labels, rows, title=f"{loaded.spec.name}: comparison"))
    for r in res.runs:
        console.print(f"  {r.label}: {r.out_dir}")
    console.print(
        f"results: [bold]{res.out_dir}[/] (comparison.md, comparison.png, one folder per pair)"
    )
    _check_strict(list(res.runs), strict)
