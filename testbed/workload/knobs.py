"""Apply the workload knobs to a stream of trace rows, uniformly for every format.

Order: window on trace time (seconds from the file's first row, unscaled) -> request limit
-> clip token counts (min 1) -> rebase arrivals on the first kept request -> scale
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


@dataclass(frozen=True, slots=True)
class Knobs:
    time_scale: float = 1.0  # multiplies inter-arrival times (2.0 = half the rate)
    rate_scale: float = 1.0  # divides inter-arrival times (2.0 = twice the rate)
    start_s: float = 0.0  # window start, trace seconds from the file's first row
    duration_s: float | None = None  # window length in trace seconds; None = to the end
    max_prompt_tokens: int | None = None
    max_output_tokens: int | None = None
    max_requests: int | None = None

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
        for name in ("max_prompt_tokens", "max_output_tokens", "max_requests"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise WorkloadError(f"{name}={v!r} must be >= 1")

    @property
    def factor(self) -> float:
        """Multiplier from trace seconds to replay seconds."""
        return self.time_scale / self.rate_scale


def _clip(n: int, cap: int | None) -> tuple[int, bool, bool]:
    """-> (value, clipped to cap, raised to 1)."""
    if cap is not None and n > cap:
        return cap, True, False
    if n < 1:
        return 1, False, True
    return n, False, False


def apply_knobs(
    rows: Iterable[TraceRow], knobs: Knobs, counts: Counter[str] | None = None
) -> tuple[tuple[TraceRequest, ...], WorkloadStats]:
    """Select, clip and scale ``rows``. ``counts`` carries a reader's own skips
    (``failed_skipped``, ``filtered_out``); it is read after ``rows`` is exhausted."""
    c: Counter[str] = Counter()
    kept: list[tuple[float, int, TraceRow]] = []  # (trace time, read order, row)
    t_first: float | None = None
    t_prev = -math.inf
    end_s = knobs.start_s + knobs.duration_s if knobs.duration_s is not None else math.inf
    stopped_early = False
    for row in rows:
        c["rows_read"] += 1
        if t_first is None:
            t_first = row.t_s
        t = row.t_s - t_first
        if row.t_s < t_prev:
            c["out_of_order"] += 1
        t_prev = max(t_prev, row.t_s)
        if t < knobs.start_s:
            c["before_window"] += 1
            continue
        if t >= end_s:
            stopped_early = True
            break
        kept.append((t, len(kept), row))
        if knobs.max_requests is not None and len(kept) >= knobs.max_requests:
            stopped_early = True
            break
    if c["out_of_order"]:
        kept.sort(key=lambda x: (x[0], x[1]))

    requests: list[TraceRequest] = []
    base = kept[0][0] if kept else 0.0
    factor = knobs.factor
    p_total = o_total = 0
    for i, (t, _, row) in enumerate(kept):
        p, p_cut, p_min = _clip(row.prompt_tokens, knobs.max_prompt_tokens)
        o, o_cut, o_min = _clip(row.output_tokens, knobs.max_output_tokens)
        c["prompt_clipped"] += p_cut
        c["output_clipped"] += o_cut
        c["raised_to_min"] += p_min + o_min
        hashes = row.prefix_hash_ids
        if p_cut and hashes:
            hashes = hashes[: -(-p // MOONCAKE_BLOCK_TOKENS)]
        requests.append(
            TraceRequest(
                request_id=i,
                arrival_s=(t - base) * factor,
                prompt_tokens=p,
                output_tokens=o,
                source_row=row.source_row,
                prefix_hash_ids=hashes,
            )
        )
        p_total += p
        o_total += o
    extra = counts or Counter()
    stats = WorkloadStats(
        rows_read=c["rows_read"],
        failed_skipped=extra["failed_skipped"],
        filtered_out=extra["filtered_out"],
        before_window=c["before_window"],
        prompt_clipped=c["prompt_clipped"],
        output_clipped=c["output_clipped"],
        raised_to_min=c["raised_to_min"],
        out_of_order=c["out_of_order"],
        stopped_early=stopped_early,
        requests=len(requests),
        prompt_tokens_total=p_total,
        output_tokens_total=o_total,
        span_s=requests[-1].arrival_s if requests else 0.0,
        window_first_s=base,
    )
    return tuple(requests), stats
