"""A stage server's counters and their Prometheus text (``GET /metrics``).

Written on the event loop thread only (the server counts after each step's worker returns).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from testbed.stage.errors import ErrorCode

BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_REJECT_REASONS = {ErrorCode.BUSY: "queue_full", ErrorCode.CACHE_FULL: "cache_full"}


class Histogram:
    """Cumulative step-time buckets (Prometheus histogram)."""

    def __init__(self) -> None:
        self.counts = [0] * len(BUCKETS_S)
        self.total = 0
        self.sum_s = 0.0

    def observe(self, seconds: float) -> None:
        self.total += 1
        self.sum_s += seconds
        for i, edge in enumerate(BUCKETS_S):
            if seconds <= edge:
                self.counts[i] += 1


@dataclass(frozen=True)
class Gauges:
    """The server's current state, read when /metrics is asked."""

    waiting: int  # steps waiting for a worker
    running: int  # steps being computed
    requests: int  # request caches held
    kv_bytes: int
    param_bytes: int


@dataclass
class StageMetrics:
    busy_s: float = 0.0
    tokens: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    steps: dict[str, Histogram] = field(default_factory=lambda: defaultdict(Histogram))
    rejected: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    errors: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    evicted: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    batches: int = 0  # batched iterations run
    batch_rows: int = 0  # steps over all iterations (mean batch = batch_rows / batches)

    def count_batch(self, rows: int, compute_s: float) -> None:
        """One iteration of the step queue: its wall time is the stage's busy time."""
        self.busy_s += compute_s
        self.batches += 1
        self.batch_rows += rows

    def count_step(self, kind: str, tokens: int, compute_s: float, bytes_out: int) -> None:
        self.tokens[kind] += tokens
        self.steps[kind].observe(compute_s)
        self.bytes_out += bytes_out

    def count_refusal(self, status: int, code: ErrorCode | None) -> None:
        """A refused step: capacity refusals by reason, shutting down not at all, the rest
        (errors in the request or the model) by status."""
        if code in _REJECT_REASONS:
            self.rejected[_REJECT_REASONS[code]] += 1
        elif code != ErrorCode.SHUTTING_DOWN:
            self.errors[status] += 1

    def render(self, label: str, g: Gauges) -> str:
        """Prometheus text exposition, every series labelled ``stage="<label>"``."""
        lbl = f'stage="{label}"'
        lines = [
            "# HELP testbed_stage_queue_length Steps waiting for a worker.",
            "# TYPE testbed_stage_queue_length gauge",
            f"testbed_stage_queue_length{{{lbl}}} {g.waiting}",
            "# HELP testbed_stage_inflight Steps being computed.",
            "# TYPE testbed_stage_inflight gauge",
            f"testbed_stage_inflight{{{lbl}}} {g.running}",
            "# HELP testbed_stage_requests Request KV caches held.",
            "# TYPE testbed_stage_requests gauge",
            f"testbed_stage_requests{{{lbl}}} {g.requests}",
            "# HELP testbed_stage_kv_bytes Bytes held by KV caches.",
            "# TYPE testbed_stage_kv_bytes gauge",
            f"testbed_stage_kv_bytes{{{lbl}}} {g.kv_bytes}",
            "# HELP testbed_stage_param_bytes Bytes of weights held.",
            "# TYPE testbed_stage_param_bytes gauge",
            f"testbed_stage_param_bytes{{{lbl}}} {g.param_bytes}",
            "# HELP testbed_stage_busy_seconds_total Seconds spent computing steps.",
            "# TYPE testbed_stage_busy_seconds_total counter",
            f"testbed_stage_busy_seconds_total{{{lbl}}} {self.busy_s:.9f}",
            "# HELP testbed_stage_batches_total Batched iterations run.",
            "# TYPE testbed_stage_batches_total counter",
            f"testbed_stage_batches_total{{{lbl}}} {self.batches}",
            "# HELP testbed_stage_batch_rows_total Steps run over all batched iterations.",
            "# TYPE testbed_stage_batch_rows_total counter",
            f"testbed_stage_batch_rows_total{{{lbl}}} {self.batch_rows}",
            "# HELP testbed_stage_tokens_total Tokens processed, by step kind.",
            "# TYPE testbed_stage_tokens_total counter",
        ]
        for kind in ("prefill", "decode"):
            lines.append(f'testbed_stage_tokens_total{{{lbl},kind="{kind}"}} {self.tokens[kind]}')
        lines += [
            "# HELP testbed_stage_step_seconds Compute time per step, by kind.",
            "# TYPE testbed_stage_step_seconds histogram",
        ]
        for kind in ("prefill", "decode"):
            h = self.steps[kind]
            for edge, count in zip(BUCKETS_S, h.counts, strict=True):
                lines.append(
                    f'testbed_stage_step_seconds_bucket{{{lbl},kind="{kind}",le="{edge}"}} {count}'
                )
            lines.append(
                f'testbed_stage_step_seconds_bucket{{{lbl},kind="{kind}",le="+Inf"}} {h.total}'
            )
            lines.append(f'testbed_stage_step_seconds_sum{{{lbl},kind="{kind}"}} {h.sum_s:.9f}')
            lines.append(f'testbed_stage_step_seconds_count{{{lbl},kind="{kind}"}} {h.total}')
        lines += [
            "# HELP testbed_stage_rejected_total Steps refused for capacity, by reason.",
            "# TYPE testbed_stage_rejected_total counter",
        ]
        for reason in ("queue_full", "cache_full"):
            lines.append(
                f'testbed_stage_rejected_total{{{lbl},reason="{reason}"}} {self.rejected[reason]}'
            )
        lines += [
            "# HELP testbed_stage_errors_total Requests answered with an error, by status.",
            "# TYPE testbed_stage_errors_total counter",
        ]
        for status in sorted(self.errors):
            lines.append(
                f'testbed_stage_errors_total{{{lbl},status="{status}"}} {self.errors[status]}'
            )
        lines += [
            "# HELP testbed_stage_evicted_total Idle request caches dropped after the TTL.",
            "# TYPE testbed_stage_evicted_total counter",
            f"testbed_stage_evicted_total{{{lbl}}} {self.evicted}",
            "# HELP testbed_stage_bytes_total Wire bytes received and sent.",
            "# TYPE testbed_stage_bytes_total counter",
            f'testbed_stage_bytes_total{{{lbl},direction="in"}} {self.bytes_in}',
            f'testbed_stage_bytes_total{{{lbl},direction="out"}} {self.bytes_out}',
        ]
        return "\n".join(lines) + "\n"
