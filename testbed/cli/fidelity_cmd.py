"""`testbed fidelity RUN_DIR`: simulate a finished run with its own inputs and compare."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from testbed.cli.common import console
from testbed.cli.main import app


def _fmt(kind: str, metric: str, v: float | None) -> str:
    if v is None:
        return "-"
    if metric.startswith("util"):
        return f"{v * 100:.1f} %"
    if metric == "completed":
        return f"{v:g}"
    return f"{v * 1e3:.1f} ms" if v < 1 else f"{v:.3f} s"


@app.command("fidelity")
def fidelity_cmd(
    run_dir: Annotated[Path, typer.Argument(help="a finished run folder of `testbed replay`")],
    profile: Annotated[
        Path | None,
        typer.Option(
            "--profile",
            help="a calibrated profile from another run (`testbed calibrate`): out-of-sample "
            "(default: calibrate on RUN_DIR itself, in-sample; an emulated run: its devices' "
            "own timing)",
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("-o", "--output", help="where to write fidelity.json")
    ] = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="exit 1 when a tolerance is missed")
    ] = False,
) -> None:
    """Simulate RUN_DIR's run (its plan, scheduler, requests) and compare with what it measured."""
    from testbed.sim.fidelity import (
        EMULATED_NOTE,
        FIDELITY_FILE,
        IN_SAMPLE_NOTE,
        Tolerances,
        check_fidelity,
        write_fidelity,
    )

    tol = Tolerances()
    res = check_fidelity(run_dir, profile, tol)
    table = Table(title=f"fidelity: {res.run_dir.name}")
    for col in ("metric", "real", "simulated", "error", "tolerance", ""):
        table.add_column(col, justify="left" if col in ("metric", "") else "right")
    for c in res.checks:
        if c.error is None:
            err = "-"
        elif c.kind == "points":
            err = f"{c.error * 100:.1f} pt"
        else:
            err = f"{c.error * 100:.1f} %"
        limit = "-" if c.limit is None else (
            f"{c.limit * 100:.0f} pt" if c.kind == "points" else f"{c.limit * 100:.0f} %"
        )  # fmt: skip
        mark = {True: "[green]ok[/]", False: "[red]MISSED[/]", None: "info"}[c.ok]
        table.add_row(
            c.metric, _fmt(c.kind, c.metric, c.real), _fmt(c.kind, c.metric, c.sim), err, limit,
            mark,
        )  # fmt: skip
    console.print(table)
    if res.timing == "emulated":
        k = f", time dilation {res.dilation:g} undone" if res.dilation != 1 else ""
        over = "" if res.overrun_fraction is None else f", {res.overrun_fraction:.1%} overran"
        console.print(
            f"{EMULATED_NOTE} (cost model: {res.cost_source}{k}{over}; per-call overhead "
            f"{res.hop_overhead_s * 1e3:.2f} ms)"
        )
    elif res.in_sample:
        console.print(f"[yellow]note[/]: {IN_SAMPLE_NOTE}")
    else:
        console.print(f"out-of-sample: profile fitted on {res.profile_source}")
    for note in res.notes:
        console.print(f"[yellow]note[/]: {note}")
    dest = write_fidelity(res, out if out is not None else res.run_dir / FIDELITY_FILE, tol)
    verdict = "[green]within tolerances[/]" if res.ok else "[red]tolerances missed[/]"
    console.print(f"{verdict}; wrote [bold]{dest}[/]")
    if strict and not res.ok:
        raise SystemExit(1)  # as replay --strict (typer.Exit is returned, not raised, by main)
