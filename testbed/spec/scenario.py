"""Scenario files: which topology, model, policies and workload; how long; SLOs; where results go.

name: tiny-azure
topology: ../topologies/tiny.yaml      # relative to this file
model: tiny                            # preset name or a local HF model folder
model_dir: null                        # weights to execute (default for "tiny": generated)
dtype: float32
partitioner: bsdp                      # or {name: bsdp, params: {include_transfer: true}}
scheduler: {name: arts, params: {alpha: 0.2}}
planning: {prompt_tokens: 128, output_tokens: 32, concurrency: 4}
workload: {kind: azure, path: ..., max_requests: 40}
duration: 2min                         # stop admitting after this long (optional)
requests: 40                           # or after this many (optional)
seed: 0
slo: {ttft: 2s, tpot: 200ms, e2e: 30s}
classes: [{name: chat, share: 0.7, slo: {ttft: 1s, tpot: 100ms}, priority: 1},
          {name: batch, share: 0.3, slo: {e2e: 60s}}]   # optional (testbed/spec/classes.py)
runtime: local                         # local | docker
output: ../results
compare: [bsdp+arts, even+round_robin, heft+heft]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from testbed.errors import ConfigError
from testbed.spec.classes import RequestClass, check_classes
from testbed.spec.loading import read_mapping, validate
from testbed.spec.plan import RequestShape
from testbed.spec.quantities import Seconds


class PolicyRef(BaseModel):
    """A registered policy by name, with its parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    params: dict[str, Any] = {}


def _policy(v: Any) -> Any:
    return {"name": v} if isinstance(v, str) else v


class SLO(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    ttft_s: Seconds | None = Field(default=None, alias="ttft")
    tpot_s: Seconds | None = Field(default=None, alias="tpot")
    e2e_s: Seconds | None = Field(default=None, alias="e2e")


class Scenario(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,60}$")
    description: str = ""
    topology: Path
    model: str = "tiny"
    model_dir: Path | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    partitioner: PolicyRef = PolicyRef(name="bsdp")
    scheduler: PolicyRef = PolicyRef(name="arts")
    planning: RequestShape = RequestShape(prompt_tokens=128, output_tokens=32, concurrency=4)
    profile: Path | None = None  # measured profile JSON (`testbed profile`)
    workload: dict[str, Any]
    duration_s: Seconds | None = Field(default=None, alias="duration", gt=0)
    requests: int | None = Field(default=None, gt=0)
    seed: int = 0
    slo: SLO = SLO()
    classes: tuple[RequestClass, ...] = ()  # request classes with their own SLOs (classes.py)
    runtime: Literal["local", "docker"] = "local"
    output: Path = Path("results")
    compare: tuple[str, ...] = ()  # policy pairs "partitioner+scheduler" for `testbed compare`

    _pol = field_validator("partitioner", "scheduler", mode="before")(lambda cls, v: _policy(v))

    _classes = field_validator("classes")(lambda cls, v: check_classes(v))

    @field_validator("compare")
    @classmethod
    def _pairs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for item in v:
            if item.count("+") != 1:
                raise ValueError(f"{item!r} is not PARTITIONER+SCHEDULER; write e.g. 'bsdp+arts'")
        return v


@dataclass(frozen=True)
class LoadedScenario:
    """A validated scenario with its paths resolved and its parts checked."""

    spec: Scenario
    path: Path
    topology_path: Path
    workload: Any  # testbed.workload.spec.WorkloadSpec (validated)

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def resolve(self, p: Path) -> Path:
        return p if p.is_absolute() else (self.base_dir / p).resolve()


def parse_pair(pair: str, source: str = "--policies") -> tuple[str, str]:
    """``"bsdp+arts"`` -> ("bsdp", "arts"), both checked against the registries."""
    from testbed.partition import PARTITIONERS
    from testbed.schedule import SCHEDULERS

    if pair.count("+") != 1:
        raise ConfigError(
            f"{pair!r} is not PARTITIONER+SCHEDULER; write e.g. 'bsdp+arts'", field=source
        )
    part, sched = (x.strip() for x in pair.split("+"))
    PARTITIONERS.get(part)
    SCHEDULERS.get(sched)
    return part, sched


def load_scenario(path: str | Path) -> LoadedScenario:
    """Parse and check a scenario file: fields, policy names and parameters, topology file,
    model, workload spec. Errors name the file, the field and the fix (exit code 2)."""
    from testbed.partition import PARTITIONERS
    from testbed.schedule import SCHEDULERS
    from testbed.spec.model_profile import load_model_profile
    from testbed.spec.topology import load_topology
    from testbed.workload.spec import parse_workload_spec

    p = Path(path)
    src = str(p)
    spec = validate(Scenario, read_mapping(p, "scenario"), src)
    PARTITIONERS.create(
        spec.partitioner.name, spec.partitioner.params, source=src, field="partitioner"
    )
    SCHEDULERS.create(spec.scheduler.name, spec.scheduler.params, source=src, field="scheduler")
    for k, pair in enumerate(spec.compare):
        try:
            parse_pair(pair)
        except ConfigError as exc:
            raise ConfigError(str(exc), source=src, field=f"compare[{k}]") from None
    base = p.parent
    topo_path = spec.topology if spec.topology.is_absolute() else (base / spec.topology)
    if not topo_path.exists():
        raise ConfigError(
            f"topology file {str(topo_path)!r} not found; the path is relative to the scenario file",
            source=src,
            field="topology",
        )
    load_topology(topo_path)
    try:
        load_model_profile(spec.model, dtype=spec.dtype, base_dir=base)
    except ConfigError as exc:
        raise ConfigError(str(exc), source=src, field="model") from None
    if (
        spec.model_dir is not None
        and not (base / spec.model_dir / "config.json").exists()
        and not (spec.model_dir / "config.json").exists()
    ):
        raise ConfigError(
            f"{str(spec.model_dir)!r} has no config.json; point it at a Hugging Face model folder "
            "(or make one with `testbed model make-tiny DIR`)",
            source=src,
            field="model_dir",
        )
    workload = parse_workload_spec(spec.workload, source=src)
    return LoadedScenario(
        spec=spec, path=p.resolve(), topology_path=topo_path.resolve(), workload=workload
    )
