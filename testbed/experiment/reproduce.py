"""`testbed reproduce hyperion`: the Hyperion paper's experiments (arXiv 2511.14450) with fair
baselines, on the paper-like topology, in simulation (default) or on emulated devices.

Three experiments per model (Phi-3-medium and Llama-3-8B):

(a) E2E latency vs request rate for every policy pair of :data:`PAIRS` (Hyperion, GPipe, HEFT,
    min_latency and the two ablations), at rates from near idle up to the rate at which the
    best plan's bottleneck is ~90 % busy, plus rates at which each weaker plan is half and
    90 % busy (so every baseline is also measured where it is stable);
(b) long-sequence generation (outputs of 512 to 2,048 tokens), Hyperion vs GPipe;
(c) utilisation per tier (a view of (a) at two loads).

Every point carries each plan's predicted bottleneck utilisation (:mod:`testbed.cost.capacity`:
rate / capacity); a ratio between two pairs is only formed where both are below 1 (stable),
since above its capacity a plan's queue grows without bound and its latency measures the run's
length, not the policy. Arrivals are Poisson; one realisation per model is rescaled to each
rate (common random numbers across pairs and rates).

This module holds what the runs share (pairs, configuration, scenarios, loads, points); the
experiments run in :mod:`testbed.experiment.reproduce_sim` (simulated) and
:mod:`testbed.experiment.reproduce_emulate` (emulated devices); the report and plots are
written by :mod:`testbed.experiment.reproduce_report`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from testbed.cost.capacity import plan_capacity
from testbed.errors import ConfigError
from testbed.spec.scenario import LoadedScenario, load_scenario

REPO = Path(__file__).resolve().parents[2]
TOPOLOGY = REPO / "topologies" / "three-tier.yaml"
TRACE = REPO / "scenarios" / "traces" / "azure-conv-2023-head1000.csv"
MODELS = ("phi-3-medium", "llama-3-8b")
HYPERION, GPIPE, HEFT = "bsdp+arts", "even+round_robin", "heft+heft"
MIN_LATENCY, PARTITION_ONLY, SCHEDULER_ONLY = "min_latency+arts", "bsdp+round_robin", "even+arts"
PAIRS = (HYPERION, GPIPE, HEFT, MIN_LATENCY, PARTITION_ONLY, SCHEDULER_ONLY)
NAMES = {
    HYPERION: "Hyperion",
    GPIPE: "GPipe",
    HEFT: "HEFT",
    MIN_LATENCY: "min_latency",
    PARTITION_ONLY: "partition only",
    SCHEDULER_ONLY: "scheduler only",
}
EVEN_DISPATCH = ("round_robin", "random")  # schedulers that split requests evenly over replicas


@dataclass(frozen=True)
class Comparison:
    """One ratio of the report: E2E mean of ``pair`` / E2E mean of ``baseline``."""

    label: str
    pair: str
    baseline: str
    paper: float | None  # the paper's ratio (None: not in the paper)
    experiment: str = "rate"  # "rate" (a) or "long" (b)


COMPARISONS = (
    Comparison("Hyperion vs GPipe", HYPERION, GPIPE, 0.479),
    Comparison("Hyperion vs HEFT", HYPERION, HEFT, 0.688),
    Comparison("Hyperion vs GPipe, long sequences", HYPERION, GPIPE, 0.555, "long"),
    Comparison("Hyperion vs min_latency (ours)", HYPERION, MIN_LATENCY, None),
    Comparison("partition only (bsdp+round_robin) vs GPipe", PARTITION_ONLY, GPIPE, None),
    Comparison("scheduler only (even+arts) vs GPipe", SCHEDULER_ONLY, GPIPE, None),
)


@dataclass(frozen=True)
class ReproConfig:
    """What to run. :meth:`full` and :meth:`quick` are the two shipped sizes."""

    size: str  # "full" | "quick"
    models: tuple[str, ...] = MODELS
    pairs: tuple[str, ...] = PAIRS
    topology: Path = TOPOLOGY
    seed: int = 0
    # (a) rate sweep: lengths drawn jointly from the Azure 2023 conversation trace, clipped
    requests: int = 80
    max_prompt_tokens: int = 2048
    max_output_tokens: int = 512
    idle_fraction: float = 0.05  # "near idle": the weakest plan this busy
    best_fractions: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9)  # of the best capacity
    baseline_fractions: tuple[float, ...] = (0.5, 0.9)  # of each weaker plan's capacity
    # (b) long sequences: fixed prompt, each output length, Hyperion vs GPipe
    long_prompt_tokens: int = 512
    long_outputs: tuple[int, ...] = (512, 1024, 2048)
    long_requests: int = 16
    long_fractions: tuple[float, ...] = (0.05, 0.8)  # of the weaker plan's capacity
    # --emulate: short requests, few of them, at loads where every pair is stable
    emu_requests: int = 12
    emu_max_prompt_tokens: int = 256
    emu_max_output_tokens: int = 32
    emu_fractions: tuple[float, ...] = (0.3, 0.8)  # of the weakest plan's capacity
    emu_runtime: str = "docker"  # a registered runtime (local: processes, no Docker)
    emu_dilation: float = 1.0  # time dilation k of the emulated runs (README, Emulated devices)

    @classmethod
    def full(cls, **kw: Any) -> ReproConfig:
        return cls(size="full", **kw)

    @classmethod
    def quick(cls, **kw: Any) -> ReproConfig:
        """Under 5 minutes on a loaded 2-core machine: fewer requests, rates and lengths."""
        base: dict[str, Any] = dict(
            size="quick",
            requests=24,
            best_fractions=(0.5, 0.9),
            baseline_fractions=(0.9,),
            long_outputs=(512,),
            long_requests=6,
            long_fractions=(0.05, 0.8),
            emu_requests=6,
            emu_fractions=(0.5,),
        )
        base.update(kw)
        return cls(**base)


@dataclass(frozen=True)
class Point:
    """One run of one pair at one load."""

    mode: str  # "simulated" | "emulated"
    experiment: str  # "rate" | "long" | "emulated"
    model: str
    pair: str
    rate_rps: float
    prompt_tokens_mean: float
    output_tokens_mean: float
    capacity_rps: float  # the plan's (cost model, reference request = the mean lengths)
    bottleneck: str  # where the capacity binds
    utilisation: float  # predicted bottleneck utilisation: rate / capacity
    requests: int
    completed: int
    e2e_mean_s: float | None
    e2e_p50_s: float | None
    e2e_p99_s: float | None
    ttft_mean_s: float | None
    tpot_mean_s: float | None
    busiest_node: str  # measured: the most utilised node of the run
    busiest_util: float
    tier_util: dict[str, float] = field(default_factory=dict)  # measured, mean over the tier
    cluster_util: float = 0.0  # measured, mean over every node of the topology
    overrun_fraction: float | None = None  # emulated runs: steps that overran their window

    @property
    def stable(self) -> bool:
        return self.utilisation < 1.0


@dataclass(frozen=True)
class Ratio:
    model: str
    comparison: Comparison
    rate_rps: float
    output_tokens: float
    util_pair: float
    util_baseline: float
    e2e_pair_s: float | None
    e2e_baseline_s: float | None

    @property
    def stable(self) -> bool:
        return self.util_pair < 1.0 and self.util_baseline < 1.0

    @property
    def value(self) -> float | None:
        """None where either plan is unstable (the ratio would say nothing) or had no result."""
        if not self.stable or not self.e2e_pair_s or not self.e2e_baseline_s:
            return None
        return self.e2e_pair_s / self.e2e_baseline_s


@dataclass
class ReproResult:
    config: ReproConfig
    mode: str
    points: list[Point] = field(default_factory=list)
    agreement: list[tuple[Point, Point]] = field(default_factory=list)  # (emulated, simulated)
    scenarios: list[Path] = field(default_factory=list)
    wall_s: float = 0.0

    def experiments(self) -> list[str]:
        return [
            e for e in ("rate", "long", "emulated") if any(p.experiment == e for p in self.points)
        ]

    def ratios(self, experiment: str = "rate") -> list[Ratio]:
        """Every comparison at every load of ``experiment`` (emulated points: those of (a))."""
        kind = "rate" if experiment == "emulated" else experiment
        pts = [p for p in self.points if p.experiment == experiment]
        index = {(p.model, p.pair, p.rate_rps, p.output_tokens_mean): p for p in pts}
        out = []
        for c in COMPARISONS:
            if c.experiment != kind:
                continue
            for p in pts:
                if p.pair != c.pair:
                    continue
                b = index.get((p.model, c.baseline, p.rate_rps, p.output_tokens_mean))
                if b is not None:
                    out.append(
                        Ratio(p.model, c, p.rate_rps, p.output_tokens_mean, p.utilisation,
                              b.utilisation, p.e2e_mean_s, b.e2e_mean_s)
                    )  # fmt: skip
        return out


# --- scenarios ----------------------------------------------------------------------------


def scenario_dict(
    name: str, model: str, topology: Path, planning: dict[str, int], workload: dict[str, Any],
    seed: int, **extra: Any,
) -> dict[str, Any]:  # fmt: skip
    return {
        "name": name,
        "description": f"testbed reproduce hyperion: {name}",
        "topology": str(topology.resolve()),
        "model": model,
        "dtype": "float16",
        "partitioner": "bsdp",
        "scheduler": {"name": "arts", "params": {"alpha": 0.2}},
        "planning": planning,
        "workload": workload,
        "seed": seed,
        **extra,
    }


def write_scenario(folder: Path, data: dict[str, Any]) -> LoadedScenario:
    """Write the scenario next to the results (what was run, re-runnable) and load it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return load_scenario(path)


def trace_workload(cfg: ReproConfig, n: int, max_prompt: int, max_output: int) -> dict[str, Any]:
    return {
        "kind": "synthetic",
        "rate_rps": 1.0,  # rescaled to each rate
        "num_requests": n,
        "lengths_from": {"path": str(TRACE), "format": "azure"},
        "max_prompt_tokens": max_prompt,
        "max_output_tokens": max_output,
        "seed": cfg.seed,
    }


def mean_lengths(loaded: LoadedScenario) -> dict[str, int]:
    """The workload's mean prompt / output lengths: the reference request the plans optimise
    and the capacities are computed for."""
    from testbed.workload.spec import load_workload

    reqs = load_workload(loaded.workload, loaded.base_dir, default_seed=loaded.spec.seed).requests
    return {
        "prompt_tokens": max(1, round(sum(r.prompt_tokens for r in reqs) / len(reqs))),
        "output_tokens": max(1, round(sum(r.output_tokens for r in reqs) / len(reqs))),
        "concurrency": 8,
    }


def sweep_scenario(
    cfg: ReproConfig, folder: Path, model: str, tag: str, n: int, max_p: int, max_o: int,
    **extra: Any,
) -> LoadedScenario:  # fmt: skip
    """A scenario whose planning shape is its workload's mean lengths."""
    name = f"hyperion-{model}-{tag}"
    work = trace_workload(cfg, n, max_p, max_o)
    first = write_scenario(
        folder, scenario_dict(name, model, cfg.topology, {"prompt_tokens": max_p,
                              "output_tokens": max_o}, work, cfg.seed, **extra)
    )  # fmt: skip
    shape = mean_lengths(first)
    return write_scenario(
        folder, scenario_dict(name, model, cfg.topology, shape, work, cfg.seed, **extra)
    )


# --- loads --------------------------------------------------------------------------------


def pair_capacity(plan: Any, pair: str) -> Any:
    """The plan's capacity as the pair's scheduler dispatches (round robin: evenly)."""
    sched = pair.split("+")[1]
    return plan_capacity(plan, even_dispatch=sched in EVEN_DISPATCH)


def rate_grid(capacities: dict[str, float], cfg: ReproConfig) -> list[float]:
    """Near idle (the weakest plan ``idle_fraction`` busy), fractions of the best capacity, and
    fractions of every weaker plan's capacity; values within 3 % of a kept one are dropped."""
    finite = [c for c in capacities.values() if math.isfinite(c) and c > 0]
    if not finite:
        raise ConfigError("no plan has a finite capacity: nothing in the pipeline costs time")
    best, low = max(finite), min(finite)
    vals = [cfg.idle_fraction * low] + [f * best for f in cfg.best_fractions]
    vals += [f * c for c in set(finite) if c < best for f in cfg.baseline_fractions]
    kept: list[float] = []
    for v in sorted(vals):
        if not kept or v > kept[-1] * 1.03:
            kept.append(v)
    return kept


def tier_utilisation(topology: Any, node_util: dict[str, float]) -> dict[str, float]:
    """Mean utilisation of each tier's nodes (nodes holding nothing count as idle)."""
    return {
        t.name: sum(node_util.get(n.name, 0.0) for n in t.nodes) / len(t.nodes)
        for t in topology.tiers
        if t.nodes
    }


def cluster_utilisation(topology: Any, node_util: dict[str, float]) -> float:
    names = [n.name for t in topology.tiers for n in t.nodes]
    return sum(node_util.get(n, 0.0) for n in names) / len(names) if names else 0.0


def point_from(
    mode: str, experiment: str, model: str, pair: str, rate: float, reqs: Sequence[Any],
    cap: Any, summary: Any, topology: Any,
) -> Point:  # fmt: skip
    util = summary.node_utilisation
    busiest = max(util, key=lambda k: (util[k], k)) if util else ""
    n = max(len(reqs), 1)
    return Point(
        mode, experiment, model, pair, rate,
        sum(r.prompt_tokens for r in reqs) / n, sum(r.output_tokens for r in reqs) / n,
        cap.capacity_rps, cap.bottleneck, cap.utilisation(rate),
        summary.requests, summary.completed,
        summary.e2e_s.mean, summary.e2e_s.p50, summary.e2e_s.p99,
        summary.ttft_s.mean, summary.tpot_s.mean,
        busiest, util.get(busiest, 0.0), tier_utilisation(topology, util),
        cluster_utilisation(topology, util),
    )  # fmt: skip


# --- runs ---------------------------------------------------------------------------------

Progress = Callable[[str], None]  # the simulated experiments: reproduce_sim.py


def with_options(
    cfg: ReproConfig,
    models: Sequence[str] | None = None,
    runtime: str | None = None,
    dilation: float | None = None,
) -> ReproConfig:
    """``cfg`` with the command line's model list and emulation settings, where given."""
    from testbed.runtime.interface import RUNTIMES

    if models:
        from testbed.spec.model_profile import PRESETS

        for m in models:  # before anything is written
            if m not in PRESETS:
                raise ConfigError(
                    f"{m!r} is not a model preset; choose from {', '.join(sorted(PRESETS))}",
                    field="--models",
                )
        cfg = replace(cfg, models=tuple(models))
    if runtime is not None:
        RUNTIMES.get(runtime)  # a ConfigError naming the registered ones
        cfg = replace(cfg, emu_runtime=runtime)
    if dilation is not None:
        if not (1.0 <= dilation <= 1000.0):
            raise ConfigError(f"{dilation!r} must be in [1, 1000]", field="--dilation")
        cfg = replace(cfg, emu_dilation=dilation)
    return cfg
