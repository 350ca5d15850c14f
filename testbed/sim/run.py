"""`testbed simulate` / `compare --simulate`: scenario -> plan -> simulated replay -> run folder.

The run is prepared as `replay` prepares it (:func:`testbed.experiment.prepare.prepare`, from
parts loaded without weights: a planning preset such as ``model: phi-3-medium`` simulates as
well as a model folder); the simulator adds the layout it runs on and uses the broker's pure
parts (:class:`Layout`, :class:`WorkPredictor`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from testbed.broker.layout import Layout, WorkPredictor
from testbed.errors import ConfigError
from testbed.experiment.prepare import Prepared, ScenarioParts, load_parts, prepare
from testbed.metrics.summary import SLO, Summary, class_slos, phases, summarize
from testbed.schedule.base import Scheduler
from testbed.sim.classes import config_dict, scenario_config
from testbed.sim.engine import SimConfig, SimOutcome, Simulator
from testbed.sim.links import Network
from testbed.sim.reference import ReferenceSimulator
from testbed.sim.steps import StepTimes
from testbed.spec.repartition import ADAPTIVE, split_pair
from testbed.spec.scenario import LoadedScenario
from testbed.workload.request import TraceRequest


@dataclass(frozen=True)
class SimSetup:
    """A run prepared as `replay` prepares it, and the layout the simulator runs it on."""

    prep: Prepared
    layout: Layout  # the plan's stages on the topology's nodes (``sim://`` addresses)
    adaptive: bool = False  # re-partitions as the scenario's ``repartition:`` says

    @property
    def pair(self) -> str:
        return f"{self.prep.pair}+{ADAPTIVE}" if self.adaptive else self.prep.pair

    @property
    def requests(self) -> tuple[TraceRequest, ...]:
        return self.prep.requests


def prepare_sim(
    scenario: LoadedScenario | ScenarioParts,
    pair: str | None = None,
    requests_limit: int | None = None,
) -> SimSetup:
    """Plan, layout and workload of the scenario (``pair`` overrides its policies; with
    ``+adaptive`` it re-partitions, as the scenario itself does when it has ``repartition:``);
    parts loaded once with ``load_parts(loaded, simulate=True)`` serve every pair."""
    parts = scenario
    if not isinstance(parts, ScenarioParts):
        parts = load_parts(parts, simulate=True)
    if not parts.simulated:
        raise ConfigError(
            "these parts were loaded for a replay; load them with simulate=True",
            source=str(parts.loaded.path),
        )
    spec = parts.loaded.spec
    adaptive = spec.repartition is not None
    if pair is not None:
        pair, adaptive = split_pair(pair)
        if adaptive and spec.repartition is None:
            raise ConfigError(
                f"{pair}+{ADAPTIVE} re-partitions but the scenario has no `repartition:`; add "
                "e.g. repartition: {every: 10s, threshold: 10%}",
                source=str(parts.loaded.path),
                field="repartition",
            )
    prep = prepare(parts, pair, requests_limit)
    urls = {n.name: f"sim://{n.name}" for _, n in prep.topology.nodes()}
    layout = Layout.from_plan(prep.plan, prep.topology, urls, prep.cost)
    return SimSetup(prep, layout, adaptive)


def simulate(
    setup: SimSetup,
    *,
    config: SimConfig | None = None,
    requests: Sequence[TraceRequest] | None = None,
    scheduler: Scheduler | None = None,
    timeline_log: list[dict[str, Any]] | None = None,
    repartition_log: dict[str, Any] | None = None,
) -> SimOutcome:
    """One simulated replay of ``requests`` (default: the setup's) with a fresh scheduler,
    under the scenario's timeline (what each event did is appended to ``timeline_log``, with
    the re-plans of an adaptive run; their details go into ``repartition_log``)."""
    from testbed.sim.migrate import Repartitioner
    from testbed.sim.timeline import SimTimeline

    prep = setup.prep
    config = scenario_config(setup, config)  # its request classes, each node's max_batch
    overhead = prep.calibrated.hop_overhead_s if prep.calibrated else 0.0
    events = prep.loaded.spec.timeline
    parts = (
        setup.layout,
        WorkPredictor(setup.layout, prep.cost),
        scheduler or prep.make_scheduler(),
        StepTimes(setup.layout, prep.cost, prep.calibrated),
        Network(setup.layout.hop_links, overhead_s=overhead),
        config,
    )
    stop_s = prep.loaded.spec.duration_s
    rp_spec = prep.loaded.spec.repartition if setup.adaptive else None
    if not events and rp_spec is None:
        return Simulator(*parts).run(requests or setup.requests, stop_after_s=stop_s)
    # a timeline or a re-plan runs on the reference engine: they invalidate the optimised
    # engine's exact shortcuts (arrival and token times settled ahead of them)
    sim = ReferenceSimulator(*parts)
    tl = SimTimeline(prep.topology, events)
    tl.install(sim)
    rp = None
    if rp_spec is not None:
        rp = Repartitioner(rp_spec, prep.topology, prep.cost, prep.loaded.spec.planning,
                           prep.plan, events, prep.calibrated, overhead)  # fmt: skip
        rp.install(sim)
    out = sim.run(requests or setup.requests, stop_after_s=stop_s)
    tl.fix_records(sim)
    if timeline_log is not None:
        marks = tl.applied + (rp.markers() if rp is not None else [])
        timeline_log.extend(sorted(marks, key=lambda e: float(e["applied_s"])))
    if repartition_log is not None and rp is not None:
        repartition_log.update(rp.summary())
    return replace(out, records=tuple(sim._records[r.request_id] for r in out.records))


def summarize_outcome(setup: SimSetup, outcome: SimOutcome) -> Summary:
    slo = setup.prep.loaded.spec.slo
    return summarize(
        outcome.records,
        slo=SLO(slo.ttft_s, slo.tpot_s, slo.e2e_s),
        node_busy_s=outcome.node_busy_s,
        nodes=setup.layout.node_names(),
        classes=class_slos(setup.prep.loaded.spec.classes),
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
    phases: list[dict[str, Any]] = field(default_factory=list)  # E2E between timeline events


def write_sim_run(
    setup: SimSetup,
    outcome: SimOutcome,
    out_dir: Path,
    *,
    plots: bool = True,
    wall_s: float = 0.0,
    config: SimConfig | None = None,
    timeline: Sequence[dict[str, Any]] = (),
    repartition: dict[str, Any] | None = None,
) -> SimRun:
    """The same folder as `replay` writes, marked ``"mode": "simulated"``."""
    from testbed.metrics.report import write_run_report

    prep = setup.prep
    spec = prep.loaded.spec
    summary = summarize_outcome(setup, outcome)
    node, util = bottleneck(summary)
    # E2E per arrival phase between the timeline's events ("after the drop")
    marks = [float(e["applied_s"]) for e in timeline if e["kind"] != "replan"]
    split = phases(outcome.records, marks) if marks else []
    extra = {
        "mode": "simulated",
        "run": {
            "label": setup.pair,
            "scenario": spec.name,
            "partitioner": prep.partitioner,
            "scheduler": prep.scheduler,
            "routed": outcome.routed,
            "bottleneck": {"node": node, "utilisation": util},
            "link_busy_s": outcome.link_busy_s,
            "events": outcome.events,
            "simulator_wall_s": wall_s,
            "timeline": list(timeline),
            "phases": split,
            "repartition": repartition or None,
        },
        "workload": prep.workload.stats.to_dict(),
    }
    markers = [(float(e["applied_s"]), str(e["what"])) for e in timeline]
    files = write_run_report(
        out_dir, outcome.records, summary, extra=extra, run_name=setup.pair, plots=plots,
        markers=markers,
    )  # fmt: skip
    meta = {
        "mode": "simulated",
        "scenario": {"path": str(prep.loaded.path), **spec.model_dump(mode="json")},
        "topology": {"path": str(prep.loaded.topology_path)},
        "model_profile": prep.cost.profile.model_dump(mode="json"),
        "cost_source": prep.cost.source,
        "calibrated_profile": prep.calibrated.model_dump(mode="json") if prep.calibrated else None,
        "plan": prep.plan.model_dump(mode="json"),
        "stages_served": setup.layout.describe(),
        "partitioner": {"name": prep.partitioner, "params": prep.partitioner_params},
        "scheduler": outcome.scheduler,
        "simulator": config_dict(scenario_config(setup, config)),
        "workload": prep.workload.description,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    cfg = Path(out_dir) / "config.json"
    cfg.write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
    files["config"] = cfg
    return SimRun(setup.pair, Path(out_dir), summary, outcome, files, split)


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
    replans: dict[str, Any] = {}
    outcome = simulate(setup, config=config, timeline_log=applied, repartition_log=replans)
    wall = time.perf_counter() - t0
    root = output if output is not None else loaded.resolve(loaded.spec.output)
    out = run_folder(root, loaded.spec.name, f"{setup.pair}-sim")
    return write_sim_run(setup, outcome, out, plots=plots, wall_s=wall, config=config,
                         timeline=applied, repartition=replans)  # fmt: skip


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
    parts = load_parts(loaded, simulate=True)  # loaded once, planned per pair
    runs = []
    for pair in pairs:
        setup = prepare_sim(parts, pair, requests)
        applied: list[dict[str, Any]] = []
        replans: dict[str, Any] = {}
        outcome = simulate(setup, config=config, timeline_log=applied, repartition_log=replans)
        runs.append(
            write_sim_run(
                setup,
                outcome,
                out / pair,
                plots=plots,
                config=config,
                timeline=applied,
                repartition=replans,
            )
        )
    write_comparison(
        out,
        [(r.label, r.summary.to_dict()) for r in runs],
        records=[r.outcome.records for r in runs],
        plots=plots,
    )
    return out, runs
