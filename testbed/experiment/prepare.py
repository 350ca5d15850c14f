"""Plan and workload of a run, before any I/O on nodes (pure apart from reading files).

What a scenario fixes (topology, weights, profile, cost model, workload) is loaded once into
:class:`ScenarioParts`; each policy pair then only plans and cuts the request list
(:func:`prepare`), so `compare` does not reload the same files for every pair.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from testbed.cost.model import CostModel
from testbed.cost.planner import make_plan
from testbed.errors import ConfigError
from testbed.experiment.models import resolve_model_dir, special_token_ids
from testbed.schedule.base import Scheduler
from testbed.spec.model_profile import ModelProfile, load_measured_profile, load_model_profile
from testbed.spec.plan import Plan
from testbed.spec.scenario import LoadedScenario, parse_pair
from testbed.spec.topology import Topology, load_topology
from testbed.workload.request import TraceRequest, Workload


@dataclass(frozen=True)
class ScenarioParts:
    """What every run of one scenario shares, loaded once."""

    loaded: LoadedScenario
    topology: Topology
    model_dir: Path
    profile: ModelProfile
    cost: CostModel
    workload: Workload


def load_parts(loaded: LoadedScenario) -> ScenarioParts:
    from testbed.workload.spec import load_workload

    spec = loaded.spec
    model_dir = resolve_model_dir(loaded)
    profile = load_model_profile(model_dir, dtype=spec.dtype)
    measured = load_measured_profile(loaded.resolve(spec.profile)) if spec.profile else None
    return ScenarioParts(
        loaded,
        load_topology(loaded.topology_path),
        model_dir,
        profile,
        CostModel(profile, measured),
        load_workload(loaded.workload, loaded.base_dir, default_seed=spec.seed),
    )


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

    @property
    def pair(self) -> str:
        return f"{self.partitioner}+{self.scheduler}"

    def make_scheduler(self) -> Scheduler:
        from testbed.schedule import SCHEDULERS

        return SCHEDULERS.create(self.scheduler, self.scheduler_params, field="scheduler")

    def prompt_fn(self) -> Callable[[TraceRequest], list[int]]:
        from testbed.workload.prompts import synthesize_prompt_ids

        vocab = self.profile.arch.vocab_size
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


def with_model_dir(prep: Prepared, model_dir: Path) -> Prepared:
    """The same run against other weights (a running testbed's): profile and cost follow."""
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
    smaller wins)."""
    from testbed.partition import PARTITIONERS
    from testbed.spec.timeline import scale_arrivals

    parts = scenario if isinstance(scenario, ScenarioParts) else load_parts(scenario)
    loaded = parts.loaded
    spec = loaded.spec
    if pair is not None:
        part, sched = parse_pair(pair)
        part_params = spec.partitioner.params if part == spec.partitioner.name else {}
        sched_params = spec.scheduler.params if sched == spec.scheduler.name else {}
    else:
        part, part_params = spec.partitioner.name, dict(spec.partitioner.params)
        sched, sched_params = spec.scheduler.name, dict(spec.scheduler.params)
    partitioner = PARTITIONERS.create(
        part, part_params, source=str(loaded.path), field="partitioner"
    )
    plan = make_plan(parts.topology, parts.cost, partitioner, spec.planning)
    reqs = list(parts.workload.requests)
    limits = [x for x in (spec.requests, requests_limit) if x is not None]
    if limits:
        reqs = reqs[: min(limits)]
    reqs = scale_arrivals(reqs, spec.timeline)  # a timeline's load changes
    if not reqs:
        raise ConfigError(
            "the workload has no request to replay (check its window and limits)",
            source=str(loaded.path),
            field="workload",
        )
    return Prepared(
        loaded,
        part,
        dict(part_params),
        sched,
        dict(sched_params),
        parts.topology,
        parts.model_dir,
        parts.profile,
        parts.cost,
        plan,
        parts.workload,
        tuple(reqs),
    )
