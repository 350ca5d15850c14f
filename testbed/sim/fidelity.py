"""`testbed fidelity RUN_DIR`: the simulator against a finished real (or emulated) run.

The run's own inputs are replayed in simulated time: its plan (``config.json``, not planned
again), its scheduler (name and parameters), its nodes' batch limits (a node without one ran
its stage server's default), and its requests as the records hold them (scheduled arrival,
prompt and output tokens). Step times come from a calibrated profile: fitted on the same run
(in-sample: optimistic, the fit has seen the very steps it predicts) or given with
``--profile`` from another run (out-of-sample). An emulated run (``execution: emulated``) is
simulated with its devices' own timing instead: every emulated step lasted the cost model's
time for the studied model's blocks on the node's device, so the simulator takes the same cost
model (nothing is fitted to the stand-in's host times); a dilated run's links are taken back
to the emulated clock its records are on, and the transport's per-call overhead (HTTP,
serialisation, the broker: host time / k) is the one figure measured on the run.
Then real and simulated summaries are compared:
median E2E within 10 %, p99 E2E within 20 %, each node's utilisation within 10 points; TTFT and
TPOT medians are reported for information.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from testbed.errors import ConfigError
from testbed.metrics.records import RequestRecord
from testbed.sim.steps import CalibratedProfile
from testbed.workload.request import TraceRequest

FIDELITY_FILE = "fidelity.json"
OVERRUN_LIMIT = 0.01  # an emulated run whose steps overran more often did not keep its timing
EMULATED_NOTE = (
    "emulated run: the step times are the emulated devices' own (the studied model's cost "
    "model, as the stages paced them), not fitted; the per-call transport overhead is measured "
    "on this run (one figure, in-sample)"
)
IN_SAMPLE_NOTE = (
    "in-sample: the profile was fitted on this same run, so the simulator is scored on the "
    "steps it was fitted to; this is optimistic. For an out-of-sample figure calibrate on "
    "another run (`testbed calibrate OTHER_RUN -o p.json`) and pass `--profile p.json`."
)


@dataclass(frozen=True)
class Tolerances:
    e2e_p50_rel: float = 0.10  # median E2E: |sim - real| / real
    e2e_p99_rel: float = 0.20  # p99 E2E: |sim - real| / real
    util_points: float = 0.10  # per node: |sim - real| utilisation (0..1, so 0.10 = 10 points)


@dataclass(frozen=True)
class Check:
    """One compared figure; ``ok`` is None for one reported for information only."""

    metric: str  # "e2e p50", "util cloud-1", ...
    real: float | None
    sim: float | None
    kind: Literal["relative", "points", "info"]
    error: float | None  # relative error (relative, info) or absolute difference (points)
    limit: float | None  # the tolerance on ``error`` (None: information)
    ok: bool | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def relative_error(real: float | None, sim: float | None) -> float | None:
    """|sim - real| / real; None when either is missing; inf when real is 0 and sim is not."""
    if real is None or sim is None:
        return None
    if real == 0:
        return 0.0 if sim == 0 else math.inf
    return abs(sim - real) / abs(real)


def _relative(metric: str, real: float | None, sim: float | None, limit: float | None) -> Check:
    err = relative_error(real, sim)
    ok = None if limit is None else (err is not None and err <= limit)
    return Check(metric, real, sim, "relative" if limit is not None else "info", err, limit, ok)


def _stat(summary: Mapping[str, Any], name: str, q: str) -> float | None:
    v = (summary.get(name) or {}).get(q)
    return None if v is None else float(v)


def compare_summaries(
    real: Mapping[str, Any], sim: Mapping[str, Any], tol: Tolerances = Tolerances()
) -> list[Check]:
    """Real vs simulated, from two ``summary.json`` dicts (``Summary.to_dict``): the checked
    figures first (E2E p50, E2E p99, every node's utilisation), then the informative ones."""
    checks = [
        _relative("e2e p50", _stat(real, "e2e_s", "p50"), _stat(sim, "e2e_s", "p50"), tol.e2e_p50_rel),
        _relative("e2e p99", _stat(real, "e2e_s", "p99"), _stat(sim, "e2e_s", "p99"), tol.e2e_p99_rel),
    ]  # fmt: skip
    ru, su = real.get("node_utilisation") or {}, sim.get("node_utilisation") or {}
    for node in sorted(set(ru) | set(su)):
        r, s = float(ru.get(node, 0.0)), float(su.get(node, 0.0))
        diff = abs(s - r)
        checks.append(
            Check(f"util {node}", r, s, "points", diff, tol.util_points, diff <= tol.util_points)
        )
    for name, key in (("ttft", "ttft_s"), ("tpot", "tpot_s")):
        checks.append(
            _relative(f"{name} p50", _stat(real, key, "p50"), _stat(sim, key, "p50"), None)
        )
    checks.append(
        _relative(
            "completed", float(real.get("completed", 0)), float(sim.get("completed", 0)), None
        )
    )
    return checks


def passed(checks: Sequence[Check]) -> bool:
    return all(c.ok is not False for c in checks)


# -- the run's own inputs ------------------------------------------------------------------------
def run_requests(records: Sequence[RequestRecord]) -> tuple[TraceRequest, ...]:
    """The requests as the run replayed them: scheduled arrival, prompt and output tokens."""
    return tuple(
        TraceRequest(r.request_id, r.arrival_s, r.prompt_tokens, r.output_tokens, source_row=-1)
        for r in sorted(records, key=lambda r: (r.arrival_s, r.request_id))
    )


def read_config(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{str(path)!r}: {exc}; give a run folder written by `testbed replay`"
        ) from None
    if data.get("mode") == "simulated":
        raise ConfigError(
            f"{run_dir} is a simulated run; fidelity compares the simulator with a real or "
            "emulated run (`testbed replay`)"
        )
    for key in ("scenario", "plan"):
        if key not in data:
            raise ConfigError(f"{str(path)!r} has no {key!r}; give a folder of `testbed replay`")
    return data


def served_max_batch(cfg: Mapping[str, Any]) -> dict[str, int]:
    """Node -> the max_batch its stage server ran with: the node's resolved value in the run's
    topology (node, else scenario), else the stage server's own default."""
    from testbed.stage.batcher import BatchLimits

    default = BatchLimits().max_batch
    scenario_default = (cfg.get("scenario") or {}).get("max_batch")
    out = {}
    for tier in (cfg.get("topology") or {}).get("tiers") or []:
        for node in tier.get("nodes") or []:
            v = node.get("max_batch")
            v = scenario_default if v is None else v
            out[str(node["name"])] = int(default if v is None else v)
    return out


def run_setup(
    run_dir: Path,
    cfg: Mapping[str, Any],
    records: Sequence[RequestRecord],
    profile: CalibratedProfile,
) -> Any:
    """A :class:`~testbed.sim.run.SimSetup` of the run, from its ``config.json`` alone (the
    scenario file may have changed or gone since): the scenario, topology and model profile as
    resolved for the run, its plan, its policies, its requests, and ``profile`` for the step
    times. A measured profile the scenario named (cost-model predictions) is read if still there."""
    from testbed.broker.layout import Layout
    from testbed.cost.model import CostModel
    from testbed.emulation.dilation import run_dilation, undilate_topology
    from testbed.experiment.prepare import Prepared
    from testbed.sim.run import SimSetup
    from testbed.spec.model_profile import ModelProfile
    from testbed.spec.plan import Plan
    from testbed.spec.scenario import LoadedScenario, Scenario, policies
    from testbed.spec.topology import Topology
    from testbed.workload.request import Workload, WorkloadStats

    src = str(Path(run_dir) / "config.json")
    try:
        scen = dict(cfg["scenario"])
        path = Path(str(scen.pop("path", run_dir)))
        spec = Scenario.model_validate(scen)
        topo_cfg = dict(cfg["topology"])
        topo_path = Path(str(topo_cfg.pop("path", "")))
        topology = Topology.model_validate(topo_cfg)  # as run: every node's max_batch resolved
        topology = undilate_topology(topology, run_dilation(cfg))  # as planned: emulated clock
        model = ModelProfile.model_validate(cfg["model_profile"])
        plan = Plan.model_validate(cfg["plan"])
        pair = f"{cfg['partitioner']['name']}+{cfg['scheduler']['name']}"
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{exc}; is this a run folder of `testbed replay`?", source=src) from None
    loaded = LoadedScenario(spec, path, topo_path, workload=spec.workload)
    part, part_params, sched, _ = policies(spec, pair)
    sched_params = dict((cfg.get("scheduler") or {}).get("params") or {})
    reqs = run_requests(records)
    prep = Prepared(
        loaded, part, dict(part_params), sched, sched_params, topology, None, model,
        CostModel(model, _measured(loaded)), plan, Workload(reqs, WorkloadStats()), reqs,
        calibrated=profile,
    )  # fmt: skip
    urls = {n.name: f"sim://{n.name}" for _, n in topology.nodes()}
    return SimSetup(prep, Layout.from_plan(plan, topology, urls, prep.cost))


def _measured(loaded: Any) -> Any:
    """The scenario's measured profile (`testbed profile`) if it named one that is still there."""
    from testbed.sim.steps import is_calibrated_profile
    from testbed.spec.model_profile import load_measured_profile

    if loaded.spec.profile is None:
        return None
    path = loaded.resolve(loaded.spec.profile)
    if not path.is_file() or is_calibrated_profile(path):
        return None
    return load_measured_profile(path)


# -- the comparison ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fidelity:
    run_dir: Path
    profile_source: str  # the run the step times were fitted on ("" for emulated timing)
    in_sample: bool  # step times fitted on this very run (optimistic)
    checks: tuple[Check, ...]
    real: dict[str, Any]  # the run's summary.json
    sim: dict[str, Any]  # the simulated run's summary
    notes: tuple[str, ...] = ()  # what the simulation could not reproduce of the run
    # "emulated": the emulated devices' cost model (an emulated run, no --profile);
    # "calibrated": a profile fitted on a run (this one or --profile's)
    timing: Literal["emulated", "calibrated"] = "calibrated"
    cost_source: str = ""  # emulated timing: the cost model's source ("roofline", "measured:...")
    hop_overhead_s: float = 0.0  # per stage call, added to the link model
    dilation: float = 1.0  # the run's time dilation k (records and links on the emulated clock)
    overrun_fraction: float | None = None  # an emulated run's steps that overran their window

    @property
    def note(self) -> str:
        if self.timing == "emulated":
            return EMULATED_NOTE
        return IN_SAMPLE_NOTE if self.in_sample else "out-of-sample: profile from another run"

    @property
    def ok(self) -> bool:
        return passed(self.checks)

    def to_dict(self, tol: Tolerances) -> dict[str, Any]:
        keys = ("completed", "failed", "wall_s", "e2e_s", "ttft_s", "tpot_s", "node_utilisation")
        return {
            "run_dir": str(self.run_dir),
            "timing": self.timing,
            "cost_source": self.cost_source,
            "profile_source": self.profile_source,
            "in_sample": self.in_sample,
            "hop_overhead_s": self.hop_overhead_s,
            "dilation": self.dilation,
            "overrun_fraction": self.overrun_fraction,
            "note": self.note,
            "passed": self.ok,
            "tolerances": asdict(tol),
            "checks": [c.to_dict() for c in self.checks],
            "notes": list(self.notes),
            "real": {k: self.real.get(k) for k in keys},
            "simulated": {k: self.sim.get(k) for k in keys},
        }


def check_fidelity(
    run_dir: Path, profile: Path | None = None, tol: Tolerances = Tolerances()
) -> Fidelity:
    """Simulate ``run_dir``'s run with a profile calibrated on it (or ``profile``) and compare;
    an emulated run without ``profile`` is simulated with its devices' own timing."""
    from testbed.emulation.dilation import run_dilation
    from testbed.metrics.report import load_records, load_summary
    from testbed.sim.calibrate import calibrate_run
    from testbed.sim.run import simulate, summarize_outcome
    from testbed.sim.state import SimConfig
    from testbed.sim.steps import load_calibrated_profile

    run_dir = Path(run_dir).resolve()
    cfg = read_config(run_dir)
    records = load_records(run_dir / "requests.jsonl")
    real = load_summary(run_dir / "summary.json")
    emulated = (cfg.get("scenario") or {}).get("execution") == "emulated"
    notes = []
    timing: Literal["emulated", "calibrated"] = "calibrated"
    if emulated and profile is None:
        prof, in_sample, timing = emulated_timing(run_dir, records), False, "emulated"
    else:
        prof = calibrate_run(run_dir) if profile is None else load_calibrated_profile(profile)
        in_sample = profile is None or (
            bool(prof.source) and Path(prof.source).resolve() == run_dir
        )
    setup = run_setup(run_dir, cfg, records, prof)
    overruns = ((real.get("emulation") or {}).get("overrun_fraction")) if emulated else None
    if timing == "emulated":
        ran = str(cfg.get("cost_source") or "")
        if ran and ran != setup.prep.cost.source:
            notes.append(
                f"the run's stages paced with the {ran} cost model but the simulator has "
                f"{setup.prep.cost.source} (the scenario's `profile:` is gone or changed)"
            )
        if overruns is not None and overruns > OVERRUN_LIMIT:
            notes.append(
                f"{overruns:.1%} of the emulated steps overran their window: they took the "
                "host's time, not the device's, so the run is slower than its devices and the "
                "simulator comes out fast; rerun with a larger `dilation:` or fewer nodes"
            )
    batch = served_max_batch(cfg)
    if setup.prep.loaded.spec.timeline and any(v > 1 for v in batch.values()):
        notes.append(
            "the run has a timeline: simulated without batching (the simulator runs timelines "
            "one step at a time), though its stage servers batched"
        )
        batch = dict.fromkeys(batch, 1)
    broker = cfg.get("broker") or {}
    config = SimConfig(
        max_active_requests=int(broker.get("max_active_requests", 1024)),
        node_max_batch={n: v for n, v in batch.items() if n in setup.layout.nodes},
    )
    outcome = simulate(setup, config=config)
    sim = summarize_outcome(setup, outcome).to_dict()
    return Fidelity(
        run_dir, prof.source if timing == "calibrated" else "", in_sample,
        tuple(compare_summaries(real, sim, tol)), real, sim, tuple(notes), timing,
        setup.prep.cost.source, prof.hop_overhead_s, run_dilation(cfg),
        None if overruns is None else float(overruns),
    )  # fmt: skip


def emulated_timing(run_dir: Path, records: Sequence[RequestRecord]) -> CalibratedProfile:
    """An emulated run's timing for the simulator: no node fitted (the cost model, as the
    stages paced), and the per-call overhead measured on the run: the mean excess of its calls
    over what the simulator's links charge them, queueing included
    (:func:`testbed.sim.calibrate.contended_call_overhead_s`, links on the emulated clock),
    which is the host's transport cost / k, not the device's."""
    from testbed.sim.calibrate import contended_call_overhead_s, served_hop_links

    hop_links = served_hop_links(run_dir)
    excess = None if hop_links is None else contended_call_overhead_s(records, hop_links)
    return CalibratedProfile(source=str(run_dir), hop_overhead_s=excess or 0.0)


def write_fidelity(result: Fidelity, out: Path, tol: Tolerances = Tolerances()) -> Path:
    out = Path(out)
    if out.is_dir():
        out = out / FIDELITY_FILE
    out.write_text(json.dumps(result.to_dict(tol), indent=2, default=str) + "\n", encoding="utf-8")
    return out
