"""Pure data: a trace row as read, a request as replayed, and what was dropped or clipped."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple


class TraceRow(NamedTuple):
    """One row as a reader yields it, before any knob is applied (a NamedTuple: millions
    of these are made while reading a large trace, and tuples are cheap)."""

    source_row: int  # 1-based line number in the file (the header is line 1 for CSV)
    t_s: float  # seconds on the trace's own clock (any origin; only differences matter)
    prompt_tokens: int
    output_tokens: int
    prefix_hash_ids: tuple[int, ...] = ()  # Mooncake 512-token prefix block ids


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request to replay.

    ``arrival_s`` is relative to the first replayed request (so the first arrives at 0) after
    the window and the time/rate scaling; the broker sends it at ``start + arrival_s``.
    """

    request_id: int  # 0..n-1 in arrival order
    arrival_s: float
    prompt_tokens: int  # >= 1, after clipping
    output_tokens: int  # >= 1, after clipping; generation is forced to this length
    source_row: int  # line in the trace file (synthetic: the draw index)
    prefix_hash_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class WorkloadStats:
    """What the knobs and the reader did to the trace, for the results folder."""

    rows_read: int = 0  # data rows parsed (stops early once the window/limit is passed)
    failed_skipped: int = 0  # rows the format marks as failed (BurstGPT: Response tokens == 0)
    filtered_out: int = 0  # rows excluded by a filter (BurstGPT model / log type)
    before_window: int = 0  # rows before the window's start
    prompt_clipped: int = 0  # prompts cut to max_prompt_tokens
    output_clipped: int = 0  # outputs cut to max_output_tokens
    raised_to_min: int = 0  # prompt or output of 0 tokens raised to 1
    context_clipped: int = 0  # requests cut so prompt + output - 1 fits the model's context
    out_of_order: int = 0  # rows earlier than some row read before them (sorted back, stable)
    stopped_early: bool = False  # reading stopped at the window's end or the request limit
    requests: int = 0
    prompt_tokens_total: int = 0
    output_tokens_total: int = 0
    span_s: float = 0.0  # arrival of the last request (after scaling)
    window_first_s: float = 0.0  # trace time (unscaled, from the file's first row) of request 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Workload:
    """The requests to replay, what happened while reading them, and a description for results."""

    requests: tuple[TraceRequest, ...]
    stats: WorkloadStats
    description: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.requests)
