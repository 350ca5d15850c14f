"""`reproduction.md`, the CSV files and the plots of `testbed reproduce hyperion`.

Every ratio is shown with the load (req/s) and both plans' predicted bottleneck utilisation it
was measured at; where either plan is at or past its capacity the cell says "unstable".
"""

from __future__ import annotations

import csv
import math
import platform
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from testbed.experiment.reproduce import (
    COMPARISONS,
    GPIPE,
    HYPERION,
    NAMES,
    Comparison,
    Point,
    Ratio,
    ReproResult,
)


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _u(v: float) -> str:
    return f"{100 * v:.0f} %"


def _rate(v: float) -> str:
    return f"{v:.3g}"


def ratio_cell(r: Ratio) -> str:
    if r.value is None:
        return "unstable" if not r.stable else "-"
    return f"{r.value:.3f}"


def best(ratios: Sequence[Ratio]) -> Ratio | None:
    """The lowest (best for the first pair) ratio among the stable points."""
    ok = [r for r in ratios if r.value is not None]
    return min(ok, key=lambda r: r.value or math.inf) if ok else None


def headline_rows(res: ReproResult) -> list[str]:
    rows = [
        "| model | comparison | paper | ours (lowest over stable loads) | measured at | "
        "bottleneck utilisation (pair / baseline) | ours, range over stable loads | "
        "stable loads / all |",
        "|" + " --- |" * 8,
    ]
    for model, exp, c in (
        (m, e, c) for m in res.config.models for e in res.experiments() for c in COMPARISONS
    ):
        rs = [r for r in res.ratios(exp) if r.model == model and r.comparison == c]
        if rs:
            label = c.label + (" (emulated)" if exp == "emulated" else "")
            rows.append(headline_row(model, label, c, rs))
    return rows


def headline_row(model: str, label: str, c: Comparison, rs: Sequence[Ratio]) -> str:
    b = best(rs)
    vals = [r.value for r in rs if r.value is not None]
    paper = "-" if c.paper is None else f"{c.paper:.3f}"
    if b is None or b.value is None:
        return (
            f"| {model} | {label} | {paper} | unstable at every load | - | - | - | 0 / {len(rs)} |"
        )
    where = f"{_rate(b.rate_rps)} req/s"
    if c.experiment == "long":
        where += f", {b.output_tokens:.0f} output tokens"
    return (
        f"| {model} | {label} | {paper} | **{b.value:.3f}** | {where} | "
        f"{_u(b.util_pair)} / {_u(b.util_baseline)} | "
        f"{min(vals):.3f} - {max(vals):.3f} | {len(vals)} / {len(rs)} |"
    )


def sweep_rows(res: ReproResult, model: str, experiment: str = "rate") -> list[str]:
    pts = [p for p in res.points if p.experiment == experiment and p.model == model]
    pairs = list(dict.fromkeys(p.pair for p in pts))
    rates = sorted({p.rate_rps for p in pts})
    by = {(p.pair, p.rate_rps): p for p in pts}
    ratios = {
        (r.comparison.label, r.rate_rps): r for r in res.ratios(experiment) if r.model == model
    }
    head = ["rate req/s"] + [f"{NAMES.get(p, p)} ({p}) E2E s [util]" for p in pairs]
    head += ["Hyperion / GPipe", "Hyperion / HEFT"]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for rate in rates:
        cells = [_rate(rate)]
        for pair in pairs:
            p = by.get((pair, rate))
            cells.append(
                "-"
                if p is None
                else f"{_s(p.e2e_mean_s)} [{_u(p.utilisation)}]" + ("" if p.stable else " unstable")
            )
        for label in (COMPARISONS[0].label, COMPARISONS[1].label):
            r = ratios.get((label, rate))
            cells.append("-" if r is None else ratio_cell(r))
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def long_rows(res: ReproResult, model: str) -> list[str]:
    pts = [p for p in res.points if p.experiment == "long" and p.model == model]
    by = {(p.pair, p.rate_rps, p.output_tokens_mean): p for p in pts}
    ratios = [r for r in res.ratios("long") if r.model == model]
    rows = [
        "| output tokens | rate req/s | Hyperion E2E s [util] | GPipe E2E s [util] | "
        "Hyperion / GPipe |",
        "|" + " --- |" * 5,
    ]
    for r in sorted(ratios, key=lambda r: (r.output_tokens, r.rate_rps)):
        h = by[(HYPERION, r.rate_rps, r.output_tokens)]
        g = by[(GPIPE, r.rate_rps, r.output_tokens)]
        rows.append(
            f"| {r.output_tokens:.0f} | {_rate(r.rate_rps)} | {_s(h.e2e_mean_s)} "
            f"[{_u(h.utilisation)}] | {_s(g.e2e_mean_s)} [{_u(g.utilisation)}] | {ratio_cell(r)} |"
        )
    return rows


def utilisation_loads(res: ReproResult, model: str) -> list[float]:
    """Two loads of the sweep: the highest at which every pair is stable, and the highest
    (the best plan ~90 % busy)."""
    pts = [p for p in res.points if p.experiment == "rate" and p.model == model]
    rates = sorted({p.rate_rps for p in pts})
    if not rates:
        return []
    stable = [r for r in rates if all(p.stable for p in pts if p.rate_rps == r)]
    return list(dict.fromkeys(([stable[-1]] if stable else []) + [rates[-1]]))


def utilisation_rows(res: ReproResult, model: str) -> list[str]:
    pts = [p for p in res.points if p.experiment == "rate" and p.model == model]
    tiers = list(pts[0].tier_util) if pts else []
    head = ["rate req/s", "pair", "plan util (predicted)"] + [f"{t} (measured)" for t in tiers]
    head += ["cluster (measured, all nodes)"]
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for rate in utilisation_loads(res, model):
        for p in (p for p in pts if p.rate_rps == rate):
            vals = [p.tier_util[t] for t in tiers]
            cells = [_rate(rate), p.pair, _u(p.utilisation) + ("" if p.stable else " unstable")]
            cells += [_u(v) for v in vals] + [_u(p.cluster_util)]
            rows.append("| " + " | ".join(cells) + " |")
    return rows


def agreement_rows(res: ReproResult) -> list[str]:
    rows = [
        "| model | pair | rate req/s | emulated E2E s | simulated E2E s | emulated / simulated "
        "| overrun steps |",
        "|" + " --- |" * 7,
    ]
    for emu, sim in res.agreement:
        ratio = (
            f"{emu.e2e_mean_s / sim.e2e_mean_s:.3f}" if emu.e2e_mean_s and sim.e2e_mean_s else "-"
        )
        over = "-" if emu.overrun_fraction is None else f"{100 * emu.overrun_fraction:.2f} %"
        rows.append(
            f"| {emu.model} | {emu.pair} | {_rate(emu.rate_rps)} | {_s(emu.e2e_mean_s)} | "
            f"{_s(sim.e2e_mean_s)} | {ratio} | {over} |"
        )
    return rows


def assumptions(res: ReproResult) -> list[str]:
    c = res.config
    emulated = [
        f"- **Emulated runs**: lengths from the same trace clipped to {c.emu_max_prompt_tokens} "
        f"prompt / {c.emu_max_output_tokens} output tokens, {c.emu_requests} requests per "
        f"point, at {', '.join(f'{100 * f:g} %' for f in c.emu_fractions)} of the weakest "
        f"plan's capacity (the rate shown is that of the drawn arrivals), runtime "
        f"{c.emu_runtime}, time dilation {c.emu_dilation:g}.",
    ]
    lines = [
        "The paper (arXiv 2511.14450) publishes none of the following; these are ours:",
        "",
        f"- **Hardware and bandwidths**: `{c.topology.name}` (its comments): edge 2 x Jetson AGX "
        "Orin + 1 Orin Nano (1 Gbit/s LAN), fog 2 x RTX 3090 + 1 A10, cloud 2 x A100 80GB; "
        "edge->fog 100 Mbit/s, 10 ms one way; fog->cloud 1 Gbit/s, 25 ms. Device speeds: vendor "
        "peak FP16 and memory bandwidth derated by the cost model's efficiency factors "
        "(roofline), float16 weights; no measured profile.",
        f"- **Request lengths** (a): drawn jointly, with replacement, from the bundled Azure 2023 "
        f"conversation trace (first 1,000 rows), clipped to {c.max_prompt_tokens} prompt / "
        f"{c.max_output_tokens} output tokens; the plans are made for the mean lengths. (b): "
        f"a fixed {c.long_prompt_tokens}-token prompt and outputs of "
        f"{', '.join(str(x) for x in c.long_outputs)} tokens, plans made for each length.",
        f"- **Request rates**: Poisson arrivals, {c.requests} requests per point in (a) and "
        f"{c.long_requests} in (b); one realisation per model rescaled to every rate. (a) from "
        f"near idle (the weakest plan {100 * c.idle_fraction:g} % busy) to the best plan "
        f"{100 * max(c.best_fractions):g} % busy, plus each weaker plan at "
        f"{', '.join(f'{100 * f:g} %' for f in c.baseline_fractions)} of its capacity; (b) at "
        f"{', '.join(f'{100 * f:g} %' for f in c.long_fractions)} of GPipe's capacity.",
        "- **Utilisation**: predicted = rate / the plan's capacity (`testbed/cost/capacity.py`, "
        "reference request = the mean lengths; round robin spreads requests evenly, so its "
        "slowest replica limits a tier); measured = each node's busy time / the run's length, "
        "averaged over the tier's nodes (nodes that hold no blocks count as idle). Runs are short "
        "(ramp-up and drain included), so measured utilisation stays below the predicted "
        "steady state.",
        "- **Baselines**: GPipe = `even` partition + `round_robin`; HEFT = classic HEFT "
        "(`heft` partitioner, myopic, with communication costs) + `heft` scheduler; "
        "`min_latency+arts` (ours): the exact single-request latency-optimal split. The "
        "paper's HEFT configuration is not published.",
        "- **What is not modelled** (simulator): batching, jitter and loss, failures; requests "
        "are served one step at a time per node, KV cache limited by node memory. ARTS and "
        "BSDP are our reconstructions from the paper's abstract (README, Algorithms).",
        "- **Ratios** are E2E means (arrival -> last token) of the first pair over the "
        "baseline, at the same load and requests; the paper's are 'up to' figures, so the "
        "table shows our lowest ratio over the loads where both plans are stable, with the "
        "range beside it.",
    ]
    return lines + (emulated if res.mode == "emulated" else [])


def git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def markdown(res: ReproResult, files: dict[str, Path]) -> str:
    c = res.config
    lines = [
        "# Reproducing Hyperion (arXiv 2511.14450)",
        "",
        f"`testbed reproduce hyperion --{'emulate' if res.mode == 'emulated' else 'simulate'}"
        f"{' --quick' if c.size == 'quick' else ''}`: {res.mode}, size {c.size}, "
        f"{res.wall_s:.0f} s on {platform.node() or 'this machine'} "
        f"({time.strftime('%Y-%m-%d %H:%M %Z')}, git {git_revision()}).",
        "",
        "## Our ratios beside the paper's",
        "",
        "E2E mean of the pair / E2E mean of the baseline (lower: the pair is faster). Only loads "
        "at which both plans' bottlenecks are below 100 % busy count; past its capacity a "
        "plan's queue grows without bound and a ratio against it says nothing.",
        "",
        *headline_rows(res),
        "",
    ]
    for model in c.models:
        if any(p.experiment == "rate" and p.model == model for p in res.points):
            lines += [
                f"## (a) E2E latency vs request rate: {model}",
                "",
                "E2E mean in seconds, [predicted bottleneck utilisation]; ratios only where "
                "both plans are stable.",
                "",
                *sweep_rows(res, model),
                "",
                f"![latency vs rate]({files[f'rate_{model}'].name})",
                "",
            ]
    for model in c.models:
        if any(p.experiment == "long" and p.model == model for p in res.points):
            lines += [
                f"## (b) Long-sequence generation: {model}",
                "",
                *long_rows(res, model),
                "",
                f"![long sequences]({files[f'long_{model}'].name})",
                "",
            ]
    for model in c.models:
        if any(p.experiment == "rate" and p.model == model for p in res.points):
            lines += [
                f"## (c) Utilisation per tier: {model}",
                "",
                "At the highest load where every pair is stable, and at the highest load of "
                "the sweep (the best plan ~90 % busy; the weaker plans are past capacity there "
                "and their bottleneck tiers saturate).",
                "",
                *utilisation_rows(res, model),
                "",
                f"![utilisation]({files[f'util_{model}'].name})",
                "",
            ]
    for model in c.models:
        if any(p.experiment == "emulated" and p.model == model for p in res.points):
            lines += [
                f"## (a) on emulated devices: {model}",
                "",
                *sweep_rows(res, model, "emulated"),
                "",
            ]
    if res.agreement:
        lines += [
            "## Emulated vs simulated",
            "",
            f"The same scenario and requests run on the {c.emu_runtime} testbed with emulated "
            "devices and in the simulator. Overruns above 1 % mean the host could not keep up: "
            "those steps, and so those runs, took longer than the emulated devices would.",
            "",
            *agreement_rows(res),
            "",
        ]
    lines += ["## Assumptions the paper does not publish", "", *assumptions(res), ""]
    lines += ["## Files", ""]
    lines += [f"- `{p.name}`" for p in files.values()]
    lines += [f"- `scenarios/{p.name}` (re-runnable)" for p in res.scenarios]
    return "\n".join(lines) + "\n"


def write_csv(path: Path, points: Sequence[Point]) -> Path:
    tiers = list(dict.fromkeys(t for p in points for t in p.tier_util))
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        names = [k for k in asdict(points[0]) if k != "tier_util"] if points else []
        w.writerow(names + ["stable"] + [f"util_{t}" for t in tiers])
        for p in points:
            d = asdict(p)
            w.writerow([d[k] for k in names] + [p.stable] + [p.tier_util.get(t, "") for t in tiers])
    return path


def write_ratios_csv(path: Path, ratios: Sequence[Ratio]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["model", "comparison", "pair", "baseline", "paper", "rate_rps",
                    "output_tokens", "util_pair", "util_baseline", "e2e_pair_s",
                    "e2e_baseline_s", "ratio", "stable"])  # fmt: skip
        for r in ratios:
            c: Comparison = r.comparison
            w.writerow([r.model, c.label, c.pair, c.baseline, c.paper, r.rate_rps,
                        r.output_tokens, r.util_pair, r.util_baseline, r.e2e_pair_s,
                        r.e2e_baseline_s, r.value, r.stable])  # fmt: skip
    return path


def write_report(res: ReproResult, out_dir: Path) -> dict[str, Path]:
    """reproduction.md, the CSV files and the plots into ``out_dir``."""
    from testbed.experiment import reproduce_plots as plots

    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for model in res.config.models:
        pts = [p for p in res.points if p.model == model]
        if any(p.experiment == "rate" for p in pts):
            files[f"rate_{model}"] = plots.rate_plot(out_dir / f"latency_vs_rate_{model}.png", pts)
            files[f"util_{model}"] = plots.util_plot(
                out_dir / f"utilisation_{model}.png", pts, utilisation_loads(res, model)
            )
        if any(p.experiment == "long" for p in pts):
            files[f"long_{model}"] = plots.long_plot(out_dir / f"long_sequence_{model}.png", pts)
    files["points"] = write_csv(out_dir / "points.csv", res.points)
    files["ratios"] = write_ratios_csv(
        out_dir / "ratios.csv", [r for e in res.experiments() for r in res.ratios(e)]
    )
    if res.agreement:
        files["agreement"] = write_csv(
            out_dir / "agreement.csv", [p for pair in res.agreement for p in pair]
        )
    report = out_dir / "reproduction.md"
    report.write_text(markdown(res, files), encoding="utf-8")
    files["report"] = report
    return files
