"""Plan and workload of a run, before any I/O on nodes (pure apart from reading files).

What a scenario fixes (topology, weights, profile, cost model, workload) is loaded once into
:class:`ScenarioParts`; each policy pair then only plans and cuts the request list
(:func:`prepare`), so `compare` does not reload the same files for every pair.

One path for `replay` and `simulate`: parts loaded with ``simulate=True`` need no weights (a
planning preset such as ``model: phi-3-medium`` simulates as well as a model folder), accept a
calibrated profile (``testbed calibrate``; it also feeds the planner), and prepare the studied
model in real time (no emulated devices, no time dilation). The simulator adds its layout on
top (:func:`testbed.sim.run.prepare_sim`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from testbed.cost.model import CostModel
from testbed.cost.planner import make_plan
from testbed.errors import ConfigError
from testbed.experiment.models import model_source, resolve_model_dir, special_token_ids
from testbed.schedule.base import Scheduler
from testbed.sim.steps import (
    CalibratedProfile,
    is_calibrated_profile,
    load_calibrated_profile,
    planner_times,
)
from testbed.spec.model_profile import (
    MeasuredProfile,
    ModelProfile,
    load_measured_profile,
    load_model_profile,
)
from testbed.spec.plan import Plan
from testbed.spec.repartition import ADAPTIVE, split_pair
from testbed.spec.scenario import LoadedScenario, policies
from testbed.spec.topology import Topology, load_topology
from testbed.workload.request import TraceRequest, Workload


@dataclass(frozen=True)
class ScenarioParts:
    """What every run of one scenario shares, loaded once."""

    loaded: LoadedScenario
    topology: Topology  # as planned (an emulated run's links are dilated at run time)
    # the weights the stages run (an emulated run's stand-in); None: loaded to simulate
    model_dir: Path | None
    profile: ModelProfile  # the studied model's (it drives plan, costs and emulated timing)
    cost: CostModel
    workload: Workload
    calibrated: CalibratedProfile | None = None  # simulate only: per-node step-time fits

    @property
    def simulated(self) -> bool:
        return self.model_dir is None


def load_parts(loaded: LoadedScenario, *, simulate: bool = False) -> ScenarioParts:
    """The scenario's shared parts; ``simulate``: without weights (see the module docstring)."""
    from testbed.workload.spec import load_workload

    spec = loaded.spec
    calibrated, measured = _profile_file(loaded, simulate)
    model_dir: Path | None = None
    if simulate:
        profile = load_model_profile(
            model_source(loaded), dtype=spec.dtype, base_dir=loaded.base_dir
        )
    elif spec.execution == "emulated":  # emulated devices (testbed.emulation)
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
    return ScenarioParts(
        loaded,
        load_topology(loaded.topology_path),
        model_dir,
        profile,
        CostModel(profile, measured),
        load_workload(loaded.workload, loaded.base_dir, default_seed=spec.seed),
        calibrated,
    )


def _profile_file(
    loaded: LoadedScenario, simulate: bool
) -> tuple[CalibratedProfile | None, MeasuredProfile | None]:
    """The scenario's ``profile:``: measured block times (`testbed profile`), or, to simulate,
    a calibrated profile (`testbed calibrate`)."""
    if loaded.spec.profile is None:
        return None, None
    path = loaded.resolve(loaded.spec.profile)
    if not is_calibrated_profile(path):
        return None, load_measured_profile(path)
    if not simulate:
        raise ConfigError(
            f"{path} is a calibrated profile (`testbed calibrate`), which only `testbed "
            "simulate` reads; for a replay give a measured profile (`testbed profile`)",
            source=str(loaded.path),
            field="profile",
        )
    return load_calibrated_profile(path), None


@dataclass(frozen=True)
class Prepared:
    """Everything a run needs before any I/O on nodes."""

    loaded: LoadedScenario
    partitioner: str
    partitioner_params: dict[str, Any]
    scheduler: str
    scheduler_params: dict[str, Any]
    topology: Topology
    model_dir: Path | None  # None: prepared to simulate (no weights)
    profile: ModelProfile
    cost: CostModel
    plan: Plan
    workload: Workload
    requests: tuple[TraceRequest, ...]
    # emulated devices: node -> extra `stage serve` arguments (None: real execution)
    serve_args: dict[str, list[str]] | None = None
    dilation: float = 1.0  # emulated runs: time dilation k (topology and requests dilated)
    calibrated: CalibratedProfile | None = None  # simulate only: per-node step-time fits
    adaptive: bool = False  # a replay that re-partitions (testbed.experiment.adaptive)

    @property
    def emulated(self) -> bool:
        return self.serve_args is not None

    @property
    def weights(self) -> Path:
        """The weights the stages run; a ConfigError for a run prepared to simulate."""
        if self.model_dir is None:
            raise ConfigError(
                "this run was prepared to simulate (no weights); prepare it for a replay",
                source=str(self.loaded.path),
            )
        return self.model_dir

    @property
    def pair(self) -> str:
        return f"{self.partitioner}+{self.scheduler}" + (f"+{ADAPTIVE}" if self.adaptive else "")

    def make_scheduler(self) -> Scheduler:
        from testbed.schedule import SCHEDULERS

        return SCHEDULERS.create(self.scheduler, self.scheduler_params, field="scheduler")

    def prompt_fn(self) -> Callable[[TraceRequest], list[int]]:
        from testbed.workload.prompts import synthesize_prompt_ids

        vocab = min(self.profile.arch.vocab_size, _executed_vocab(self.weights))
        avoid = special_token_ids(self.weights)
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
    scenario: LoadedScenario | ScenarioParts,
    pair: str | None = None,
    requests_limit: int | None = None,
) -> Prepared:
    """Plan and workload for the scenario (``pair`` overrides its partitioner+scheduler);
    ``requests_limit`` keeps the first N requests (with the scenario's own ``requests``, the
    smaller wins). A :class:`LoadedScenario` is loaded for a replay."""
    from testbed.partition import PARTITIONERS
    from testbed.spec.batching import with_max_batch
    from testbed.spec.timeline import scale_arrivals

    parts = scenario if isinstance(scenario, ScenarioParts) else load_parts(scenario)
    loaded = parts.loaded
    spec = loaded.spec
    # a pair "P+S+adaptive" re-partitions (the scenario's `repartition:`), "P+S" does not;
    # without a pair the scenario does when it has `repartition:`
    base, adaptive = split_pair(pair) if pair is not None else (None, spec.repartition is not None)
    if adaptive and spec.repartition is None:
        raise ConfigError(
            f"{pair} re-partitions but the scenario has no `repartition:`; add e.g. "
            "repartition: {every: 10s, threshold: 10%}",
            source=str(loaded.path),
            field="repartition",
        )
    part, part_params, sched, sched_params = policies(spec, base)
    partitioner = PARTITIONERS.create(
        part, part_params, source=str(loaded.path), field="partitioner"
    )
    plan = make_plan(
        parts.topology, parts.cost, partitioner, spec.planning,
        node_block_s=planner_times(parts.calibrated),
    )  # fmt: skip
    # every node's max_batch resolved (its own, else the scenario's): the runtime passes it on
    topo = with_max_batch(parts.topology, spec.max_batch)
    serve_args = None
    k = 1.0 if parts.simulated else spec.dilation  # a simulation runs the studied model's time
    if spec.execution == "emulated" and not parts.simulated:
        from testbed.emulation.dilation import dilate_topology
        from testbed.emulation.plumbing import emulation_specs
        from testbed.emulation.plumbing import serve_args as emulated_serve_args

        serve_args = emulated_serve_args(
            emulation_specs(topo, plan, parts.profile, parts.cost.measured, k)
        )
        topo = dilate_topology(topo, k)  # planned on the real links, run on dilated ones
    reqs = list(parts.workload.requests)
    limits = [x for x in (spec.requests, requests_limit) if x is not None]
    if limits:
        reqs = reqs[: min(limits)]
    reqs = scale_arrivals(reqs, spec.timeline)  # a timeline's load changes
    if not reqs:
        raise ConfigError(
            f"the workload has no request to {'simulate' if parts.simulated else 'replay'} "
            "(check its window and limits)",
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
        parts.model_dir,
        parts.profile,
        parts.cost,
        plan,
        parts.workload,
        tuple(reqs),
        serve_args,
        k,
        parts.calibrated,
        adaptive and not parts.simulated,
    )
