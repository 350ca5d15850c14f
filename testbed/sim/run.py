"""`testbed simulate` / `compare --simulate`: scenario -> plan -> simulated replay -> run folder.

Uses the smallest surface of the orchestration: :func:`load_scenario`, the planner
(:func:`make_plan`), the workload reader (:func:`load_workload`) and the broker's pure parts
(:class:`Layout`, :class:`WorkPredictor`). No weights are needed: a planning preset
(``model: phi-3-medium``) simulates as well as a model folder.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from testbed.broker.layout import Layout, WorkPredictor
from testbed.cost.model import CostModel
from testbed.cost.planner import NodeBlockFn, make_plan
from testbed.errors import ConfigError
from testbed.metrics.summary import SLO, Summary, class_slos, summarize
from testbed.schedule.base import Scheduler
from testbed.sim.classes import config_dict, scenario_config
from testbed.sim.engine import SimConfig, SimOutcome, Simulator
from testbed.sim.links import Network
from testbed.sim.reference import ReferenceSimulator
from testbed.sim.steps import (
    CalibratedProfile,
    StepTimes,
    is_calibrated_profile,
    load_calibrated_profile,
    per_block_request_s,
)
from testbed.spec.model_profile import load_measured_profile, load_model_profile
from testbed.spec.plan import Plan, RequestShape
from testbed.spec.scenario import LoadedScenario, policies
from testbed.spec.topology import Topology, load_topology
from testbed.workload.request import TraceRequest, Workload


@dataclass(frozen=True)
class SimSetup:
    """Everything one simulated run needs (the same parts `replay` prepares)."""

    loaded: LoadedScenario
    partitioner: str
    partitioner_params: dict[str, Any]
    scheduler: str
    scheduler_params: dict[str, Any]
    topology: Topology
    cost: CostModel
    calibrated: CalibratedProfile | None
    plan: Plan
    layout: Layout
    workload: Workload
    requests: tuple[TraceRequest, ...]

    @property
    def pair(self) -> str:
        return f"{self.partitioner}+{self.scheduler}"

    def make_scheduler(self) -> Scheduler:
        from testbed.schedule import SCHEDULERS

        return SCHEDULERS.create(self.scheduler, self.scheduler_params, field="scheduler")


def _model_source(loaded: LoadedScenario) -> str | Path:
    spec = loaded.spec
    if spec.model_dir is not None:
        return loaded.resolve(spec.model_dir)
    folder = loaded.resolve(Path(spec.model))
    return folder if (folder / "config.json").exists() else spec.model


def planner_times(calibrated: CalibratedProfile | None) -> NodeBlockFn | None:
    """The calibrated nodes' per-block times for the planner (None: plan from the cost model)."""
    if calibrated is None or not calibrated.nodes:
        return None
    fits = calibrated.nodes

    def per_block(node: str, shape: RequestShape) -> float | None:
        fit = fits.get(node)
        return (
            None
            if fit is None
            else per_block_request_s(fit, shape.prompt_tokens, shape.output_tokens)
        )

    return per_block


def prepare_sim(
    loaded: LoadedScenario, pair: str | None = None, requests_limit: int | None = None
) -> SimSetup:
    """Plan, layout and workload of the scenario (``pair`` overrides its policies)."""
    from testbed.partition import PARTITIONERS
    from testbed.spec.timeline import scale_arrivals
    from testbed.workload.spec import load_workload

    spec = loaded.spec
    part, part_params, sched, sched_params = policies(spec, pair)
    topo = load_topology(loaded.topology_path)
    profile = load_model_profile(_model_source(loaded), dtype=spec.dtype, base_dir=loaded.base_dir)
    calibrated, measured = None, None
    if spec.profile is not None:
        path = loaded.resolve(spec.profile)
        if is_calibrated_profile(path):
            calibrated = load_calibrated_profile(path)
        else:
            measured = load_measured_profile(path)
    cost = CostModel(profile, measured)
    partitioner = PARTITIONERS.create(
        part, part_params, source=str(loaded.path), field="partitioner"
    )
    plan = make_plan(topo, cost, partitioner, spec.planning, node_block_s=planner_times(calibrated))
    layout = Layout.from_plan(
        plan, topo, {n.name: f"sim://{n.name}" for _, n in topo.nodes()}, cost
    )
    workload = load_workload(loaded.workload, loaded.base_dir, default_seed=spec.seed)
    reqs = list(workload.requests)
    limits = [x for x in (spec.requests, requests_limit) if x is not None]
    if limits:
        reqs = reqs[: min(limits)]
    reqs = scale_arrivals(reqs, spec.timeline)  # a timeline's load changes
    if not reqs:
        raise ConfigError(
            "the workload has no request to simulate (check its window and limits)",
            source=str(loaded.path),
            field="workload",
        )
    return SimSetup(
        loaded, part, part_params, sched, sched_params, topo, cost, calibrated, plan, layout,
        workload, tuple(reqs),
    )  # fmt: skip


def simulate(
    setup: SimSetup,
    *,
    config: SimConfig | None = None,
    requests: Sequence[TraceRequest] | None = None,
    scheduler: Scheduler | None = None,
    timeline_log: list[dict[str, Any]] | None = None,
) -> SimOutcome:
    """One simulated replay of ``requests`` (default: the setup's) with a fresh scheduler,
    under the scenario's timeline (what each event did is appended to ``timeline_log``)."""
    from testbed.sim.timeline import SimTimeline

    config = scenario_config(setup, config)  # its request classes, each node's max_batch
    overhead = setup.calibrated.hop_overhead_s if setup.calibrated else 0.0
    events = setup.loaded.spec.timeline
    parts = (
        setup.layout,
        WorkPredictor(setup.layout, setup.cost),
        scheduler or setup.make_scheduler(),
        StepTimes(setup.layout, setup.cost, setup.calibrated),
        Network(setup.layout.hop_links, overhead_s=overhead),
        config,
    )
    stop_s = setup.loaded.spec.duration_s
    if not events:
        return Simulator(*parts).run(requests or setup.requests, stop_after_s=stop_s)
    # a timeline runs on the reference engine: its events invalidate the optimised engine's
    # exact shortcuts (arrival and token times settled ahead of them)
    sim = ReferenceSimulator(*parts)
    tl = SimTimeline(setup.topology, events)
    tl.install(sim)
    out = sim.run(requests or setup.requests, stop_after_s=stop_s)
    tl.fix_records(sim)
    if timeline_log is not None:
        timeline_log.extend(tl.applied)
    return replace(out, records=tuple(sim._records[r.request_id] for r in out.records))


def summarize_outcome(setup: SimSetup, outcome: SimOutcome) -> Summary:
    slo = setup.loaded.spec.slo
    return summarize(
        outcome.records,
        slo=SLO(slo.ttft_s, slo.tpot_s, slo.e2e_s),
        node_busy_s=outcome.node_busy_s,
        nodes=setup.layout.node_names(),
        classes=class_slos(setup.loaded.spec.classes),
    )


def bottleneck(summary: Summary) -> tuple[str, float]:
    """The most utilised node and its utilisation."""
    util = summary.node_utilisation
    if not util:
        return "", 0.0
    name = max(util, key=lambda n: (util[n], n))
    return name, util[name]


@dataclass(frozen=True)
class SimRun:
    label: str
    out_dir: Path
    summary: Summary
    outcome: SimOutcome
    files: dict[str, Path]


def write_sim_run(
    setup: SimSetup,
    outcome: SimOutcome,
    out_dir: Path,
    *,
    plots: bool = True,
    wall_s: float = 0.0,
    config: SimConfig | None = None,
    timeline: Sequence[dict[str, Any]] = (),
) -> SimRun:
    """The same folder as `replay` writes, marked ``"mode": "simulated"``."""
    from testbed.metrics.report import write_run_report

    spec = setup.loaded.spec
    summary = summarize_outcome(setup, outcome)
    node, util = bottleneck(summary)
    extra = {
        "mode": "simulated",
        "run": {
            "label": setup.pair,
            "scenario": spec.name,
            "partitioner": setup.partitioner,
            "scheduler": setup.scheduler,
            "routed": outcome.routed,
            "bottleneck": {"node": node, "utilisation": util},
            "link_busy_s": outcome.link_busy_s,
            "events": outcome.events,
            "simulator_wall_s": wall_s,
            "timeline": list(timeline),
        },
        "workload": setup.workload.stats.to_dict(),
    }
    markers = [(float(e["applied_s"]), str(e["what"])) for e in timeline]
    files = write_run_report(
        out_dir, outcome.records, summary, extra=extra, run_name=setup.pair, plots=plots,
        markers=markers,
    )  # fmt: skip
    meta = {
        "mode": "simulated",
        "scenario": {"path": str(setup.loaded.path), **spec.model_dump(mode="json")},
        "topology": {"path": str(setup.loaded.topology_path)},
        "model_profile": setup.cost.profile.model_dump(mode="json"),
        "cost_source": setup.cost.source,
        "calibrated_profile": setup.calibrated.model_dump(mode="json")
        if setup.calibrated
        else None,
        "plan": setup.plan.model_dump(mode="json"),
        "stages_served": setup.layout.describe(),
        "partitioner": {"name": setup.partitioner, "params": setup.partitioner_params},
        "scheduler": outcome.scheduler,
        "simulator": config_dict(scenario_config(setup, config)),
        "workload": setup.workload.description,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    cfg = Path(out_dir) / "config.json"
    cfg.write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
    files["config"] = cfg
    return SimRun(setup.pair, Path(out_dir), summary, outcome, files)


def run_folder(root: Path, scenario: str, label: str) -> Path:
    base = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{scenario}-{label}"
    out, k = base, 1
    while out.exists():
        k += 1
        out = base.with_name(f"{base.name}-{k}")
    return out


def simulate_scenario(
    loaded: LoadedScenario,
    *,
    pair: str | None = None,
    output: Path | None = None,
    requests: int | None = None,
    config: SimConfig | None = None,
    plots: bool = True,
) -> SimRun:
    """`testbed simulate`: one simulated run, written like `replay`'s."""
    setup = prepare_sim(loaded, pair, requests)
    t0 = time.perf_counter()
    applied: list[dict[str, Any]] = []
    outcome = simulate(setup, config=config, timeline_log=applied)
    wall = time.perf_counter() - t0
    root = output if output is not None else loaded.resolve(loaded.spec.output)
    out = run_folder(root, loaded.spec.name, f"{setup.pair}-sim")
    return write_sim_run(
        setup, outcome, out, plots=plots, wall_s=wall, config=config, timeline=applied
    )


def compare_simulated(
    loaded: LoadedScenario,
    pairs: Sequence[str],
    *,
    output: Path | None = None,
    requests: int | None = None,
    config: SimConfig | None = None,
    plots: bool = True,
) -> tuple[Path, list[SimRun]]:
    """`testbed compare --simulate`: every pair simulated on the same workload, then the same
    comparison files as `compare`."""
    from testbed.metrics.report import write_comparison

    if not pairs:
        raise ConfigError(
            "no policy pairs to compare: give --policies or a `compare:` list in the scenario",
            source=str(loaded.path),
        )
    root = output if output is not None else loaded.resolve(loaded.spec.output)
    out = run_folder(root, loaded.spec.name, "compare-sim")
    runs = []
    for pair in pairs:
        setup = prepare_sim(loaded, pair, requests)
        applied: list[dict[str, Any]] = []
        outcome = simulate(setup, config=config, timeline_log=applied)
        runs.append(
            write_sim_run(setup, outcome, out / pair, plots=plots, config=config, timeline=applied)
        )
    write_comparison(
        out,
        [(r.label, r.summary.to_dict()) for r in runs],
        records=[r.outcome.records for r in runs],
        plots=plots,
    )
    return out, runs


def with_requests(setup: SimSetup, reqs: Sequence[TraceRequest]) -> SimSetup:
    return replace(setup, requests=tuple(reqs))
