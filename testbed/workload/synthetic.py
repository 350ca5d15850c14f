"""Synthetic arrivals: gamma inter-arrival times with rate R and burstiness k.

Shape k, scale 1 / (R k): mean gap 1/R whatever k; coefficient of variation 1/sqrt(k), so
k = 1 is Poisson, k < 1 burstier, k > 1 smoother (vLLM's serving benchmark convention).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from testbed.errors import WorkloadError
from testbed.workload.knobs import MAX_REQUESTS
from testbed.workload.request import TraceRow

_CHUNK = 4096


def gamma_gaps(rng: np.random.Generator, rate_rps: float, burstiness: float, n: int) -> np.ndarray:
    """``n`` inter-arrival times in seconds."""
    if not (math.isfinite(rate_rps) and rate_rps > 0):
        raise WorkloadError(f"rate_rps={rate_rps!r} must be a finite number > 0")
    if not (math.isfinite(burstiness) and burstiness > 0):
        raise WorkloadError(f"burstiness={burstiness!r} must be > 0 (1 = Poisson)")
    return rng.gamma(shape=burstiness, scale=1.0 / (rate_rps * burstiness), size=n)


def gamma_arrivals(
    rng: np.random.Generator,
    rate_rps: float,
    burstiness: float = 1.0,
    *,
    num_requests: int | None = None,
    duration_s: float | None = None,
) -> np.ndarray:
    """Arrival times (seconds, increasing; the first is at 0) of ``num_requests`` requests,
    or of every request arriving before ``duration_s``, whichever bound comes first."""
    if num_requests is None and duration_s is None:
        raise WorkloadError("a synthetic workload needs num_requests or duration_s (or both)")
    if num_requests is not None and num_requests > MAX_REQUESTS:
        raise WorkloadError(f"num_requests={num_requests} is above the limit of {MAX_REQUESTS:,}")
    if num_requests is not None and duration_s is None:
        gaps = gamma_gaps(rng, rate_rps, burstiness, max(num_requests - 1, 0))
        return np.concatenate(([0.0], np.cumsum(gaps)))[:num_requests]
    assert duration_s is not None
    times = [np.zeros(1)]
    last = 0.0
    count = 1
    while last < duration_s and (num_requests is None or count < num_requests):
        if count > MAX_REQUESTS:
            raise WorkloadError(
                f"more than {MAX_REQUESTS:,} arrivals before duration_s={duration_s:g}s at "
                f"rate_rps={rate_rps:g}; set num_requests or shorten duration_s"
            )
        t = last + np.cumsum(gamma_gaps(rng, rate_rps, burstiness, _CHUNK))
        times.append(t)
        last = float(t[-1])
        count += _CHUNK
    out = np.concatenate(times)
    out = out[out < duration_s]
    return out[:num_requests] if num_requests is not None else out


def synthetic_rows(
    arrival_s: np.ndarray, prompt_tokens: np.ndarray, output_tokens: np.ndarray
) -> Iterator[TraceRow]:
    """Zip arrays into rows (``source_row`` = draw index)."""
    if not len(arrival_s) == len(prompt_tokens) == len(output_tokens):
        raise WorkloadError("arrival, prompt and output arrays differ in length")
    for i, (t, p, o) in enumerate(
        zip(arrival_s.tolist(), prompt_tokens.tolist(), output_tokens.tolist(), strict=True)
    ):
        yield TraceRow(source_row=i, t_s=t, prompt_tokens=int(p), output_tokens=int(o))
