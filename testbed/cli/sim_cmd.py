"""`testbed simulate`, `testbed sweep`, `testbed calibrate`: the scenario in simulated time."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from testbed.cli.common import console
from testbed.cli.main import app
from testbed.errors import ConfigError


def _floats(text: str | None, option: str) -> list[float]:
    if text is None:
        return []
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(
            f"{text!r} is not a comma-separated list of numbers; write e.g. 0.25,0.5,1,2",
            field=option,
        ) from None


def _slowdown(items: list[str] | None) -> dict[str, float]:
    out = {}
    for item in items or []:
        name, _, factor = item.partition("=")
        try:
            out[name.strip()] = float(factor)
        except ValueError:
            raise ConfigError(
                f"{item!r} is not NODE=FACTOR; write e.g. fog-1=3", field="--slow"
            ) from None
    return out


def simulate_compare(
    scenario: Path, pairs: list[str], output: Path | None, requests: int | None
) -> None:
    """`testbed compare --simulate` (called from the compare command)."""
    from testbed.metrics.compare import compare_rows, rich_table
    from testbed.sim.run import compare_simulated
    from testbed.spec.scenario import load_scenario

    loaded = load_scenario(scenario)
    out, runs = compare_simulated(
        loaded, pairs or list(loaded.spec.compare), output=output, requests=requests
    )
    rows = compare_rows([(r.label, r.summary.to_dict()) for r in runs])
    console.print(rich_table([r.label for r in runs], rows, title=f"{loaded.spec.name}: simulated"))
    for r in runs:  # with a timeline: E2E of the requests arriving between its events
        parts = [
            f"[{p['from_s']:g}s, {'end' if p['to_s'] is None else format(p['to_s'], 'g') + 's'}): "
            + ("-" if p["e2e_mean_s"] is None else f"{p['e2e_mean_s']:.3g}s")
            for p in r.phases
        ]
        if len(parts) > 1:
            console.print(f"{r.label}: E2E mean by arrival {'  '.join(parts)}")
    console.print(f"results: [bold]{out}[/] (simulated)")


@app.command("simulate")
def simulate_cmd(
    scenario: Annotated[Path, typer.Argument(help="scenario YAML file (the same as for replay)")],
    policy: Annotated[
        str | None, typer.Option("--policy", help="PARTITIONER+SCHEDULER instead of the scenario's")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", help="results root (default: the scenario's)")
    ] = None,
    requests: Annotated[
        int | None,
        typer.Option(
            "--max-requests", "--requests", min=1, help="simulate only the first N requests"
        ),
    ] = None,
    max_batch: Annotated[
        int | None,
        typer.Option(
            "--max-batch",
            min=1,
            max=4096,
            help="continuous batching: steps every node runs together (1 = one at a time); "
            "overrides the topology's and the scenario's max_batch (default: theirs, else 1)",
        ),
    ] = None,
    slow: Annotated[
        list[str] | None,
        typer.Option(
            "--slow", help="NODE=FACTOR: that node really takes FACTOR x its predicted time"
        ),
    ] = None,
    no_plots: Annotated[bool, typer.Option("--no-plots", help="skip the PNG plots")] = False,
) -> None:
    """Run the scenario end to end in simulated time; writes the same folder as replay."""
    from testbed.metrics.compare import summary_table
    from testbed.sim.engine import SimConfig
    from testbed.sim.run import simulate_scenario
    from testbed.spec.scenario import load_scenario

    loaded = load_scenario(scenario)
    run = simulate_scenario(
        loaded,
        pair=policy,
        output=output.resolve() if output else None,
        requests=requests,
        config=SimConfig(slowdown=_slowdown(slow), max_batch=max_batch),
        plots=not no_plots,
    )
    console.print(summary_table(run.summary.to_dict(), title=f"{run.label}: simulated"))
    for reason, n in run.summary.failed_by_reason.items():
        console.print(f"[red]{n} failed[/]: {reason}")
    console.print(f"results: [bold]{run.out_dir}[/] ({run.outcome.events} events)")


@app.command("sweep")
def sweep_cmd(
    scenario: Annotated[Path, typer.Argument(help="scenario YAML file")],
    rates: Annotated[
        str | None, typer.Option("--rates", help="mean request rates, req/s, e.g. 0.25,0.5,1,2")
    ] = None,
    output_tokens: Annotated[
        str | None, typer.Option("--output-tokens", help="output lengths, e.g. 32,128,512")
    ] = None,
    prompt_tokens: Annotated[
        str | None, typer.Option("--prompt-tokens", help="prompt lengths, e.g. 128,512,2048")
    ] = None,
    policies: Annotated[
        str | None,
        typer.Option(
            "--policies", help="comma-separated pairs (default: the scenario's compare list)"
        ),
    ] = None,
    simulate: Annotated[
        bool, typer.Option("--simulate", help="run every point in simulation")
    ] = False,
    output: Annotated[Path | None, typer.Option("--output", help="results root")] = None,
    requests: Annotated[
        int | None, typer.Option("--requests", min=1, help="first N requests")
    ] = None,
) -> None:
    """Latency-vs-load (or vs length) curves for every policy pair: one table, one plot."""
    from testbed.sim.sweep import markdown, run_sweep, write_sweep
    from testbed.spec.scenario import load_scenario

    given = [
        (n, v)
        for n, v in (
            ("rate", rates),
            ("output_tokens", output_tokens),
            ("prompt_tokens", prompt_tokens),
        )
        if v
    ]
    if len(given) != 1:
        raise ConfigError("give exactly one of --rates, --output-tokens, --prompt-tokens")
    if not simulate:
        raise ConfigError(
            "sweep runs in simulation (one container testbed per point would take hours): add --simulate",
            field="--simulate",
        )
    variable, text = given[0]
    values = _floats(text, "--" + variable.replace("_", "-").replace("rate", "rates"))
    loaded = load_scenario(scenario)
    pairs = (
        [p.strip() for p in policies.split(",") if p.strip()]
        if policies
        else list(loaded.spec.compare)
    )
    points = run_sweep(loaded, pairs, variable, values, requests=requests)
    root = output.resolve() if output else loaded.resolve(loaded.spec.output)
    out = write_sweep(root, loaded.spec.name, points)
    console.print(markdown(points))
    console.print(f"results: [bold]{out}[/] (sweep.md, sweep.csv, sweep.png)")


@app.command("calibrate")
def calibrate_cmd(
    run_dir: Annotated[Path, typer.Argument(help="a run folder (requests.jsonl with spans)")],
    out: Annotated[Path, typer.Option("-o", "--output", help="profile JSON to write")] = Path(
        "profile.json"
    ),
) -> None:
    """Fit per-node step times and per-hop overhead; set the scenario's `profile:` to the file."""
    from testbed.sim.calibrate import calibrate_run, describe, write_profile

    prof = calibrate_run(run_dir)
    for line in describe(prof):
        console.print(line)
    console.print(f"wrote [bold]{write_profile(prof, out)}[/]")
