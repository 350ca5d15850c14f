"""`testbed reproduce hyperion`: a paper's experiments with fair baselines, one command."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from testbed.cli.common import console
from testbed.cli.main import app
from testbed.errors import ConfigError

reproduce_app = typer.Typer(
    help="Reproduce a paper's experiments (our numbers beside the paper's).",
    no_args_is_help=True,
)
app.add_typer(reproduce_app, name="reproduce")


@reproduce_app.command("hyperion")
def hyperion_cmd(
    simulate: Annotated[
        bool, typer.Option("--simulate", help="run in the simulator (the default)")
    ] = False,
    emulate: Annotated[
        bool,
        typer.Option(
            "--emulate",
            help="run on the Docker testbed with emulated devices (fewer loads; each point is "
            "also simulated and the agreement printed)",
        ),
    ] = False,
    quick: Annotated[
        bool, typer.Option("--quick", help="fewer requests, loads and lengths (under 5 minutes)")
    ] = False,
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="folder for reproduction.md, plots and CSV files"),
    ] = None,
    runtime: Annotated[
        str | None,
        typer.Option("--runtime", help="with --emulate: docker (default) or local (processes)"),
    ] = None,
    dilation: Annotated[
        float | None,
        typer.Option("--dilation", help="with --emulate: time dilation k (host too small)"),
    ] = None,
    models: Annotated[
        str | None,
        typer.Option("--models", help="comma-separated model presets (default: both papers')"),
    ] = None,
) -> None:
    """Hyperion (arXiv 2511.14450) vs GPipe, HEFT, min_latency and the ablations on
    Phi-3-medium and Llama-3-8B over topologies/three-tier.yaml; writes reproduction.md."""
    import asyncio

    from testbed.experiment import reproduce as rp
    from testbed.experiment import reproduce_emulate as rpe
    from testbed.experiment.reproduce_report import headline_rows, write_report
    from testbed.paths import results_dir

    if simulate and emulate:
        raise ConfigError("give one of --simulate and --emulate, not both", field="--emulate")
    for name, value in (("--runtime", runtime), ("--dilation", dilation)):
        if value is not None and not emulate:
            raise ConfigError(f"{name} applies to --emulate runs only; drop it", field=name)
    cfg = rp.ReproConfig.quick() if quick else rp.ReproConfig.full()
    names = [m.strip() for m in models.split(",") if m.strip()] if models else None
    cfg = rp.with_options(cfg, names, runtime, dilation)
    if emulate:
        rpe.require_emulation()  # before anything runs
    mode = "emulate" if emulate else "simulate"
    out = (output or results_dir() / f"{time.strftime('%Y%m%d-%H%M%S')}-reproduce-hyperion-"
           f"{mode}{'-quick' if quick else ''}").resolve()  # fmt: skip

    def say(msg: str) -> None:
        console.print(msg)

    console.print(f"reproduce hyperion ({mode}, {cfg.size}) -> [bold]{out}[/]")
    if emulate:
        res = asyncio.run(rpe.run_emulated(cfg, out, console, say))
    else:
        from testbed.experiment.reproduce_sim import run_simulated

        res = run_simulated(cfg, out, say)
    files = write_report(res, out)
    console.print("\n".join(headline_rows(res)), markup=False)
    if res.agreement:
        from testbed.experiment.reproduce_report import agreement_rows

        console.print("\n".join(agreement_rows(res)), markup=False)
    console.print(f"{res.wall_s:.0f} s; report: [bold]{files['report']}[/]")
