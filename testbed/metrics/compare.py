"""Side-by-side comparison of runs (pure): rows of metrics, ratios to the first run,
rendered as a rich table, Markdown or CSV. Works on summary dicts (``Summary.to_dict()`` or
a loaded ``summary.json``), so finished runs can be compared from their folders."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from rich.table import Table

from testbed.units import fmt_seconds

Better = Literal["lower", "higher", ""]


@dataclass(frozen=True, slots=True)
class MetricSpec:
    key: str  # dotted path into the summary dict, e.g. "e2e_s.p99"
    label: str
    better: Better = "lower"
    unit: Literal["s", "rps", "tps", "frac", "count", "num"] = "s"


DEFAULT_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("e2e_s.mean", "E2E mean"),
    MetricSpec("e2e_s.p50", "E2E p50"),
    MetricSpec("e2e_s.p99", "E2E p99"),
    MetricSpec("ttft_s.mean", "TTFT mean"),
    MetricSpec("ttft_s.p99", "TTFT p99"),
    MetricSpec("tpot_s.mean", "TPOT mean"),
    MetricSpec("itl_s.p99", "ITL p99"),
    MetricSpec("request_throughput_rps", "throughput (req/s)", "higher", "rps"),
    MetricSpec("output_throughput_tps", "output tokens/s", "higher", "tps"),
    MetricSpec("goodput_rps", "goodput (req/s)", "higher", "rps"),
    MetricSpec("completed", "completed", "higher", "count"),
    MetricSpec("failed", "failed", "lower", "count"),
    MetricSpec("injection_lag_s.p99", "injection lag p99", "lower"),
)


@dataclass(frozen=True, slots=True)
class CompareRow:
    metric: MetricSpec
    values: tuple[float | None, ...]  # one per run
    ratios: tuple[float | None, ...]  # value / first run's value


def lookup(summary: Mapping[str, Any], key: str) -> float | None:
    cur: Any = summary
    for part in key.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return float(cur) if isinstance(cur, int | float) and not isinstance(cur, bool) else None


def class_metrics(runs: Sequence[tuple[str, Mapping[str, Any]]]) -> list[MetricSpec]:
    """Rows for what the runs report per request class and per node's batch size."""
    classes = sorted({c for _, s in runs for c in (s.get("classes") or {})})
    nodes = sorted({n for _, s in runs for n in (s.get("node_batch_mean") or {})})
    specs = []
    for c in classes:
        specs += [
            MetricSpec(f"classes.{c}.slo_attainment", f"{c}: SLO attainment", "higher", "frac"),
            MetricSpec(f"classes.{c}.ttft_attainment", f"{c}: TTFT attainment", "higher", "frac"),
            MetricSpec(f"classes.{c}.goodput_rps", f"{c}: goodput (req/s)", "higher", "rps"),
        ]
    for n in nodes:
        specs.append(MetricSpec(f"node_batch_mean.{n}", f"{n}: mean batch", "higher", "num"))
    return specs


def compare_rows(
    runs: Sequence[tuple[str, Mapping[str, Any]]], metrics: Sequence[MetricSpec] = DEFAULT_METRICS
) -> list[CompareRow]:
    """One row per metric that at least one run has (with the default metrics, also the
    per-class and per-node batch rows the runs report)."""
    if metrics is DEFAULT_METRICS:
        metrics = [*DEFAULT_METRICS, *class_metrics(runs)]
    rows = []
    for m in metrics:
        values = tuple(lookup(s, m.key) for _, s in runs)
        if all(v is None for v in values):
            continue
        first = values[0]
        ratios = tuple(None if v is None or not first else v / first for v in values)
        rows.append(CompareRow(m, values, ratios))
    return rows


def fmt_value(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "s":
        return fmt_seconds(v)
    if unit == "count":
        return f"{v:.0f}"
    if unit == "frac":
        return f"{v * 100:.1f}%"
    return f"{v:.3g}"


def _ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def rich_table(
    labels: Sequence[str], rows: Sequence[CompareRow], title: str = "comparison"
) -> Table:
    t = Table(title=title)
    t.add_column("metric")
    for i, lab in enumerate(labels):
        t.add_column(lab, justify="right")
        if i:
            t.add_column(f"{lab} / {labels[0]}", justify="right")
    for row in rows:
        cells = [row.metric.label]
        for i, (v, r) in enumerate(zip(row.values, row.ratios, strict=True)):
            cells.append(fmt_value(v, row.metric.unit))
            if i:
                good = (
                    r is not None
                    and row.metric.better
                    and ((r < 1) == (row.metric.better == "lower"))
                    and r != 1
                )
                cells.append(f"[green]{_ratio(r)}[/]" if good else _ratio(r))
        t.add_row(*cells)
    return t


def markdown_table(labels: Sequence[str], rows: Sequence[CompareRow]) -> str:
    head = ["metric"]
    for i, lab in enumerate(labels):
        head.append(lab)
        if i:
            head.append(f"{lab} / {labels[0]}")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for row in rows:
        cells = [row.metric.label]
        for i, (v, r) in enumerate(zip(row.values, row.ratios, strict=True)):
            cells.append(fmt_value(v, row.metric.unit))
            if i:
                cells.append(_ratio(r))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_table(labels: Sequence[str], rows: Sequence[CompareRow]) -> str:
    """Raw numbers (seconds, req/s): one row per metric; value and ratio columns per run."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    head = ["metric", "key", "better"]
    for lab in labels:
        head += [lab, f"{lab}_ratio"]
    w.writerow(head)
    for row in rows:
        line: list[Any] = [row.metric.label, row.metric.key, row.metric.better]
        for v, r in zip(row.values, row.ratios, strict=True):
            line += ["" if v is None else repr(v), "" if r is None else repr(r)]
        w.writerow(line)
    return buf.getvalue()


def summary_table(summary: Mapping[str, Any], title: str = "summary") -> Table:
    """One run's summary as a rich table (latencies with mean/p50/p90/p99)."""
    t = Table(title=title)
    t.add_column("metric")
    for c in ("mean", "p50", "p90", "p99"):
        t.add_column(c, justify="right")
    for key, label in (
        ("ttft_s", "TTFT"),
        ("tpot_s", "TPOT"),
        ("itl_s", "ITL"),
        ("e2e_s", "E2E"),
        ("queueing_s", "queueing"),
        ("injection_lag_s", "injection lag"),
    ):
        d = summary.get(key) or {}
        t.add_row(label, *(fmt_value(d.get(c), "s") for c in ("mean", "p50", "p90", "p99")))
    t.add_section()
    t.add_row(
        "requests",
        f"{summary.get('completed', 0)} completed",
        f"{summary.get('failed', 0)} failed",
        "",
        "",
    )
    t.add_row(
        "throughput",
        f"{summary.get('request_throughput_rps', 0):.3g} req/s",
        f"{summary.get('output_throughput_tps', 0):.3g} tok/s",
        "",
        "",
    )
    if summary.get("goodput_rps") is not None:
        t.add_row(
            "goodput",
            f"{summary['goodput_rps']:.3g} req/s",
            fmt_value(summary.get("slo_attainment"), "frac") + " in SLO",
            "",
            "",
        )
    for node, u in (summary.get("node_utilisation") or {}).items():
        t.add_row(f"util {node}", f"{u * 100:.1f}%", "", "", "")
    return t
