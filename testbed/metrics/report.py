"""Write a run's results: requests.jsonl / requests.csv, summary.json, PNG plots,
trace.json (Chrome/Perfetto), and comparison tables for several runs.

The only module of :mod:`testbed.metrics` that touches the file system. Plots use
matplotlib's Agg canvas through the object API (no pyplot, no global backend switch).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from testbed.metrics.chrome_trace import chrome_trace
from testbed.metrics.compare import (
    DEFAULT_METRICS,
    MetricSpec,
    compare_rows,
    csv_table,
    markdown_table,
)
from testbed.metrics.records import RequestRecord
from testbed.metrics.summary import Summary, batch_series

_CSV_FIELDS = (
    "request_id",
    "arrival_s",
    "status",
    "reason",
    "route",
    "prompt_tokens",
    "output_tokens",
    "generated_tokens",
    "ttft_s",
    "tpot_s",
    "e2e_s",
    "injection_lag_s",
    "queueing_s",
    "retries",
    "end_s",
)


def _dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"


def write_requests_jsonl(path: Path, records: Sequence[RequestRecord]) -> Path:
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_dict(), allow_nan=False) + "\n")
    return path


def load_records(path: Path) -> list[RequestRecord]:
    with Path(path).open(encoding="utf-8") as f:
        return [RequestRecord.from_dict(json.loads(line)) for line in f if line.strip()]


def write_requests_csv(path: Path, records: Sequence[RequestRecord]) -> Path:
    """Flat per-request table (route joined by '>'; no token times or spans)."""
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=_CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in records:
            d = r.to_dict()
            d["route"] = ">".join(r.route)
            w.writerow({k: ("" if d[k] is None else d[k]) for k in _CSV_FIELDS})
    return path


def write_summary_json(
    path: Path, summary: Summary | Mapping[str, Any], extra: Mapping[str, Any] | None = None
) -> Path:
    """``extra`` (config, versions, workload stats...) is merged at the top level."""
    d = summary.to_dict() if isinstance(summary, Summary) else dict(summary)
    if extra:
        d.update(extra)
    path = Path(path)
    path.write_text(_dump(d), encoding="utf-8")
    return path


def load_summary(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_chrome_trace(
    path: Path,
    records: Sequence[RequestRecord],
    run_name: str = "run",
    markers: Sequence[tuple[float, str]] = (),
) -> Path:
    path = Path(path)
    trace = chrome_trace(records, run_name=run_name, markers=markers)
    path.write_text(json.dumps(trace, allow_nan=False), encoding="utf-8")
    return path


# --- plots ---------------------------------------------------------------------------------


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return path


def _cdf(ax: Any, values: list[float], label: str) -> None:
    if not values:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        return
    x = np.sort(np.asarray(values))
    y = np.arange(1, len(x) + 1) / len(x)
    ax.step(np.concatenate(([x[0]], x)), np.concatenate(([0.0], y)), where="post", label=label)
    ax.set_ylim(0, 1.02)


def plot_latency_cdf(path: Path, runs: Sequence[tuple[str, Sequence[RequestRecord]]]) -> Path:
    """CDFs of TTFT, TPOT and E2E (ms), one line per run."""
    fig = Figure(figsize=(13, 4), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, (attr, title) in zip(
        axes, (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("e2e_s", "E2E")), strict=True
    ):
        for label, records in runs:
            vals = [
                getattr(r, attr) * 1e3
                for r in records
                if r.status == "completed" and getattr(r, attr) is not None
            ]
            _cdf(ax, vals, label)
        ax.set_title(title)
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
        if len(runs) > 1:
            ax.legend(fontsize="small")
    return _save(fig, Path(path))


def plot_latency_over_time(
    path: Path, records: Sequence[RequestRecord], markers: Sequence[tuple[float, str]] = ()
) -> Path:
    """E2E and TTFT of each request against its arrival time; failures marked on the axis;
    ``markers`` (run time, label), e.g. timeline events, as labelled vertical lines."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax = fig.subplots()
    done = [r for r in records if r.status == "completed" and r.e2e_s is not None]
    if done:
        ax.scatter([r.arrival_s for r in done], [r.e2e_s * 1e3 for r in done], s=6, label="E2E")  # type: ignore[operator]
        ax.scatter([r.arrival_s for r in done], [r.ttft_s * 1e3 for r in done], s=6, label="TTFT")  # type: ignore[operator]
    failed = [r for r in records if r.status != "completed"]
    if failed:
        ax.scatter(
            [r.arrival_s for r in failed],
            [0.0] * len(failed),
            marker="x",
            color="red",
            label="failed",
        )
    merged: dict[float, list[str]] = {}  # markers at the same time share one line and label
    for at_s, label in markers:
        merged.setdefault(at_s, []).append(label)
    for at_s, labels in merged.items():
        label = " / ".join(labels)
        ax.axvline(at_s, color="grey", linestyle="--", linewidth=0.8)
        ax.annotate(
            label, (at_s, 1.0), xycoords=("data", "axes fraction"), rotation=90,
            fontsize="x-small", va="top", ha="right", xytext=(-2, -2),
            textcoords="offset points",
        )  # fmt: skip
    ax.set_xlabel("arrival (s from start)")
    ax.set_ylabel("latency (ms)")
    ax.grid(alpha=0.3)
    if done or failed:
        ax.legend(fontsize="small")
    return _save(fig, Path(path))


def plot_batch_sizes(path: Path, records: Sequence[RequestRecord]) -> Path:
    """Batch size of every step over time, one line per node (continuous batching)."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax = fig.subplots()
    series = batch_series(records)
    for node, points in series.items():
        ax.step([t for t, _ in points], [b for _, b in points], where="post", label=node)
    if not series:
        ax.text(0.5, 0.5, "no batch data", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("time (s from start)")
    ax.set_ylabel("requests in the step")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize="small")
    return _save(fig, Path(path))


def plot_utilisation(path: Path, runs: Sequence[tuple[str, Mapping[str, Any]]]) -> Path:
    """Per-node utilisation (busy / wall), grouped bars, one colour per run."""
    nodes = list(dict.fromkeys(n for _, s in runs for n in (s.get("node_utilisation") or {})))
    fig = Figure(
        figsize=(max(6.0, 0.8 * len(nodes) * max(1, len(runs)) + 2), 4), layout="constrained"
    )
    ax = fig.subplots()
    width = 0.8 / max(1, len(runs))
    x = np.arange(len(nodes))
    for i, (label, s) in enumerate(runs):
        util = s.get("node_utilisation") or {}
        ax.bar(x + i * width, [100 * util.get(n, 0.0) for n in nodes], width, label=label)
    ax.set_xticks(x + width * (len(runs) - 1) / 2, nodes, rotation=30, ha="right")
    ax.set_ylabel("utilisation (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3, axis="y")
    if len(runs) > 1:
        ax.legend(fontsize="small")
    if not nodes:
        ax.text(
            0.5, 0.5, "no node activity recorded", ha="center", va="center", transform=ax.transAxes
        )
    return _save(fig, Path(path))


def plot_comparison(path: Path, runs: Sequence[tuple[str, Mapping[str, Any]]]) -> Path:
    """Mean and p99 of TTFT and E2E per run (ms), grouped bars."""
    keys = (("ttft_s", "mean"), ("ttft_s", "p99"), ("e2e_s", "mean"), ("e2e_s", "p99"))
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(1, len(runs))
    x = np.arange(len(keys))
    for i, (label, s) in enumerate(runs):
        vals = [1e3 * ((s.get(k) or {}).get(q) or 0.0) for k, q in keys]
        ax.bar(x + i * width, vals, width, label=label)
    ax.set_xticks(
        x + width * (len(runs) - 1) / 2, [f"{k.removesuffix('_s').upper()} {q}" for k, q in keys]
    )
    ax.set_ylabel("ms")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small")
    return _save(fig, Path(path))


# --- whole folders ---------------------------------------------------------------------------


def write_run_report(
    out_dir: Path,
    records: Sequence[RequestRecord],
    summary: Summary,
    *,
    extra: Mapping[str, Any] | None = None,
    run_name: str = "run",
    plots: bool = True,
    markers: Sequence[tuple[float, str]] = (),
) -> dict[str, Path]:
    """Everything for one run under ``out_dir``; returns name -> path. ``markers`` (run time,
    label): timeline events, shown on latency_over_time.png and in the trace."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "requests": write_requests_jsonl(out / "requests.jsonl", records),
        "requests_csv": write_requests_csv(out / "requests.csv", records),
        "summary": write_summary_json(out / "summary.json", summary, extra),
        "trace": write_chrome_trace(out / "trace.json", records, run_name, markers),
    }
    if plots:
        sd = summary.to_dict()
        files["latency_cdf"] = plot_latency_cdf(out / "latency_cdf.png", [(run_name, records)])
        files["latency_over_time"] = plot_latency_over_time(
            out / "latency_over_time.png", records, markers
        )
        files["utilisation"] = plot_utilisation(out / "utilisation.png", [(run_name, sd)])
        if batch_series(records):
            files["batch_sizes"] = plot_batch_sizes(out / "batch_sizes.png", records)
    return files


def write_comparison(
    out_dir: Path,
    runs: Sequence[tuple[str, Mapping[str, Any]]],
    *,
    records: Sequence[Sequence[RequestRecord]] | None = None,
    metrics: Sequence[MetricSpec] = DEFAULT_METRICS,
    plots: bool = True,
) -> dict[str, Path]:
    """comparison.md / comparison.csv (ratios to the first run) and plots for several runs
    (``runs`` = (label, summary dict)); ``records`` adds an overlaid latency CDF."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels = [label for label, _ in runs]
    rows = compare_rows(runs, metrics)
    md = out / "comparison.md"
    md.write_text(markdown_table(labels, rows), encoding="utf-8")
    cs = out / "comparison.csv"
    cs.write_text(csv_table(labels, rows), encoding="utf-8")
    files = {"markdown": md, "csv": cs}
    if plots:
        files["comparison"] = plot_comparison(out / "comparison.png", runs)
        files["utilisation"] = plot_utilisation(out / "comparison_utilisation.png", runs)
        if records is not None:
            files["latency_cdf"] = plot_latency_cdf(
                out / "comparison_latency_cdf.png", list(zip(labels, records, strict=True))
            )
    return files
