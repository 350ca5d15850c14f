"""Apply the workload knobs to a stream of trace rows, uniformly for every format.

Order: window on trace time (seconds from the file's first row, unscaled) -> request limit
-> clip token counts (min 1) -> fit the model's context window -> rebase arrivals on the first kept request -> scale
(``time_scale`` multiplies inter-arrival times, ``rate_scale`` divides them).
Reading stops at the first row past the window's end or once the limit is reached, so a
window at the start of a multi-million-row trace is fast; all traces are time-ordered, and a
row earlier than its predecessor is counted (``out_of_order``) and sorted back (stable).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from testbed.errors import WorkloadError
from testbed.workload.request import TraceRequest, TraceRow, WorkloadStats

MOONCAKE_BLOCK_TOKENS = 512  # tokens per Mooncake hash_ids block
MAX_REQUESTS = 1_000_000  # in one workload (memory stays in the hundreds of MB)


@dataclass(frozen=True, slots=True)
class Knobs:
    time_scale: float = 1.0  # multiplies inter-arrival times (2.0 = half the rate)
    rate_scale: float = 1.0  # divides inter-arrival times (2.0 = twice the rate)
    start_s: float = 0.0  # window start, trace seconds from the file's first row
    duration_s: float | None = None  # window length in trace seconds; None = to the end
    max_prompt_tokens: int | None = None
    max_output_tokens: int | None = None
    max_requests: int | None = None
    context_tokens: int | None = None  # clip so that prompt + output - 1 fits (the model's window)

    def __post_init__(self) -> None:
        for name in ("time_scale", "rate_scale"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise WorkloadError(f"{name}={v!r} must be a finite number > 0")
        if not math.isfinite(self.start_s) or self.start_s < 0:
            raise WorkloadError(f"window start_s={self.start_s!r} must be >= 0")
        if self.duration_s is not None and not (
            math.isfinite(self.duration_s) and self.duration_s > 0
        ):
            raise WorkloadError(f"window duration_s={self.duration_s!r} must be > 0")
        for name in ("max_prompt_tokens", "max_output_tokens", "max_requests", "context_tokens"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise WorkloadError(f"{name}={v!r} must be >= 1")

    @property
    def factor(self) -> float:
        """Multiplier from trace seconds to replay seconds."""
        return self.time_scale / self.rate_scale


def apply_knobs(
    rows: Iterable[TraceRow], knobs: Knobs, counts: Counter[str] | None = None
) -> tuple[tuple[TraceRequest, ...], WorkloadStats]:
    """Select, clip and scale ``rows``. ``counts`` carries a reader's own skips
    (``failed_skipped``, ``filtered_out``); it is read after ``rows`` is exhausted."""
    kept: list[tuple[float, int, TraceRow]] = []  # (trace time, read order, row)
    t_first: float | None = None
    t_prev = -math.inf
    start_s = knobs.start_s
    end_s = knobs.start_s + knobs.duration_s if knobs.duration_s is not None else math.inf
    limit = knobs.max_requests if knobs.max_requests is not None else -1
    if limit > MAX_REQUESTS:
        raise WorkloadError(f"max_requests={limit} is above the limit of {MAX_REQUESTS:,}")
    n_read = n_before = n_disorder = 0
    stopped_early = False
    for row in rows:
        n_read += 1
        ts = row.t_s
        if t_first is None:
            t_first = ts
        if ts < t_prev:
            n_disorder += 1
        else:
            t_prev = ts
        t = ts - t_first
        if t < start_s:
            n_before += 1
            continue
        if t >= end_s:
            stopped_early = True
            break
        if len(kept) == MAX_REQUESTS:
            raise WorkloadError(
                f"the window holds more than {MAX_REQUESTS:,} requests, the limit of one "
                "workload; set max_requests or a shorter window"
            )
        kept.append((t, len(kept), row))
        if len(kept) == limit:
            stopped_early = True
            break
    if n_disorder:
        kept.sort(key=lambda x: (x[0], x[1]))

    requests: list[TraceRequest] = []
    base = kept[0][0] if kept else 0.0
    factor = knobs.factor
    p_cap = knobs.max_prompt_tokens if knobs.max_prompt_tokens is not None else math.inf
    o_cap = knobs.max_output_tokens if knobs.max_output_tokens is not None else math.inf
    ctx = knobs.context_tokens
    p_total = o_total = n_p_cut = n_o_cut = n_min = n_ctx = 0
    for i, (t, _, row) in enumerate(kept):
        p = row.prompt_tokens
        o = row.output_tokens
        hashes = row.prefix_hash_ids
        if p > p_cap:
            p = int(p_cap)
            n_p_cut += 1
            if hashes:
                hashes = hashes[: -(-p // MOONCAKE_BLOCK_TOKENS)]
        elif p < 1:
            p = 1
            n_min += 1
        if o > o_cap:
            o = int(o_cap)
            n_o_cut += 1
        elif o < 1:
            o = 1
            n_min += 1
        if ctx is not None and p + o - 1 > ctx:  # the model cannot hold it: fit it in
            n_ctx += 1
            o = min(o, ctx)
            p = ctx - o + 1
            if hashes:
                hashes = hashes[: -(-p // MOONCAKE_BLOCK_TOKENS)]
        requests.append(TraceRequest(i, (t - base) * factor, p, o, row.source_row, hashes))
        p_total += p
        o_total += o
    extra = counts or Counter()
    stats = WorkloadStats(
        rows_read=n_read,
        failed_skipped=extra["failed_skipped"],
        filtered_out=extra["filtered_out"],
        before_window=n_before,
        prompt_clipped=n_p_cut,
        output_clipped=n_o_cut,
        raised_to_min=n_min,
        context_clipped=n_ctx,
        out_of_order=n_disorder,
        stopped_early=stopped_early,
        requests=len(requests),
        prompt_tokens_total=p_total,
        output_tokens_total=o_total,
        span_s=requests[-1].arrival_s if requests else 0.0,
        window_first_s=base,
    )
    return tuple(requests), stats
