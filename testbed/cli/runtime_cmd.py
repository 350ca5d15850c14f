"""`testbed up / status / down / clean / doctor / image build`: bring a plan up on shaped links."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from testbed.cli.common import console, err_console, parse_params, print_json
from testbed.cli.main import app
from testbed.errors import ConfigError, RuntimeBackendError
from testbed.units import fmt_bytes, fmt_rate, fmt_seconds

image_app = typer.Typer(help="Build the node container image.", no_args_is_help=True)
app.add_typer(image_app, name="image")


def _resolve_model(model: str) -> Path:
    """A local HF folder, or `tiny`: the generated CI model, made once into the cache."""
    p = Path(model)
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ConfigError(
                f"{p} has no config.json; give a Hugging Face model folder", field="--model"
            )
        return p.resolve()
    if model == "tiny":
        from testbed.model.tiny import make_tiny_model
        from testbed.runtime.image import cache_dir

        dest = cache_dir() / "models" / "tiny-phi3"
        if not (dest / "config.json").exists():
            make_tiny_model(dest)
        return dest
    raise ConfigError(
        f"{model!r} is not a model folder; stages load real weights: give a local Hugging Face folder "
        "or `tiny` (made with `testbed model make-tiny`)",
        field="--model",
    )


def nodes_table(tb: Any, health: dict[str, str] | None = None) -> Table:
    t = Table(title=f"testbed {tb.run_id} ({tb.runtime}, shaping: {tb.backend}, {tb.status})")
    cols = ["node", "tier", "address", "blocks", "device", "CPUs", "memory limit"]
    for col in [*cols, *(["health"] if health is not None else [])]:
        t.add_column(col)
    for n in sorted(tb.nodes.values(), key=lambda n: (n.tier_index, n.name)):
        row = [
            n.name,
            n.tier,
            n.url,
            f"{n.start}..{n.end - 1}",
            n.device,
            "timing" if n.device.startswith("emulated") else (f"{n.cpus:g}" if n.cpus else "-"),
            fmt_bytes(n.mem_limit_bytes) if n.mem_limit_bytes else "-",
        ]
        if health is not None:
            row.append(health.get(n.name, "?"))
        t.add_row(*row)
    return t


def links_table(tb: Any) -> Table:
    t = Table(title="links: configured vs measured (hop from the host into the node)")
    for col in ("node", "link", "RTT conf.", "RTT meas.", "rate conf.", "rate meas.", "ok"):
        t.add_column(col)
    for c in tb.checks:
        t.add_row(
            c.node,
            c.link,
            fmt_seconds(c.configured_rtt_s),
            fmt_seconds(c.measured_rtt_s) if c.measured_rtt_s is not None else "-",
            fmt_rate(c.configured_rate_bps) if c.configured_rate_bps else "-",
            fmt_rate(c.measured_rate_bps) if c.measured_rate_bps is not None else "-",
            "[green]yes[/]" if c.ok else f"[yellow]NO[/] {c.note}",
        )
    return t


async def _up(
    topology: Path,
    model: str,
    partitioner: str,
    params: dict[str, Any],
    runtime: str,
    image_mode: str,
    backend: str | None,
    strict: bool,
    measure: bool,
    seed: int,
    health_timeout_s: float,
    emulate: str | None = None,
) -> Any:
    from testbed.cost.model import CostModel
    from testbed.cost.planner import make_plan
    from testbed.partition.base import PARTITIONERS
    from testbed.runtime.control import choose_backend, up_docker
    from testbed.runtime.measure import measure_links
    from testbed.spec.model_profile import load_model_profile
    from testbed.spec.topology import load_topology

    topo = load_topology(topology)
    extra: dict[str, list[str]] | None = None
    if emulate is not None:  # emulated devices running the studied model (testbed.emulation)
        from testbed.emulation.plumbing import emulation_specs, serve_args
        from testbed.emulation.standin import ensure_standin

        prof = load_model_profile(emulate, dtype="float16")
        model_dir = await asyncio.to_thread(ensure_standin, prof)
    else:
        model_dir = await asyncio.to_thread(_resolve_model, model)
        prof = load_model_profile(str(model_dir))
    part = PARTITIONERS.create(partitioner, params, field="--param")
    plan = make_plan(topo, CostModel(prof, None), part)
    if emulate is not None:
        extra = serve_args(emulation_specs(topo, plan, prof))
    chosen = await choose_backend(runtime, backend)
    if runtime == "docker":
        tb = await up_docker(
            topo,
            str(topology),
            plan,
            model_dir,
            backend=chosen,
            image_mode=image_mode,  # type: ignore[arg-type]
            seed=seed,
            health_timeout_s=health_timeout_s,
            extra_serve_args=extra,
        )
    elif runtime == "local":
        from testbed.runtime.localrun import up_local

        tb = await up_local(
            topo,
            str(topology),
            plan,
            model_dir,
            seed=seed,
            health_timeout_s=health_timeout_s,
            extra_serve_args=extra,
        )
    else:
        raise ConfigError(f"unknown runtime {runtime!r}; use docker or local", field="--runtime")
    if measure:
        try:
            tb.checks = await measure_links(tb)
        except BaseException:
            from testbed.runtime.control import down_sync

            await asyncio.to_thread(down_sync, tb.run_id)
            raise
        await asyncio.to_thread(tb.save)
        bad = [c for c in tb.checks if not c.ok]
        if bad and strict:
            from testbed.runtime.control import down_sync

            await asyncio.to_thread(down_sync, tb.run_id)
            raise RuntimeBackendError(
                "links off their configuration (--strict): "
                + "; ".join(f"{c.node} ({c.link}): {c.note}" for c in bad)
                + "; testbed taken down"
            )
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
        str, typer.Option(help="docker (containers) or local (processes)")
    ] = "docker",
    image_mode: Annotated[
        str, typer.Option(help="auto (dockerfile if python:3.11-slim can be pulled, else offline), offline (Debian base made with debootstrap) or dockerfile")
    ] = "auto",
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
    tb = asyncio.run(
        _up(
            topology,
            model,
            partitioner,
            parse_params(param),
            runtime,
            image_mode,
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
            err_console.print(f"[yellow]warning[/]: {c.node} ({c.link}): {c.note}")
    console.print(f"run id {tb.run_id}; stop with `testbed down {tb.run_id}`")


@app.command()
def status(
    run: Annotated[str | None, typer.Argument(help="run id (default: the latest)")] = None,
    measure: Annotated[bool, typer.Option(help="measure the links again")] = False,
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show the running testbed: nodes, health, links measured vs configured."""
    from testbed.runtime.base import list_states, load_running

    if run is None and not list_states():
        console.print("no testbed is running")
        return

    async def go() -> tuple[Any, dict[str, str]]:
        import aiohttp

        from testbed.runtime.measure import measure_links

        tb = load_running(run)
        health: dict[str, str] = {}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as s:
            for n in tb.nodes.values():
                try:
                    async with s.get(n.url + "/health") as r:
                        health[n.name] = "healthy" if r.status == 200 else f"HTTP {r.status}"
                except (aiohttp.ClientError, TimeoutError) as exc:
                    health[n.name] = f"down ({type(exc).__name__})"
        if measure:
            tb.checks = await measure_links(tb)
            await asyncio.to_thread(tb.save)
        return tb, health

    tb, health = asyncio.run(go())
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
def clean() -> None:
    """Remove anything labelled by the testbed that a crash left behind. Safe to repeat."""
    from testbed.runtime.control import clean_sync

    for line in clean_sync():
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
