"""`testbed replay` and `testbed compare`: scenario -> plan -> testbed -> broker -> results folder.

The orchestration layer: it combines the pure parts (scenario, cost model, planner, policies,
workload, metrics) with the I/O parts (runtime up/down, stage transport) and owns the order:
plan, bring the testbed up (or attach to the running one), replay, bring it down if it was
brought up here, write the results.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import platform
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console

from testbed.broker.broker import Broker, BrokerConfig, BrokerResult, NodeEvent
from testbed.broker.layout import Layout, WorkPredictor
from testbed.cost.model import CostModel
from testbed.cost.planner import make_plan
from testbed.errors import ConfigError, RuntimeBackendError
from testbed.metrics.records import RequestRecord
from testbed.metrics.summary import SLO, Summary, summarize
from testbed.spec.model_profile import ModelProfile, load_measured_profile, load_model_profile
from testbed.spec.plan import Plan
from testbed.spec.scenario import LoadedScenario, parse_pair
from testbed.spec.topology import Topology, load_topology
from testbed.workload.request import TraceRequest, Workload

log = logging.getLogger(__name__)

TINY_MODEL_ARGS: dict[str, Any] = {"arch": "phi3", "size": "tiny", "seed": 0}


# --- model folder ------------------------------------------------------------------------------


def tiny_model_dir() -> Path:
    """``~/.cache/testbed/models/tiny-<hash>``: the generated CI model, keyed by its arguments."""
    from testbed.runtime.image import cache_dir

    key = hashlib.sha256(json.dumps(TINY_MODEL_ARGS, sort_keys=True).encode()).hexdigest()[:10]
    return cache_dir() / "models" / f"tiny-{key}"


def ensure_tiny_model() -> Path:
    """Generate the tiny model once (atomically: concurrent callers never see half a folder)."""
    import os
    import shutil
    import tempfile

    dest = tiny_model_dir()
    if (dest / "config.json").exists():
        return dest
    from testbed.model.tiny import make_tiny_model

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        make_tiny_model(tmp, TINY_MODEL_ARGS["arch"], size=TINY_MODEL_ARGS["size"], seed=0)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def resolve_model_dir(loaded: LoadedScenario) -> Path:
    """The weights the stages execute: ``model_dir``, the model if it is a folder, or the
    generated tiny model for ``model: tiny``."""
    spec = loaded.spec
    if spec.model_dir is not None:
        return loaded.resolve(spec.model_dir)
    as_path = loaded.resolve(Path(spec.model))
    if (as_path / "config.json").exists():
        return as_path
    if spec.model == "tiny":
        return ensure_tiny_model()
    raise ConfigError(
        f"model {spec.model!r} is a planning preset without weights; to replay, set model_dir to a "
        "local Hugging Face folder of that model (or use model: tiny)",
        source=str(loaded.path),
        field="model_dir",
    )


def special_token_ids(model_dir: Path) -> list[int]:
    """BOS/EOS/PAD ids from config.json (prompts avoid them)."""
    try:
        cfg = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return []
    out: list[int] = []
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = cfg.get(key)
        out += [int(x) for x in v] if isinstance(v, list) else ([int(v)] if v is not None else [])
    return sorted(set(out))


# --- the parts of one run -------------------------------------------------------------------------


@dataclass(frozen=True)
class Prepared:
    """Everything a run needs before any I/O on nodes."""

    loaded: LoadedScenario
    partitioner: str
    partitioner_params: dict[str, Any]
    scheduler: str
    scheduler_params: dict[str, Any]
    topology: Topology
    model_dir: Path
    profile: ModelProfile
    cost: CostModel
    plan: Plan
    workload: Workload
    requests: tuple[TraceRequest, ...]
    # emulated devices: node -> extra `stage serve` arguments (None: real execution)
    serve_args: dict[str, list[str]] | None = None
    dilation: float = 1.0  # emulated runs: time dilation k (topology and requests dilated)

    @property
    def emulated(self) -> bool:
        return self.serve_args is not None

    @property
    def pair(self) -> str:
        return f"{self.partitioner}+{self.scheduler}"

    def make_scheduler(self) -> Any:
        from testbed.schedule import SCHEDULERS

        return SCHEDULERS.create(self.scheduler, self.scheduler_params, field="scheduler")

    def prompt_fn(self) -> Callable[[TraceRequest], list[int]]:
        from testbed.workload.prompts import synthesize_prompt_ids

        vocab = min(self.profile.arch.vocab_size, _executed_vocab(self.model_dir))
        avoid = special_token_ids(self.model_dir)
        seed = self.loaded.spec.seed

        def prompt(req: TraceRequest) -> list[int]:
            return synthesize_prompt_ids(
                req.prompt_tokens,
                vocab,
                seed,
                req.request_id,
                avoid,
                prefix_hash_ids=req.prefix_hash_ids,
            )

        return prompt


def _executed_vocab(model_dir: Path) -> int:
    """The vocabulary of the weights the stages run (an emulated run's stand-in is smaller
    than the studied model's)."""
    try:
        return int(json.loads((model_dir / "config.json").read_text())["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return 1 << 62


def with_model_dir(prep: Prepared, model_dir: Path) -> Prepared:
    """The same run against other weights (a running testbed's): profile and cost follow."""
    if prep.emulated:  # the studied model drives the costs; only the stand-in changes
        return replace(prep, model_dir=model_dir)
    profile = load_model_profile(model_dir, dtype=prep.loaded.spec.dtype)
    return replace(
        prep, model_dir=model_dir, profile=profile, cost=replace(prep.cost, profile=profile)
    )


def prepare(
    loaded: LoadedScenario, pair: str | None = None, requests_limit: int | None = None
) -> Prepared:
    """Plan and workload for the scenario (``pair`` overrides its partitioner+scheduler)."""
    from testbed.partition import PARTITIONERS
    from testbed.workload.spec import load_workload

    spec = loaded.spec
    if pair is not None:
        part, sched = parse_pair(pair)
        part_params = spec.partitioner.params if part == spec.partitioner.name else {}
        sched_params = spec.scheduler.params if sched == spec.scheduler.name else {}
    else:
        part, part_params = spec.partitioner.name, dict(spec.partitioner.params)
        sched, sched_params = spec.scheduler.name, dict(spec.scheduler.params)
    topo = load_topology(loaded.topology_path)
    measured = load_measured_profile(loaded.resolve(spec.profile)) if spec.profile else None
    if spec.execution == "emulated":  # emulated devices (testbed.emulation)
        from testbed.emulation.standin import check_standin, ensure_standin

        profile = load_model_profile(spec.model, dtype=spec.dtype, base_dir=loaded.base_dir)
        if spec.model_dir is not None:
            model_dir = loaded.resolve(spec.model_dir)
            check_standin(model_dir, profile)
        else:
            model_dir = ensure_standin(profile)
    else:
        model_dir = resolve_model_dir(loaded)
        profile = load_model_profile(model_dir, dtype=spec.dtype)
    cost = CostModel(profile, measured)
    partitioner = PARTITIONERS.create(
        part, part_params, source=str(loaded.path), field="partitioner"
    )
    plan = make_plan(topo, cost, partitioner, spec.planning)
    serve_args = None
    k = spec.dilation
    if spec.execution == "emulated":
        from testbed.emulation.dilation import dilate_topology
        from testbed.emulation.plumbing import emulation_specs
        from testbed.emulation.plumbing import serve_args as emulated_serve_args

        serve_args = emulated_serve_args(emulation_specs(topo, plan, profile, measured, k))
        topo = dilate_topology(topo, k)  # planned on the real links, run on dilated ones
    workload = load_workload(loaded.workload, loaded.base_dir, default_seed=spec.seed)
    reqs = list(workload.requests)
    limits = [x for x in (spec.requests, requests_limit) if x is not None]
    if limits:
        reqs = reqs[: min(limits)]
    if not reqs:
        raise ConfigError(
            "the workload has no request to replay (check its window and limits)",
            source=str(loaded.path),
            field="workload",
        )
    if k != 1:
        from testbed.emulation.dilation import dilate_requests

        reqs = list(dilate_requests(reqs, k))
    return Prepared(
        loaded,
        part,
        dict(part_params),
        sched,
        dict(sched_params),
        topo,
        model_dir,
        profile,
        cost,
        plan,
        workload,
        tuple(reqs),
        serve_args,
        k,
    )


# --- testbeds ----------------------------------------------------------------------------------


async def bring_up(prep: Prepared, runtime: str, *, health_timeout_s: float = 300.0) -> Any:
    """Start stage servers for ``prep.plan`` (local processes or containers)."""
    from testbed.runtime.control import choose_backend

    topo_path = str(prep.loaded.topology_path)
    seed = prep.loaded.spec.seed
    if runtime == "local":
        from testbed.runtime.localrun import up_local

        return await up_local(
            prep.topology,
            topo_path,
            prep.plan,
            prep.model_dir,
            seed=seed,
            health_timeout_s=health_timeout_s,
            extra_serve_args=prep.serve_args,
        )
    if runtime == "docker":
        from testbed.runtime.control import up_docker

        backend = await choose_backend("docker")
        return await up_docker(
            prep.topology,
            topo_path,
            prep.plan,
            prep.model_dir,
            backend=backend,
            seed=seed,
            health_timeout_s=health_timeout_s,
            extra_serve_args=prep.serve_args,
        )
    raise ConfigError(f"unknown runtime {runtime!r}; use local or docker", field="--runtime")


async def take_down(run_id: str) -> str:
    from testbed.runtime.control import down_sync

    return await asyncio.to_thread(down_sync, run_id)


def plan_matches(tb: Any, plan: Plan) -> bool:
    want = {n: (st.start, st.end) for st in plan.active_stages() for n in st.nodes}
    have = {n.name: (n.start, n.end) for n in tb.stage_nodes()}
    return want == have


@contextlib.asynccontextmanager
async def testbed_for(
    prep: Prepared,
    *,
    up: bool | None,
    runtime: str,
    run_id: str | None,
    console: Console,
    health_timeout_s: float = 300.0,
) -> AsyncIterator[tuple[Any, bool]]:
    """Yield (RunningTestbed, brought_up_here). ``up``: True = always bring one up;
    False = only attach; None = attach to the running one, else bring one up."""
    from testbed.runtime.base import load_running

    tb = None
    if up is not True:
        try:
            tb = await asyncio.to_thread(load_running, run_id)
        except RuntimeBackendError as exc:
            if up is False or run_id is not None:
                raise RuntimeBackendError(
                    f"{exc}; or let replay bring one up and down itself: --up"
                ) from None
        if tb is not None and tb.topology_name != prep.topology.name:
            raise ConfigError(
                f"the running testbed {tb.run_id} is topology {tb.topology_name!r}, the scenario "
                f"wants {prep.topology.name!r}; `testbed down` it or replay with --up"
            )
        if tb is not None and not plan_matches(tb, prep.plan):
            console.print(
                f"[yellow]note[/]: testbed {tb.run_id} holds other block ranges than the "
                f"{prep.partitioner} plan; replaying on the ranges it holds"
            )
    if tb is not None:
        yield tb, False
        return
    console.print(
        f"bringing up {prep.topology.name} ({runtime}) with the {prep.partitioner} plan "
        f"(cuts {list(prep.plan.cuts)}) ..."
    )
    t = time.monotonic()
    tb = await bring_up(prep, runtime, health_timeout_s=health_timeout_s)
    console.print(f"testbed {tb.run_id} up in {time.monotonic() - t:.1f}s (shaping: {tb.backend})")
    try:
        yield tb, True
    finally:
        msg = await take_down(tb.run_id)
        console.print(f"down: {msg}")


# --- one replay --------------------------------------------------------------------------------


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


def make_transport(tb: Any) -> Any:
    from testbed.broker.http import HttpStageTransport

    urls = {n.name: n.url for n in tb.stage_nodes()}
    hooks = {n: tb.hook_for(n) for n in urls}
    return HttpStageTransport(urls, {n: h.before_send for n, h in hooks.items() if h is not None})


async def run_broker(
    prep: Prepared,
    layout: Layout,
    transport: Any,
    *,
    config: BrokerConfig | None = None,
    console: Console | None = None,
    progress: bool = True,
    on_node_event: Callable[[NodeEvent], None] | None = None,
) -> BrokerResult:
    """Replay ``prep.requests`` through ``layout`` with the scenario's scheduler."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = console or Console(quiet=True)
    scheduler = prep.make_scheduler()
    predictor = WorkPredictor(layout, prep.cost)
    n = len(prep.requests)
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
    task = bar.add_task(f"replay {prep.pair}", total=n, status="")

    def on_record(rec: RequestRecord) -> None:
        counts[rec.status] += 1
        bar.update(
            task,
            advance=1,
            status=f"{counts['completed']} ok, {counts['failed']} failed",
        )

    def node_event(ev: NodeEvent) -> None:
        console.print(f"[yellow]node {ev.node} down[/] at {ev.at_s:.2f}s: {ev.reason}")
        if on_node_event is not None:
            on_node_event(ev)

    broker = Broker(
        layout,
        predictor,
        scheduler,
        transport,
        prep.prompt_fn(),
        config=config,
        on_record=on_record,
        on_node_event=node_event,
    )
    with bar:
        async with broker:
            stop = prep.loaded.spec.duration_s
            return await broker.run(
                prep.requests, stop_after_s=None if stop is None else stop * prep.dilation
            )


def run_folder(output: Path, scenario: str, pair: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = output / f"{stamp}-{scenario}-{pair}"
    out, k = base, 1
    while out.exists():
        k += 1
        out = base.with_name(f"{base.name}-{k}")
    return out


async def replay_once(
    prep: Prepared,
    tb: Any,
    out_dir: Path,
    *,
    config: BrokerConfig | None = None,
    console: Console,
    progress: bool = True,
    plots: bool = True,
) -> ReplayRun:
    """Replay against the running testbed ``tb`` and write the results folder."""
    from testbed.emulation import fidelity
    from testbed.emulation.report import fidelity_line, load_line, offered_load, overrun_warning

    layout = Layout.from_running(tb, prep.topology, prep.cost)
    urls = {n.name: n.url for n in tb.stage_nodes()}
    steps_before = await fidelity.step_counts(urls) if prep.emulated else {}
    result = await run_broker(
        prep, layout, make_transport(tb), config=config, console=console, progress=progress
    )
    if prep.dilation != 1:  # back on the emulated clock
        from testbed.emulation.dilation import undilate_records

        result = replace(
            result,
            records=undilate_records(result.records, prep.dilation),
            wall_s=result.wall_s / prep.dilation,
        )
    emulation = None
    if prep.emulated:  # every step's predicted / emulated / real seconds, from the stages
        reports = await fidelity.collect(urls, steps_before)
        emulation = fidelity.summarize_pacing(reports)
        console.print(fidelity_line(emulation))
        warn = overrun_warning(emulation)
        if warn:
            console.print(f"[yellow]warning[/]: {warn}")
    arrivals = [r.arrival_s / prep.dilation for r in prep.requests]
    load = offered_load(prep.plan, arrivals, prep.scheduler)
    console.print(load_line(prep.pair, load))
    spec = prep.loaded.spec
    summary = summarize(
        result.records,
        slo=SLO(spec.slo.ttft_s, spec.slo.tpot_s, spec.slo.e2e_s),
        nodes=layout.node_names(),
    )
    from testbed.metrics.report import write_run_report

    meta = await run_metadata(prep, tb, layout, result, config or BrokerConfig())
    extra = {
        "run": {
            "label": prep.pair,
            "scenario": spec.name,
            "partitioner": prep.partitioner,
            "scheduler": prep.scheduler,
            "testbed_run_id": tb.run_id,
            "runtime": tb.runtime,
            "shaping": tb.backend,
            "routed": result.routed,
            "node_events": [asdict(e) for e in result.node_events],
            "not_admitted": result.not_admitted,
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
    )
    cfg_path = out_dir / "config.json"
    await asyncio.to_thread(
        cfg_path.write_text, json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8"
    )
    files["config"] = cfg_path
    return ReplayRun(prep.pair, out_dir, summary, result, files, emulation, load)


# --- provenance ----------------------------------------------------------------------------------


def _versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist, key in (
        ("torch", "torch"),
        ("transformers", "transformers"),
        ("aiohttp", "aiohttp"),
        ("docker", "docker"),
        ("pyroute2", "pyroute2"),
        ("llm-pipeline-testbed", "testbed"),
    ):
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = None
    return out


_REPO = Path(__file__).resolve().parents[2]


async def _git_revision() -> str | None:
    repo = _REPO
    if not await asyncio.to_thread((repo / ".git").exists):
        return None
    try:
        proc = await asyncio.create_subprocess_exec(
            "git",
            "-C",
            str(repo),
            "rev-parse",
            "HEAD",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError:
        return None
    try:
        async with asyncio.timeout(5):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return None
    rev = out.decode().strip()
    return rev if proc.returncode == 0 and rev else None


async def _docker_engine_version(tb: Any) -> str | None:
    if tb.runtime != "docker":
        return None

    def probe() -> str | None:
        try:
            import docker

            return str(docker.from_env(timeout=10).version().get("Version"))
        except Exception:  # provenance only: no engine = unknown
            return None

    return await asyncio.to_thread(probe)


async def run_metadata(
    prep: Prepared, tb: Any, layout: Layout, result: BrokerResult, config: BrokerConfig
) -> dict[str, Any]:
    """The resolved config, versions, git revision, shaping backend and node devices."""
    spec = prep.loaded.spec
    versions = _versions()
    versions["docker_engine"] = await _docker_engine_version(tb)
    return {
        "scenario": {"path": str(prep.loaded.path), **spec.model_dump(mode="json", by_alias=False)},
        "topology": {
            "path": str(prep.loaded.topology_path),
            **prep.topology.model_dump(mode="json", by_alias=False),
        },
        "model_dir": str(prep.model_dir),
        "model_profile": prep.profile.model_dump(mode="json"),
        "cost_source": prep.cost.source,
        "plan": prep.plan.model_dump(mode="json"),
        "stages_served": layout.describe(),
        "partitioner": {"name": prep.partitioner, "params": prep.partitioner_params},
        "scheduler": result.scheduler,
        "broker": asdict(config),
        "workload": prep.workload.description,
        "testbed": {
            "run_id": tb.run_id,
            "runtime": tb.runtime,
            "shaping": tb.backend,
            "nodes": [
                {
                    "name": n.name,
                    "tier": n.tier,
                    "url": n.url,
                    "blocks": [n.start, n.end],
                    "device": n.device,
                    "cpus": n.cpus,
                    "mem_limit_bytes": n.mem_limit_bytes,
                }
                for n in sorted(tb.nodes.values(), key=lambda n: (n.tier_index, n.name))
            ],
            "links_checked": [asdict(c) for c in getattr(tb, "checks", [])],
        },
        "versions": versions,
        "git_revision": await _git_revision(),
        "host": {"platform": platform.platform(), "machine": platform.machine()},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# --- commands ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplayOptions:
    run_id: str | None = None
    up: bool | None = None  # True: bring one up; False: attach only; None: attach, else up
    runtime: str | None = None  # default: the scenario's
    output: Path | None = None  # default: the scenario's
    requests: int | None = None
    progress: bool = True
    plots: bool = True
    health_timeout_s: float = 300.0
    broker: BrokerConfig = field(default_factory=BrokerConfig)


def output_dir(loaded: LoadedScenario, opts: ReplayOptions) -> Path:
    return opts.output if opts.output is not None else loaded.resolve(loaded.spec.output)


async def replay_scenario(
    loaded: LoadedScenario, opts: ReplayOptions, console: Console, pair: str | None = None
) -> ReplayRun:
    """`testbed replay`: one run of the scenario (or of ``pair``)."""
    prep = await asyncio.to_thread(prepare, loaded, pair, opts.requests)
    runtime = opts.runtime or loaded.spec.runtime
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
        )


@dataclass(frozen=True)
class CompareResult:
    out_dir: Path
    runs: tuple[ReplayRun, ...]
    files: dict[str, Path]


async def compare_scenario(
    loaded: LoadedScenario,
    pairs: Sequence[str],
    opts: ReplayOptions,
    console: Console,
) -> CompareResult:
    """`testbed compare`: for each pair, a testbed with that partitioner's plan, the same
    workload, then a side-by-side table with ratios to the first pair."""
    from testbed.metrics.report import write_comparison

    if not pairs:
        raise ConfigError(
            "no policy pairs to compare: give --policies bsdp+arts,even+round_robin,... or a "
            "`compare:` list in the scenario",
            source=str(loaded.path),
        )
    if len(set(pairs)) != len(pairs):
        raise ConfigError(f"--policies lists a pair twice: {', '.join(pairs)}")
    for p in pairs:
        parse_pair(p)
    runtime = opts.runtime or loaded.spec.runtime
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = output_dir(loaded, opts)
    out = root / f"{stamp}-{loaded.spec.name}-compare"
    k = 1
    while out.exists():
        k += 1
        out = root / f"{stamp}-{loaded.spec.name}-compare-{k}"
    runs: list[ReplayRun] = []
    current: Any = None  # the testbed up now (reused while the next plan holds the same ranges)
    try:
        for i, pair in enumerate(pairs):
            console.rule(f"[bold]{i + 1}/{len(pairs)}: {pair}")
            prep = await asyncio.to_thread(prepare, loaded, pair, opts.requests)
            if current is not None and not plan_matches(current, prep.plan):
                console.print(f"down: {await take_down(current.run_id)}")
                current = None
            if current is None:
                console.print(
                    f"bringing up {prep.topology.name} ({runtime}) with the {prep.partitioner} "
                    f"plan (cuts {list(prep.plan.cuts)}) ..."
                )
                t = time.monotonic()
                current = await bring_up(prep, runtime, health_timeout_s=opts.health_timeout_s)
                console.print(
                    f"testbed {current.run_id} up in {time.monotonic() - t:.1f}s "
                    f"(shaping: {current.backend})"
                )
            else:
                console.print(f"same block ranges: reusing testbed {current.run_id}")
            run = await replay_once(
                prep,
                current,
                out / pair,
                config=opts.broker,
                console=console,
                progress=opts.progress,
                plots=opts.plots,
            )
            runs.append(run)
    finally:
        if current is not None:
            console.print(f"down: {await take_down(current.run_id)}")
    summaries = [(r.label, r.summary.to_dict()) for r in runs]
    files = await asyncio.to_thread(
        write_comparison,
        out,
        summaries,
        records=[r.records for r in runs],
        plots=opts.plots,
    )
    return CompareResult(out, tuple(runs), files)


def check_runtime(name: str | None) -> None:
    if name is not None and name not in ("local", "docker"):
        raise ConfigError(f"unknown runtime {name!r}; use local or docker", field="--runtime")


__all__ = [
    "CompareResult",
    "Prepared",
    "ReplayOptions",
    "ReplayRun",
    "compare_scenario",
    "ensure_tiny_model",
    "prepare",
    "replay_once",
    "replay_scenario",
    "resolve_model_dir",
    "tiny_model_dir",
]
