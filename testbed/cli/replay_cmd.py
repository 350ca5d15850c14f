"""`testbed replay` and `testbed compare`: replay a scenario's workload through the stages."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from testbed.cli.common import console, run_async
from testbed.cli.main import app
from testbed.errors import ConfigError

if TYPE_CHECKING:
    from testbed.metrics.summary import Summary

MAX_REQUESTS_HELP = "replay only the first N requests (N >= 1)"


# --transport, the same for replay and compare
TransportOption = Annotated[
    str | None,
    typer.Option(
        "--transport",
        help="relay: the broker carries every hop; forward: stage to stage (local and docker "
        "runtimes); default: the scenario's",
    ),
]


def _check_runtime(name: str | None) -> None:
    if name is not None:
        from testbed.runtime.interface import RUNTIMES

        try:
            RUNTIMES.get(name)
        except ConfigError as exc:
            raise ConfigError(str(exc), field="--runtime") from None


def _check_transport(name: str | None) -> None:
    if name is not None and name not in ("relay", "forward"):
        raise ConfigError(f"{name!r} is not a transport; use relay or forward", field="--transport")


def _summary_and_paths_of(summary: Summary, label: str) -> None:
    from testbed.metrics.compare import summary_table

    s = summary.to_dict()
    console.print(summary_table(s, title=f"{label}: summary"))
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
        str | None,
        typer.Option(
            "--runtime", help="a registered runtime: local | docker (default: the scenario's)"
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", help="results root (default: the scenario's)")
    ] = None,
    requests: Annotated[
        int | None, typer.Option("--max-requests", "--requests", min=1, help=MAX_REQUESTS_HELP)
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
    transport: TransportOption = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="no progress bar")] = False,
) -> None:
    """Replay the scenario's workload through the testbed and write a results folder."""
    from testbed.experiment.replay import ReplayOptions, replay_scenario
    from testbed.spec.scenario import load_scenario

    _check_runtime(runtime)
    _check_transport(transport)
    loaded = load_scenario(scenario)
    opts = ReplayOptions(
        run_id=run_id,
        up=up,
        runtime=runtime,
        output=output.resolve() if output else None,
        requests=requests,
        progress=not no_progress,
        transport=transport,
    )
    run = run_async(replay_scenario(loaded, opts, console, pair=policy))
    _summary_and_paths_of(run.summary, run.label)
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
        str | None,
        typer.Option(
            "--runtime", help="a registered runtime: local | docker (default: the scenario's)"
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", help="results root (default: the scenario's)")
    ] = None,
    requests: Annotated[
        int | None, typer.Option("--max-requests", "--requests", min=1, help=MAX_REQUESTS_HELP)
    ] = None,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict", help="emulated runs: fail (exit 1) when over 1 % of steps overran"
        ),
    ] = False,
    transport: TransportOption = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="no progress bar")] = False,
    simulate: Annotated[bool, typer.Option("--simulate", help="in simulated time")] = False,
    no_reload: Annotated[
        bool,
        typer.Option(
            "--no-reload",
            help="a new testbed for every plan with other block ranges (default: load the "
            "new ranges into the running nodes when they include the plan's)",
        ),
    ] = False,
) -> None:
    """Replay the same workload under several policy pairs, each with its plan's block ranges,
    and compare them side by side (ratios to the first pair)."""
    if simulate:
        from testbed.cli.sim_cmd import simulate_compare

        ps = [p.strip() for p in (policies or "").split(",") if p.strip()]
        return simulate_compare(scenario, ps, output.resolve() if output else None, requests)
    from testbed.experiment.compare import compare_scenario
    from testbed.experiment.replay import ReplayOptions
    from testbed.metrics.compare import compare_rows, rich_table
    from testbed.spec.scenario import load_scenario

    _check_runtime(runtime)
    _check_transport(transport)
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
        transport=transport,
    )
    res = run_async(compare_scenario(loaded, pairs, opts, console, reload=not no_reload))
    labels = [r.label for r in res.runs]
    rows = compare_rows([(r.label, r.summary.to_dict()) for r in res.runs])
    console.print(rich_table(labels, rows, title=f"{loaded.spec.name}: comparison"))
    for r in res.runs:
        console.print(f"  {r.label}: {r.out_dir}")
    console.print(
        f"results: [bold]{res.out_dir}[/] (comparison.md, comparison.png, one folder per pair)"
    )
    _check_strict(list(res.runs), strict)


@app.command("report")
def report_cmd(
    run_dir: Annotated[Path, typer.Argument(help="a results folder `testbed replay` wrote")],
    plots: Annotated[bool, typer.Option(help="draw the PNG plots")] = True,
) -> None:
    """Rebuild summary.json, the tables and the plots of a run from its requests.jsonl (e.g.
    after the replay was killed: every request that completed is in it)."""
    from testbed.experiment.report import rebuild

    res = rebuild(run_dir, plots=plots)
    _summary_and_paths_of(res.summary, run_dir.name)
    if res.skipped_lines:
        console.print(f"[yellow]skipped {res.skipped_lines} unreadable line(s)[/] (cut by a kill)")
    if res.not_recorded:
        console.print(
            f"[yellow]{res.not_recorded} of {res.planned} planned requests have no record[/]: "
            "the replay stopped before they ended; the summary covers the others"
        )
    console.print(f"rebuilt from {res.records} records: [bold]{run_dir}[/]")
