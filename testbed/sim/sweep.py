"""`testbed sweep SCENARIO --simulate`: latency-vs-load (and vs sequence length) curves.

For every policy pair of the scenario and every value of the swept variable, one simulated run
of the scenario's workload, changed in one respect:

- ``rate``: arrivals rescaled so that the mean request rate is the value (requests/s); the
  order, gaps' shape and lengths of the trace are kept;
- ``output_tokens`` / ``prompt_tokens``: every request gets that length (arrivals kept).

Each point reports E2E mean and p99, TTFT mean, TPOT mean, goodput (SLO-meeting requests/s),
completed and failed requests, and the plan's bottleneck: the most utilised node and its
utilisation. Results: ``sweep.csv``, ``sweep.md`` (one table) and ``sweep.png`` (one figure).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from testbed.errors import ConfigError
from testbed.experiment.prepare import load_parts
from testbed.sim.engine import SimConfig
from testbed.sim.run import bottleneck, prepare_sim, run_folder, simulate, summarize_outcome
from testbed.spec.scenario import LoadedScenario
from testbed.workload.request import TraceRequest

VARIABLES = ("rate", "output_tokens", "prompt_tokens")


@dataclass(frozen=True)
class SweepPoint:
    pair: str
    variable: str
    value: float
    requests: int
    completed: int
    failed: int
    e2e_mean_s: float | None
    e2e_p99_s: float | None
    ttft_mean_s: float | None
    tpot_mean_s: float | None
    goodput_rps: float | None
    throughput_rps: float
    bottleneck_node: str
    bottleneck_util: float


def mean_rate(reqs: Sequence[TraceRequest]) -> float:
    span = reqs[-1].arrival_s - reqs[0].arrival_s if reqs else 0.0
    return (len(reqs) - 1) / span if span > 0 else 0.0


def vary(reqs: Sequence[TraceRequest], variable: str, value: float) -> list[TraceRequest]:
    """The requests with ``variable`` set to ``value`` (see the module docstring)."""
    if variable == "rate":
        base = mean_rate(reqs)
        if base <= 0:
            raise ConfigError("a rate sweep needs at least two requests at different times")
        k = base / value
        t0 = reqs[0].arrival_s
        return [replace(r, arrival_s=(r.arrival_s - t0) * k) for r in reqs]
    n = int(value)
    if n < 1:
        raise ConfigError(f"--{variable.replace('_', '-')}: {value!r} must be >= 1")
    if variable == "output_tokens":
        return [replace(r, output_tokens=n) for r in reqs]
    return [replace(r, prompt_tokens=n) for r in reqs]


def run_sweep(
    loaded: LoadedScenario,
    pairs: Sequence[str],
    variable: str,
    values: Sequence[float],
    *,
    requests: int | None = None,
    config: SimConfig | None = None,
) -> list[SweepPoint]:
    if variable not in VARIABLES:
        raise ConfigError(f"unknown sweep variable {variable!r}; use one of {', '.join(VARIABLES)}")
    points = []
    choices: list[str | None] = list(pairs) or [None]  # None: the scenario's own pair
    parts = load_parts(loaded, simulate=True)  # loaded once, planned per pair
    for pair in choices:
        setup = prepare_sim(parts, pair, requests)
        for v in values:
            if v <= 0:
                raise ConfigError(f"sweep values must be > 0, got {v!r}", field=f"--{variable}")
            out = simulate(setup, config=config, requests=vary(setup.requests, variable, v))
            s = summarize_outcome(setup, out)
            node, util = bottleneck(s)
            points.append(
                SweepPoint(
                    setup.pair,
                    variable,
                    float(v),
                    s.requests,
                    s.completed,
                    s.failed,
                    s.e2e_s.mean,
                    s.e2e_s.p99,
                    s.ttft_s.mean,
                    s.tpot_s.mean,
                    s.goodput_rps,
                    s.request_throughput_rps,
                    node,
                    util,
                )
            )
    return points


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:.1f}"


def markdown(points: Sequence[SweepPoint]) -> str:
    head = (
        "| pair | {var} | E2E mean ms | E2E p99 ms | TTFT mean ms | TPOT mean ms | goodput rps "
        "| done/all | bottleneck (util) |"
    )
    lines = [head.format(var=points[0].variable if points else "value"), "|" + " --- |" * 9]
    for p in points:
        good = "-" if p.goodput_rps is None else f"{p.goodput_rps:.3f}"
        lines.append(
            f"| {p.pair} | {p.value:g} | {_ms(p.e2e_mean_s)} | {_ms(p.e2e_p99_s)} | "
            f"{_ms(p.ttft_mean_s)} | {_ms(p.tpot_mean_s)} | {good} | {p.completed}/{p.requests} "
            f"| {p.bottleneck_node} ({100 * p.bottleneck_util:.0f}%) |"
        )
    return "\n".join(lines) + "\n"


def plot(path: Path, points: Sequence[SweepPoint]) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = (
        ("e2e_mean_s", "E2E mean (ms)", 1e3),
        ("e2e_p99_s", "E2E p99 (ms)", 1e3),
        ("ttft_mean_s", "TTFT mean (ms)", 1e3),
        ("tpot_mean_s", "TPOT mean (ms)", 1e3),
        ("goodput_rps", "goodput (req/s)", 1.0),
        ("bottleneck_util", "bottleneck utilisation (%)", 100.0),
    )
    fig = Figure(figsize=(14, 7), layout="constrained")
    axes = fig.subplots(2, 3).ravel()
    var = points[0].variable if points else "value"
    for ax, (attr, title, scale) in zip(axes, panels, strict=True):
        for pair in dict.fromkeys(p.pair for p in points):
            xs = [(p.value, getattr(p, attr)) for p in points if p.pair == pair]
            xs = [(x, y * scale) for x, y in xs if y is not None]
            if xs:
                ax.plot(*zip(*xs, strict=True), marker="o", label=pair)
        ax.set_title(title)
        ax.set_xlabel("request rate (req/s)" if var == "rate" else var.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return path


def write_sweep(root: Path, scenario: str, points: Sequence[SweepPoint]) -> Path:
    out = run_folder(root, scenario, f"sweep-{points[0].variable if points else 'empty'}")
    out.mkdir(parents=True)
    with (out / "sweep.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(points[0]))) if points else None
        if w is not None:
            w.writeheader()
            for p in points:
                w.writerow(asdict(p))
    (out / "sweep.md").write_text(markdown(points), encoding="utf-8")
    plot(out / "sweep.png", points)
    return out
