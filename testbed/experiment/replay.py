"""`testbed replay`: one run of a scenario through a testbed into a results folder.

Records are streamed to ``requests.jsonl`` as requests finish (one line, flushed, per
record), next to a ``run.json`` written before the first request; a run killed midway keeps
every completed record, and `testbed report RUN_DIR` rebuilds the summary, tables and plots
from them. At the end the whole folder is written (:func:`write_run_report`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from rich.console import Console

from testbed.broker.broker import Broker, BrokerConfig, BrokerResult, NodeEvent
from testbed.broker.gate import GatedTransport
from testbed.broker.http import HttpStageTransport
from testbed.broker.layout import Layout, WorkPredictor
from testbed.errors import ConfigError
from testbed.experiment.adaptive import Replanner, adaptive_replanner, check_adaptive
from testbed.experiment.lifecycle import testbed_for
from testbed.experiment.prepare import Prepared, load_parts, prepare, with_model_dir
from testbed.experiment.provenance import run_metadata, testbed_description
from testbed.experiment.timeline import AppliedEvent, TimelineApplier
from testbed.metrics.records import RequestRecord
from testbed.metrics.summary import SLO, Summary, class_slos, phases, summarize
from testbed.paths import results_dir
from testbed.runtime.base import RunningTestbed
from testbed.runtime.interface import RUNTIMES
from testbed.spec.scenario import LoadedScenario

RUN_FILE = "run.json"  # written first: what `testbed report` needs besides the records
RECORDS_FILE = "requests.jsonl"


@dataclass(frozen=True)
class ReplayRun:
    label: str  # "bsdp+arts"
    out_dir: Path
    summary: Summary
    result: BrokerResult
    files: dict[str, Path] = field(default_factory=dict)
    emulation: dict[str, Any] | None = None  # pacing fidelity of an emulated run
    load: dict[str, Any] | None = None  # offered rate vs the plan's capacity

    @property
    def records(self) -> tuple[RequestRecord, ...]:
        return self.result.records


def make_transport(tb: RunningTestbed) -> GatedTransport:
    """HTTP to every stage node through its app-level hop hook; a node partitioned at app
    level (a timeline event, non-kernel shaping) holds its messages (:mod:`testbed.broker.gate`).
    In the forward transport the same hooks' shapes travel with each step's route, and the
    stage sending a hop shapes it."""
    urls = {n.name: n.url for n in tb.stage_nodes()}
    hooks = {n: h for n in urls if (h := tb.hook_for(n)) is not None}
    http = HttpStageTransport(
        urls,
        {n: h.before_send for n, h in hooks.items()},
        shapers=hooks,
        seed=tb.seed,
        route_urls={n: tb.route_url(n) for n in urls},
    )
    return GatedTransport(http, lambda node: tb.nodes[node].partitioned)


def broker_config(
    config: BrokerConfig, spec_transport: str, transport: str | None, tb: RunningTestbed
) -> BrokerConfig:
    """``config`` with the run's transport (``--transport``, else the scenario's), checked
    against the runtime: stages must reach each other to forward."""
    chosen = transport or spec_transport
    why = RUNTIMES.create(tb.runtime, field="runtime").forward_refusal(tb)
    if chosen == "forward" and why is not None:
        raise ConfigError(
            f"transport: forward needs stages that reach each other; {why}. Use "
            "transport: relay, or runtime: local / docker / swarm",
            field="transport",
        )
    return replace(config, transport=chosen)  # type: ignore[arg-type]


class RecordStream:
    """Append each finished request's record to ``requests.jsonl``, flushed at once, so a
    killed run keeps what completed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("w", encoding="utf-8")

    def write(self, rec: RequestRecord) -> None:
        if self._file is not None:  # one short line: a page-cache write, not a disk wait
            self._file.write(json.dumps(rec.to_dict(), allow_nan=False) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


async def run_broker(
    prep: Prepared,
    layout: Layout,
    transport: Any,
    *,
    config: BrokerConfig | None = None,
    console: Console | None = None,
    progress: bool = True,
    on_node_event: Callable[[NodeEvent], None] | None = None,
    on_record: Callable[[RequestRecord], None] | None = None,
    timeline: TimelineApplier | None = None,
    replanner: Replanner | None = None,
) -> BrokerResult:
    """Replay ``prep.requests`` through ``layout`` with the scenario's scheduler; ``timeline``
    fires its events on the broker's run clock while the replay runs, and ``replanner``
    re-partitions (:mod:`testbed.experiment.adaptive`)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console(quiet=True)
    predictor = WorkPredictor(layout, prep.cost)
    counts = {"completed": 0, "failed": 0}
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        disable=not progress,
    )
    task = bar.add_task(f"replay {prep.pair}", total=len(prep.requests), status="")

    def record(rec: RequestRecord) -> None:
        if on_record is not None:
            on_record(rec)
        counts[rec.status] += 1
        bar.update(task, advance=1, status=f"{counts['completed']} ok, {counts['failed']} failed")

    def node_event(ev: NodeEvent) -> None:
        state = "up" if ev.up else "down"
        at = ev.at_s / prep.dilation  # on the emulated clock, as the timeline's events
        console.print(f"[yellow]node {ev.node} {state}[/] at {at:.2f}s: {ev.reason}")
        if on_node_event is not None:
            on_node_event(ev)

    broker = Broker(
        layout,
        predictor,
        prep.make_scheduler(),
        transport,
        prep.prompt_fn(),
        config=config,
        on_record=record,
        on_node_event=node_event,
    )
    stop = prep.loaded.spec.duration_s
    stop_s = None if stop is None else stop * prep.dilation  # a dilated run is k times longer
    with bar:
        async with broker:
            if timeline is None and replanner is None:
                return await broker.run(prep.requests, stop_after_s=stop_s)
            return await _run_beside(broker, prep, timeline, replanner, stop_s)


async def _run_beside(
    broker: Broker,
    prep: Prepared,
    timeline: TimelineApplier | None,
    replanner: Replanner | None,
    stop_s: float | None,
) -> BrokerResult:
    """The replay with its timeline and re-planner beside it; they stop with the replay, and
    a failed timeline step or migration aborts the replay (it would invalidate the results)."""

    async def drive() -> None:
        await broker.clock_started.wait()
        if timeline is not None:
            await timeline.run(broker.now_s)

    async def replan() -> None:
        await broker.clock_started.wait()
        if replanner is not None:
            await replanner.run(broker)

    try:
        async with asyncio.TaskGroup() as tg:
            run = tg.create_task(broker.run(prep.requests, stop_after_s=stop_s))
            sides = [tg.create_task(drive()), tg.create_task(replan())]
            run.add_done_callback(lambda _: [t.cancel() for t in sides])
    except BaseExceptionGroup as eg:
        raise eg.exceptions[0] from None
    return run.result()


def run_folder(output: Path, scenario: str, pair: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = output / f"{stamp}-{scenario}-{pair}"
    out, k = base, 1
    while out.exists():
        k += 1
        out = base.with_name(f"{base.name}-{k}")
    return out


def run_info(prep: Prepared, tb: RunningTestbed, layout: Layout) -> dict[str, Any]:
    """``run.json``: enough to rebuild the summary from the records alone."""
    slo = prep.loaded.spec.slo
    return {
        "label": prep.pair,
        "scenario": prep.loaded.spec.name,
        "scenario_path": str(prep.loaded.path),
        "slo": {"ttft_s": slo.ttft_s, "tpot_s": slo.tpot_s, "e2e_s": slo.e2e_s},
        "nodes": list(layout.node_names()),
        "requests_planned": len(prep.requests),
        "testbed": testbed_description(tb),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


async def replay_once(
    prep: Prepared,
    tb: RunningTestbed,
    out_dir: Path,
    *,
    config: BrokerConfig | None = None,
    console: Console,
    progress: bool = True,
    plots: bool = True,
    transport: str | None = None,
) -> ReplayRun:
    """Replay against the running testbed ``tb`` and write the results folder; ``transport``
    (relay | forward) overrides the scenario's."""
    from testbed.emulation import fidelity
    from testbed.emulation.dilation import dilate_timeline, undilate_applied, undilate_records
    from testbed.emulation.report import fidelity_line, load_line, offered_load, overrun_warning
    from testbed.metrics.report import write_run_report

    k = prep.dilation
    config = broker_config(config or BrokerConfig(), prep.loaded.spec.transport, transport, tb)
    if prep.loaded.spec.classes and not config.classes:  # the scenario's request classes
        config = replace(config, classes=prep.loaded.spec.classes, class_seed=prep.loaded.spec.seed)
    layout = Layout.from_running(tb, prep.topology, prep.cost)
    urls = {n.name: n.url for n in tb.stage_nodes()}
    steps_before = await fidelity.step_counts(urls) if prep.emulated else {}
    await asyncio.to_thread(out_dir.mkdir, parents=True, exist_ok=True)
    info = run_info(prep, tb, layout)
    await asyncio.to_thread(
        (out_dir / RUN_FILE).write_text, json.dumps(info, indent=2) + "\n", encoding="utf-8"
    )
    stream = RecordStream(out_dir / RECORDS_FILE)
    await asyncio.to_thread(stream.open)
    spec = prep.loaded.spec
    applier = None
    if spec.timeline:
        # a dilated run's events k times later and its link changes k times slower, as its
        # topology (prep.topology is dilated already); said and recorded on the emulated clock
        asked = sorted(spec.timeline, key=lambda e: e.at_s)  # the applier's (stable) order

        def said(ev: AppliedEvent) -> None:
            what = asked[len(applier.applied) - 1].describe() if applier else ev.what
            console.print(f"[cyan]timeline[/] {ev.applied_s / k:.2f}s: {what}")

        applier = TimelineApplier(tb, prep.topology, dilate_timeline(asked, k), on_event=said)
    replanner = None
    if prep.adaptive:
        replanner = adaptive_replanner(prep, tb, config, console)
    try:
        result = await run_broker(
            prep,
            layout,
            make_transport(tb),
            config=config,
            console=console,
            progress=progress,
            # records on the emulated clock (a dilated run is k times slower in real time)
            on_record=stream.write
            if k == 1
            else lambda r: stream.write(undilate_records([r], k)[0]),
            timeline=applier,
            replanner=replanner,
        )
    finally:
        stream.close()
    applied = [e.to_dict() for e in applier.applied] if applier is not None else []
    if k != 1 and applier is not None:
        applied = undilate_applied(applied, k, asked)
    replans = replanner.markers() if replanner is not None else []
    applied = sorted(applied + replans, key=lambda e: float(e["applied_s"]))
    if k != 1:  # back on the emulated clock
        result = replace(
            result,
            records=undilate_records(result.records, k),
            wall_s=result.wall_s / k,
            node_events=tuple(replace(e, at_s=e.at_s / k) for e in result.node_events),
        )
    emulation = None
    if prep.emulated:  # every step's predicted / emulated / real seconds, from the stages
        emulation = fidelity.summarize_pacing(await fidelity.collect(urls, steps_before))
        console.print(fidelity_line(emulation))
        warn = overrun_warning(emulation)
        if warn:
            console.print(f"[yellow]warning[/]: {warn}")
    load = offered_load(prep.plan, [r.arrival_s / k for r in prep.requests], prep.scheduler)
    console.print(load_line(prep.pair, load))
    spec = prep.loaded.spec
    summary = summarize(
        result.records,
        slo=SLO(spec.slo.ttft_s, spec.slo.tpot_s, spec.slo.e2e_s),
        nodes=layout.node_names(),
        classes=class_slos(spec.classes),
    )
    meta = await run_metadata(prep, tb, layout, result, config)
    extra = {
        "run": {
            "label": prep.pair,
            "scenario": spec.name,
            "partitioner": prep.partitioner,
            "scheduler": prep.scheduler,
            "testbed_run_id": tb.run_id,
            "runtime": tb.runtime,
            "shaping": tb.backend,
            "transport": config.transport,
            "routed": result.routed,
            "node_events": [asdict(e) for e in result.node_events],
            "not_admitted": result.not_admitted,
            "timeline": applied,
            # E2E of the requests arriving between the timeline's events ("after the drop")
            "phases": phases(
                result.records, [e["applied_s"] for e in applied if e["kind"] != "replan"]
            ),
            "repartition": replanner.summary() if replanner is not None else None,
        },
        "workload": prep.workload.stats.to_dict(),
        "load": load,
    }
    if emulation is not None:
        extra["emulation"] = emulation
    files = await asyncio.to_thread(
        write_run_report,
        out_dir,
        result.records,
        summary,
        extra=extra,
        run_name=prep.pair,
        plots=plots,
        markers=run_markers(applied, result.node_events),
    )
    cfg_path = out_dir / "config.json"
    await asyncio.to_thread(
        cfg_path.write_text, json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8"
    )
    files["config"] = cfg_path
    files["run"] = out_dir / RUN_FILE
    return ReplayRun(prep.pair, out_dir, summary, result, files, emulation, load)


def run_markers(applied: list[dict[str, Any]], node_events: Any) -> list[tuple[float, str]]:
    """(run time, label) of every timeline event and broker node change, for the plots and
    the trace."""
    out = [(float(e["applied_s"]), str(e["what"])) for e in applied]
    for ne in node_events:
        out.append((ne.at_s, f"broker: {ne.node} {'re-admitted' if ne.up else 'marked down'}"))
    return sorted(out)


@dataclass(frozen=True)
class ReplayOptions:
    run_id: str | None = None
    up: bool | None = None  # True: bring one up; False: attach only; None: attach, else up
    runtime: str | None = None  # a name in RUNTIMES; default: the scenario's
    output: Path | None = None  # default: the scenario's
    requests: int | None = None  # keep the first N requests (--max-requests)
    progress: bool = True
    plots: bool = True
    health_timeout_s: float = 600.0  # ten containers importing torch on a busy 2-core host
    transport: str | None = None  # relay | forward (--transport); default: the scenario's
    broker: BrokerConfig = field(default_factory=BrokerConfig)


def output_dir(loaded: LoadedScenario, opts: ReplayOptions) -> Path:
    """``--output``, else the scenario's ``output:``, else :func:`testbed.paths.results_dir`."""
    if opts.output is not None:
        return opts.output
    if "output" in loaded.spec.model_fields_set:
        return loaded.resolve(loaded.spec.output)
    return results_dir()


async def replay_scenario(
    loaded: LoadedScenario, opts: ReplayOptions, console: Console, pair: str | None = None
) -> ReplayRun:
    """`testbed replay`: one run of the scenario (or of ``pair``)."""
    runtime = RUNTIMES.create(opts.runtime or loaded.spec.runtime, field="--runtime")
    parts = await asyncio.to_thread(load_parts, loaded)
    prep = await asyncio.to_thread(prepare, parts, pair, opts.requests)
    if prep.adaptive:  # before any testbed comes up
        check_adaptive(str(loaded.path), opts.runtime or loaded.spec.runtime)
    out = run_folder(output_dir(loaded, opts), loaded.spec.name, prep.pair)
    async with testbed_for(
        prep,
        up=opts.up,
        runtime=runtime,
        run_id=opts.run_id,
        console=console,
        health_timeout_s=opts.health_timeout_s,
    ) as (tb, brought_up):
        if not brought_up and Path(tb.model_dir) != prep.model_dir:
            prep = await asyncio.to_thread(with_model_dir, prep, Path(tb.model_dir))
            console.print(f"note: the testbed serves {tb.model_dir}; prompts and costs follow it")
        return await replay_once(
            prep,
            tb,
            out,
            config=opts.broker,
            console=console,
            progress=opts.progress,
            plots=opts.plots,
            transport=opts.transport,
        )
