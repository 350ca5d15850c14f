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
runtime: local                         # local | docker | swarm
output: ../results
compare: [bsdp+arts, even+round_robin, heft+heft]
execution: real                        # real | emulated (nodes emulate their devices running
                                       # `model`; a generated stand-in computes the outputs)
timeline: [{at: 60s, link: edge->fog, bandwidth: 10Mbit}]   # see testbed.spec.timeline
max_batch: 8                           # nodes without their own max_batch (spec/batching.py)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from testbed.errors import ConfigError
from testbed.spec.batching import check_max_batch
from testbed.spec.classes import RequestClass, check_classes
from testbed.spec.loading import read_mapping, validate
from testbed.spec.plan import RequestShape
from testbed.spec.quantities import LongSeconds, Seconds, StrictInt
from testbed.spec.repartition import ADAPTIVE, RepartitionSpec, split_pair
from testbed.spec.timeline import TimelineEvent
from testbed.workload.knobs import MAX_REQUESTS


class PolicyRef(BaseModel):
    """A registered policy by name, with its parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    params: dict[str, Any] = {}


def _policy(v: Any) -> Any:
    return {"name": v} if isinstance(v, str) else v


class SLO(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False
    )

    ttft_s: Seconds | None = Field(default=None, alias="ttft")
    tpot_s: Seconds | None = Field(default=None, alias="tpot")
    e2e_s: Seconds | None = Field(default=None, alias="e2e")


class Scenario(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False
    )

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
    duration_s: LongSeconds | None = Field(default=None, alias="duration", gt=0)
    requests: StrictInt | None = Field(default=None, gt=0, le=MAX_REQUESTS)
    seed: StrictInt = Field(default=0, ge=0, lt=2**63)
    slo: SLO = SLO()
    classes: tuple[RequestClass, ...] = ()  # request classes with their own SLOs (classes.py)
    runtime: str = "local"  # a name in testbed.runtime.interface.RUNTIMES
    output: Path = Path("results")
    compare: tuple[str, ...] = ()  # policy pairs "partitioner+scheduler" for `testbed compare`
    # emulated: each node is its device running `model`'s blocks in time (testbed.emulation)
    execution: Literal["real", "emulated"] = "real"
    # emulated only: time dilation k (every emulated time and link delay x k, bandwidth / k,
    # arrivals x k, measured times / k) for hosts too small for the cluster
    dilation: float = Field(default=1.0, ge=1.0, le=1000.0)
    timeline: tuple[TimelineEvent, ...] = ()  # changes during the run (testbed.spec.timeline)
    # continuous batching: the max_batch of nodes that do not set their own (precedence:
    # testbed.spec.batching); None: the stage server's default (16), the simulator's (1)
    max_batch: int | None = None
    # adaptive re-partitioning (simulated runs; testbed.spec.repartition); None: a static plan
    repartition: RepartitionSpec | None = None
    # how hidden states travel: relay (stage -> broker -> next stage) or forward (stage to
    # stage, the token back along the chain; runtimes local, docker, swarm), see
    # testbed.broker.chain
    transport: Literal["relay", "forward"] = "relay"

    _pol = field_validator("partitioner", "scheduler", mode="before")(lambda cls, v: _policy(v))

    _classes = field_validator("classes")(lambda cls, v: check_classes(v))
    _max_batch = field_validator("max_batch", mode="before")(lambda cls, v: check_max_batch(v))

    @field_validator("runtime")
    @classmethod
    def _runtime(cls, v: str) -> str:
        from testbed.runtime.interface import RUNTIMES

        if v not in RUNTIMES.names():
            raise ValueError(f"{v!r} is not a runtime; use one of {', '.join(RUNTIMES.names())}")
        return v

    @field_validator("compare")
    @classmethod
    def _pairs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for item in v:
            if split_pair(item)[0].count("+") != 1:
                raise ValueError(
                    f"{item!r} is not PARTITIONER+SCHEDULER (or PARTITIONER+SCHEDULER+{ADAPTIVE}); "
                    "write e.g. 'bsdp+arts'"
                )
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
    """``"bsdp+arts"`` -> ("bsdp", "arts"), both checked against the registries (a
    ``+adaptive`` suffix, re-partitioning, is left out: :func:`split_pair`)."""
    from testbed.partition import PARTITIONERS
    from testbed.schedule import SCHEDULERS

    pair = split_pair(pair)[0]
    if pair.count("+") != 1:
        raise ConfigError(
            f"{pair!r} is not PARTITIONER+SCHEDULER; write e.g. 'bsdp+arts'", field=source
        )
    part, sched = (x.strip() for x in pair.split("+"))
    PARTITIONERS.get(part)
    SCHEDULERS.get(sched)
    return part, sched


def policies(
    spec: Scenario, pair: str | None = None
) -> tuple[str, dict[str, Any], str, dict[str, Any]]:
    """(partitioner, its params, scheduler, its params) of a run: the scenario's, or ``pair``
    ("bsdp+arts") with the scenario's parameters for a policy it names itself."""
    if pair is None:
        part, sched = spec.partitioner.name, spec.scheduler.name
    else:
        part, sched = parse_pair(pair)
    part_params = dict(spec.partitioner.params) if part == spec.partitioner.name else {}
    sched_params = dict(spec.scheduler.params) if sched == spec.scheduler.name else {}
    return part, part_params, sched, sched_params


def load_scenario(path: str | Path) -> LoadedScenario:
    """Parse and check a scenario file: fields, policy names and parameters, topology file,
    model, workload spec. Errors name the file, the field and the fix (exit code 2)."""
    from testbed.partition import PARTITIONERS
    from testbed.schedule import SCHEDULERS
    from testbed.spec.model_profile import check_fits_context, load_model_profile
    from testbed.spec.timeline import check_timeline
    from testbed.spec.topology import load_topology
    from testbed.workload.spec import parse_workload_spec

    p = Path(path)
    src = str(p)
    spec = validate(Scenario, read_mapping(p, "scenario"), src)
    if spec.dilation != 1 and spec.execution != "emulated":
        raise ConfigError(
            f"{spec.dilation:g} applies to emulated runs only; set execution: emulated or drop it",
            source=src,
            field="dilation",
        )
    PARTITIONERS.create(
        spec.partitioner.name, spec.partitioner.params, source=src, field="partitioner"
    )
    SCHEDULERS.create(spec.scheduler.name, spec.scheduler.params, source=src, field="scheduler")
    for k, pair in enumerate(spec.compare):
        base_pair, adaptive = split_pair(pair)
        try:
            parse_pair(base_pair)
        except ConfigError as exc:
            raise ConfigError(str(exc), source=src, field=f"compare[{k}]") from None
        if adaptive and spec.repartition is None:
            raise ConfigError(
                f"{pair!r} re-partitions but the scenario has no `repartition:`; add e.g. "
                "repartition: {every: 10s, threshold: 10%}, or write the pair without +adaptive",
                source=src,
                field=f"compare[{k}]",
            )
    _check_repartition(spec, src)
    base = p.parent
    topo_path = spec.topology if spec.topology.is_absolute() else (base / spec.topology)
    if not topo_path.exists():
        raise ConfigError(
            f"topology file {str(topo_path)!r} not found; the path is relative to the scenario file",
            source=src,
            field="topology",
        )
    topology = load_topology(topo_path)
    check_timeline(spec.timeline, topology, end_s=spec.duration_s, source=src)
    try:
        profile = load_model_profile(spec.model, dtype=spec.dtype, base_dir=base)
    except ConfigError as exc:
        raise ConfigError(str(exc), source=src, field="model") from None
    context = profile.arch.max_position_embeddings
    if spec.model_dir is not None:
        cfg = next(
            (
                d / "config.json"
                for d in (base / spec.model_dir, spec.model_dir)
                if (d / "config.json").is_file()
            ),
            None,
        )
        if cfg is None:
            raise ConfigError(
                f"{str(spec.model_dir)!r} has no config.json; point it at a Hugging Face model "
                "folder (or make one with `testbed model make-tiny DIR`)",
                source=src,
                field="model_dir",
            )
        executed = load_model_profile(cfg, dtype=spec.dtype)  # the weights that will run
        context = min(context, executed.arch.max_position_embeddings)
    p_, o_ = spec.planning.prompt_tokens, spec.planning.output_tokens
    check_fits_context(p_, o_, context, source=src, field="planning")
    workload = parse_workload_spec(spec.workload, source=src)
    _check_workload_fits(workload, context, src)
    return LoadedScenario(
        spec=spec,
        path=p.resolve(),
        topology_path=topo_path.resolve(),
        workload=workload.with_context(context),  # longer trace requests: clipped, with a warning
    )


def _check_repartition(spec: Scenario, src: str) -> None:
    rp = spec.repartition
    if rp is None:
        return
    if spec.duration_s is not None and rp.every_s >= spec.duration_s:
        raise ConfigError(
            f"every {rp.every_s:g}s is not shorter than the run (duration {spec.duration_s:g}s): "
            "no check would run; make every shorter",
            source=src,
            field="repartition.every",
        )


def _check_workload_fits(workload: Any, context: int, src: str) -> None:
    """Lengths the file states outright (caps, fixed or bounded synthetic lengths) must fit the
    model's context window; a trace's own longer requests are clipped with a warning instead."""
    from testbed.spec.model_profile import check_fits_context

    def most(length: Any) -> int | None:
        if length is None:
            return None
        for attr in ("value", "high"):
            if getattr(length, attr, None) is not None:
                return int(getattr(length, attr))
        return None

    p_cap = workload.max_prompt_tokens
    o_cap = workload.max_output_tokens
    p_field, o_field = "workload.max_prompt_tokens", "workload.max_output_tokens"
    if getattr(workload, "kind", "") == "synthetic":
        p_len, o_len = most(workload.prompt_tokens), most(workload.output_tokens)
        if p_cap is None and p_len is not None:
            p_cap, p_field = p_len, "workload.prompt_tokens"
        if o_cap is None and o_len is not None:
            o_cap, o_field = o_len, "workload.output_tokens"
    if o_cap is not None:
        check_fits_context(1, o_cap, context, source=src, field=o_field)
    if p_cap is not None:
        check_fits_context(p_cap, 1 if o_cap is None else o_cap, context, source=src, field=p_field)
