"""`testbed plan` and `testbed list`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from testbed.cli.common import console, parse_params, print_json
from testbed.cli.main import app
from testbed.cost.capacity import PlanCapacity, plan_capacity
from testbed.cost.model import CostModel
from testbed.cost.planner import make_plan
from testbed.partition import PARTITIONERS
from testbed.schedule import SCHEDULERS
from testbed.spec.devices import CATALOG
from testbed.spec.model_profile import (
    PRESETS,
    check_fits_context,
    load_measured_profile,
    load_model_profile,
)
from testbed.spec.plan import MAX_CONCURRENCY, Plan, RequestShape
from testbed.spec.quantities import MAX_TOKENS
from testbed.spec.topology import load_topology
from testbed.units import fmt_bytes, fmt_seconds


def plan_table(plan: Plan) -> Table:
    table = Table(
        title=f"{plan.model} ({plan.num_blocks} blocks, {plan.dtype}) on {plan.topology} "
        f"- {plan.partitioner['name']}, cost from {plan.cost_source}"
    )
    for col in (
        "tier",
        "blocks",
        "#",
        "replicas",
        "compute",
        "transfer",
        "link delay",
        "memory used / available",
        "",
    ):
        table.add_column(
            col, justify="right" if col in ("#", "compute", "transfer", "link delay") else "left"
        )
    for s in plan.stages:
        blocks = "-" if s.empty else f"{s.start}-{s.end - 1}"
        extras = [x for x, on in (("embed", s.holds_embedding), ("head", s.holds_head)) if on]
        if extras:
            blocks += f" (+{', '.join(extras)})"
        mark = "bottleneck" if s.tier == plan.bottleneck_tier else ""
        table.add_row(
            s.tier,
            blocks,
            str(s.num_blocks),
            ", ".join(s.nodes) or "-",
            fmt_seconds(s.compute_s),
            fmt_seconds(s.transfer_s),
            fmt_seconds(s.link_delay_s),
            f"{fmt_bytes(s.mem_bytes)} / {fmt_bytes(s.mem_available_bytes)}",
            mark,
        )
    counted = (
        "compute + transfer; link delay adds latency, not occupancy"
        if plan.include_transfer
        else "compute only: this partitioner did not count transfer"
    )
    cap = plan_capacity(plan)
    table.caption = (
        f"per request of {plan.shape.prompt_tokens} prompt + {plan.shape.output_tokens} "
        f"output tokens, KV reserved for {plan.shape.concurrency}; bottleneck "
        f"{fmt_seconds(plan.bottleneck_s)} on {plan.bottleneck_tier} ({counted})\n"
        f"{capacity_line(cap)}"
    )
    return table


def capacity_line(cap: PlanCapacity) -> str:
    """One line saying at what load the plan saturates."""
    if cap.capacity_rps == float("inf"):
        return "capacity: unbounded (no resource is busy per request)"
    return (
        f"capacity {cap.capacity_rps:.3g} req/s: above it the {cap.bottleneck} "
        f"({fmt_seconds(cap.bottleneck_time_s)} per request over its replicas) saturates and "
        f"queues grow without bound; at r req/s it is r / {cap.capacity_rps:.3g} busy"
    )


@app.command()
def plan(
    topology: Annotated[Path, typer.Argument(help="topology YAML file")],
    model: Annotated[str, typer.Option(help="preset name or local HF model folder")] = "phi-3-mini",
    partitioner: Annotated[
        str, typer.Option(help="registered partitioner (see `testbed list`)")
    ] = "bsdp",
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="partitioner parameter KEY=VALUE")
    ] = None,
    dtype: Annotated[str, typer.Option(help="weights/KV dtype")] = "float16",
    prompt_tokens: Annotated[int, typer.Option(min=1, max=MAX_TOKENS)] = 512,
    output_tokens: Annotated[int, typer.Option(min=1, max=MAX_TOKENS)] = 128,
    concurrency: Annotated[
        int,
        typer.Option(min=1, max=MAX_CONCURRENCY, help="requests whose KV cache each stage holds"),
    ] = 4,
    profile: Annotated[
        Path | None, typer.Option(help="measured profile JSON from `testbed profile`")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print the plan as JSON")] = False,
) -> None:
    """Plan the split of MODEL over TOPOLOGY's tiers and print it per tier."""
    topo = load_topology(topology)
    prof = load_model_profile(model, dtype=dtype)
    context = prof.arch.max_position_embeddings
    check_fits_context(prompt_tokens, output_tokens, context, source=None, field="--prompt-tokens")
    measured = load_measured_profile(profile) if profile else None
    part = PARTITIONERS.create(partitioner, parse_params(param), field="--param")
    result = make_plan(
        topo,
        CostModel(prof, measured),
        part,
        RequestShape(
            prompt_tokens=prompt_tokens, output_tokens=output_tokens, concurrency=concurrency
        ),
    )
    if json_out:
        print_json({**result.model_dump(mode="json"), "capacity": plan_capacity(result).to_dict()})
    else:
        console.print(plan_table(result))


@app.command("list")
def list_cmd(
    what: Annotated[
        str, typer.Argument(help="partitioners | schedulers | devices | models | all")
    ] = "all",
    json_out: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List registered partitioners and schedulers, the device catalog and model presets."""
    choices = ("partitioners", "schedulers", "devices", "models", "all")
    if what not in choices:
        from testbed.errors import ConfigError

        raise ConfigError(f"cannot list {what!r}; choose one of {', '.join(choices)}")
    data: dict[str, list[Any]] = {
        "partitioners": PARTITIONERS.describe(),
        "schedulers": SCHEDULERS.describe(),
        "devices": [{"name": k, **v} for k, v in sorted(CATALOG.items())],
        "models": sorted(PRESETS),
    }
    if what != "all":
        data = {what: data[what]}
    if json_out:
        print_json(data)
        return
    for key, rows in data.items():
        table = Table(title=key)
        if key in ("partitioners", "schedulers"):
            for col in ("name", "parameters", "description"):
                table.add_column(col)
            for r in rows:
                ps = ", ".join(f"{p['name']}={p['default']}" for p in r["params"])
                table.add_row(r["name"], ps, r["doc"])
        elif key == "devices":
            for col in ("name", "kind", "label", "peak", "mem bw", "mem"):
                table.add_column(col)
            for r in rows:
                table.add_row(
                    r["name"],
                    r["kind"],
                    r["label"],
                    f"{r['peak_flops'] / 1e12:g} TFLOPS",
                    f"{r['mem_bandwidth'] / 1e9:g} GB/s",
                    fmt_bytes(r["mem"]),
                )
        else:
            table.add_column("preset")
            for r in rows:
                table.add_row(str(r))
        console.print(table)


@app.command()
def check(
    file: Annotated[Path, typer.Argument(help="a scenario or topology YAML file")],
) -> None:
    """Validate a scenario (with its topology, model, policies, workload and plan) or a topology."""
    from testbed.spec.loading import read_mapping

    data = read_mapping(file, "scenario or topology")
    if "tiers" in data:
        topo = load_topology(file)
        console.print(
            f"[green]ok[/green] topology {topo.name}: {len(topo.tiers)} tiers, "
            f"{len(topo.nodes())} nodes, {len(topo.links)} links"
        )
        return
    from testbed.spec.scenario import load_scenario
    from testbed.workload.spec import load_workload

    scn = load_scenario(file)
    s = scn.spec
    topo = load_topology(scn.topology_path)
    prof = load_model_profile(s.model, dtype=s.dtype, base_dir=scn.base_dir)
    measured = load_measured_profile(scn.resolve(s.profile)) if s.profile else None
    part = PARTITIONERS.create(s.partitioner.name, s.partitioner.params)
    result = make_plan(topo, CostModel(prof, measured), part, s.planning)
    wl = load_workload(scn.workload, scn.base_dir, default_seed=s.seed)
    console.print(plan_table(result))
    console.print(
        f"[green]ok[/green] scenario {s.name}: {len(wl)} requests, "
        f"scheduler {s.scheduler.name}, runtime {s.runtime}"
    )
