"""`testbed up / status / down / clean / doctor / image build`: bring a plan up on shaped links."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from testbed.cli.common import console, err_console, parse_params, print_json, run_async
from testbed.cli.main import app
from testbed.errors import ConfigError
from testbed.units import fmt_bytes, fmt_rate, fmt_seconds

if TYPE_CHECKING:
    from testbed.runtime.base import RunningTestbed
    from testbed.runtime.interface import Runtime

image_app = typer.Typer(help="Build the node container image.", no_args_is_help=True)
app.add_typer(image_app, name="image")


def nodes_table(tb: RunningTestbed, health: dict[str, str] | None = None) -> Table:
    t = Table(title=f"testbed {tb.run_id} ({tb.runtime}, shaping: {tb.backend}, {tb.status})")
    cols = ["node", "tier", "address", "blocks", "device", "CPUs", "memory limit"]
    for col in [*cols, *(["health"] if health is not None else [])]:
        t.add_column(col)
    for n in sorted(tb.nodes.values(), key=lambda n: (n.tier_index, n.name)):
        row = [
            n.name,
            n.tier,
            n.url,
            f"{n.start}..{n.end - 1}" + (" (parked)" if n.parked else ""),
            n.device,
            "timing" if n.device.startswith("emulated") else (f"{n.cpus:g}" if n.cpus else "-"),
            fmt_bytes(n.mem_limit_bytes) if n.mem_limit_bytes else "-",
        ]
        if health is not None:
            row.append(health.get(n.name, "?"))
        t.add_row(*row)
    return t


def links_table(tb: RunningTestbed, *, now: float | None = None) -> Table:
    """Configured vs measured links, with when they were measured (``now``: for "... ago")."""
    import time

    now = time.time() if now is None else now
    t = Table(
        title="links: configured vs measured (from the host, or from a node of the stage before)"
    )
    cols = ("from", "node", "link", "RTT conf.", "RTT meas.", "rate conf.", "rate meas.", "ok")
    for col in (*cols, "measured"):
        t.add_column(col)
    for c in tb.checks:
        when = "-" if c.measured_at is None else f"{fmt_seconds(max(0.0, now - c.measured_at))} ago"
        t.add_row(
            c.src,
            c.node,
            c.link,
            fmt_seconds(c.configured_rtt_s),
            fmt_seconds(c.measured_rtt_s) if c.measured_rtt_s is not None else "-",
            fmt_rate(c.configured_rate_bps) if c.configured_rate_bps else "-",
            fmt_rate(c.measured_rate_bps) if c.measured_rate_bps is not None else "-",
            "[green]yes[/]" if c.ok else f"[yellow]NO[/] {c.note}",
            when,
        )
    return t


async def _up(
    topology: Path,
    model: str,
    partitioner: str,
    params: dict[str, Any],
    runtime: Runtime,
    backend: str | None,
    strict: bool,
    measure: bool,
    seed: int,
    health_timeout_s: float,
    emulate: str | None = None,
) -> RunningTestbed:
    from testbed.cost.model import CostModel
    from testbed.cost.planner import make_plan
    from testbed.experiment.models import model_folder
    from testbed.partition.base import PARTITIONERS
    from testbed.runtime.control import bring_up, check_backend, detach
    from testbed.runtime.interface import UpRequest
    from testbed.spec.model_profile import load_model_profile
    from testbed.spec.topology import load_topology

    check_backend(backend)
    topo = load_topology(topology)
    if emulate is not None:  # emulated devices running the studied model (testbed.emulation)
        from testbed.emulation.standin import ensure_standin

        prof = load_model_profile(emulate, dtype="float16")
        model_dir = await asyncio.to_thread(ensure_standin, prof)
    else:
        model_dir = await asyncio.to_thread(model_folder, model)
        prof = load_model_profile(str(model_dir))
    part = PARTITIONERS.create(partitioner, params, field="--param")
    plan = make_plan(topo, CostModel(prof, None), part)
    extra = None
    if emulate is not None:
        from testbed.emulation.plumbing import emulation_specs, serve_args

        extra = serve_args(emulation_specs(topo, plan, prof))
    req = UpRequest(
        topo,
        str(topology),
        plan,
        model_dir,
        seed=seed,
        health_timeout_s=health_timeout_s,
        backend=backend,  # type: ignore[arg-type]  # checked above
        extra_serve_args=extra,
    )
    tb = await bring_up(runtime, req, measure=measure, strict=strict)
    await detach(tb)  # up: the testbed outlives this command
    return tb


@app.command()
def up(
    topology: Annotated[Path, typer.Argument(help="topology YAML file")],
    model: Annotated[str, typer.Option(help="local HF model folder, or `tiny`")] = "tiny",
    partitioner: Annotated[str, typer.Option(help="registered partitioner")] = "bsdp",
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="partitioner KEY=VALUE")
    ] = None,
    runtime: Annotated[
        str,
        typer.Option(
            help="a registered runtime: docker (containers), local (processes), swarm (services)"
        ),
    ] = "docker",
    image_mode: Annotated[
        str | None,
        typer.Option(
            help="docker, swarm: auto (default: dockerfile if python:3.11-slim can be pulled, else "
            "offline), offline (Debian base made with debootstrap) or dockerfile"
        ),
    ] = None,
    backend: Annotated[
        str | None,
        typer.Option(help="force the shaping backend (kernel, kernel-rate+app-delay, app)"),
    ] = None,
    strict: Annotated[bool, typer.Option(help="a link off its configuration is an error")] = False,
    measure: Annotated[bool, typer.Option(help="measure RTT and throughput of every link")] = True,
    seed: Annotated[int, typer.Option(help="seed of the app shaper's jitter and loss")] = 0,
    health_timeout: Annotated[
        float, typer.Option(help="seconds to wait for the stage servers")
    ] = 180.0,
    json_out: Annotated[
        bool, typer.Option("--json", help="print the running testbed as JSON")
    ] = False,
    emulate: Annotated[
        str | None,
        typer.Option(
            help="emulated devices: nodes run this studied model (preset or config.json, "
            "float16) in time on their device profiles; a generated stand-in computes"
        ),
    ] = None,
) -> None:
    """Start one node per topology node with its planned blocks, shape the links, measure them."""
    from testbed.runtime.interface import RUNTIMES

    options = {} if image_mode is None else {"image_mode": image_mode}
    chosen = RUNTIMES.create(runtime, options, field="--runtime/--image-mode")
    tb = run_async(
        _up(
            topology,
            model,
            partitioner,
            parse_params(param),
            chosen,
            backend,
            strict,
            measure,
            seed,
            health_timeout,
            emulate,
        )
    )
    if json_out:
        print_json(tb.to_json())
        return
    console.print(nodes_table(tb))
    if tb.checks:
        console.print(links_table(tb))
    for note in tb.notes:
        err_console.print(f"note: {note}")
    for c in tb.checks:
        if not c.ok:
            err_console.print(f"[yellow]warning[/]: {c.src} -> {c.node} ({c.link}): {c.note}")
    console.print(f"run id {tb.run_id}; stop with `testbed down {tb.run_id}`")


@app.command()
def status(
    run: Annotated[str | None, typer.Argument(help="run id (default: the latest)")] = None,
    measure: Annotated[bool, typer.Option(help="measure the links again")] = False,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show the running testbed: nodes, health, links measured vs configured (as measured at
    `up`, with their age; --measure measures them again now)."""
    from testbed.runtime.base import list_states, load_running

    if run is None and not list_states():
        console.print("no testbed is running")
        return

    async def go() -> tuple[RunningTestbed, dict[str, str]]:
        from testbed.runtime.measure import health_report, measure_links

        tb = await asyncio.to_thread(load_running, run)
        health = await health_report(tb)
        if measure:
            tb.checks = await measure_links(tb)
            await asyncio.to_thread(tb.save)
        return tb, health

    tb, health = run_async(go())
    if json_out:
        print_json(tb.to_json() | {"health": health})
        return
    console.print(nodes_table(tb, health))
    if tb.checks:
        console.print(links_table(tb))


@app.command()
def down(
    run: Annotated[str | None, typer.Argument(help="run id (default: the latest)")] = None,
) -> None:
    """Stop and remove everything of a run. Safe to repeat."""
    from testbed.runtime.control import down_sync

    console.print(down_sync(run))


@app.command()
def clean(
    runs: Annotated[
        list[str] | None, typer.Argument(help="also remove these runs, live or not")
    ] = None,
    everything: Annotated[
        bool,
        typer.Option(
            "--all",
            help="remove every testbed run, container, network and namespace on this machine, "
            "live ones and other users' included",
        ),
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask before --all")] = False,
) -> None:
    """Remove what no live testbed owns: runs whose owner process died before cleaning up, runs
    whose nodes are all gone, and the RUNS named. Safe to repeat."""
    from testbed.runtime.control import clean_sync

    if everything and not yes:
        if not sys.stdin.isatty():
            raise ConfigError(
                "clean --all removes live testbeds too; confirm with --yes", field="--all"
            )
        typer.confirm(
            "remove every testbed object on this machine, live runs included?", abort=True
        )
    for line in clean_sync(everything=everything, runs=tuple(runs or ())):
        console.print(line)


@app.command()
def doctor(json_out: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Check the host: Docker, cgroups, netem/htb/tbf, NVIDIA runtime, subnets, permissions."""
    from testbed.runtime.doctor import run_checks

    checks = run_checks()
    if json_out:
        print_json([c.__dict__ for c in checks])
    else:
        t = Table(title="testbed doctor")
        for col in ("check", "", "found", "what to do"):
            t.add_column(col)
        colour = {"ok": "green", "warn": "yellow", "fail": "red"}
        for c in checks:
            t.add_row(c.name, f"[{colour[c.level]}]{c.level}[/]", c.found, c.fix)
        console.print(t)
    if any(c.level == "fail" for c in checks):
        raise typer.Exit(1)


@image_app.command("build")
def image_build(
    mode: Annotated[
        str, typer.Option(help="offline (local Debian base) or dockerfile (python:3.11-slim)")
    ] = "auto",
    force: Annotated[bool, typer.Option(help="rebuild the code layer even if present")] = False,
) -> None:
    """Build (or reuse) the node image and print its tag and the time it took."""
    from testbed.runtime.image import ensure_image

    info = ensure_image(mode, force=force)  # type: ignore[arg-type]
    console.print(
        json.dumps({"tag": info.tag, "built": info.built, "seconds": round(info.seconds, 1)})
    )
