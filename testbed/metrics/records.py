"""Per-request records: what the broker saw happen to each request (pure data).

Times are seconds on the run's clock (0 = replay start). ``arrival_s`` is the scheduled
arrival (trace time after scaling); ``token_times_s[i]`` is when output token i reached the
broker. Spans are the stage executions and transfers, for utilisation and the Perfetto trace.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, Literal

Status = Literal["completed", "failed"]
SpanKind = Literal["compute", "transfer", "queue"]


@dataclass(frozen=True, slots=True)
class Span:
    kind: SpanKind
    node: str  # where it ran; a transfer's sender
    start_s: float
    end_s: float
    request_id: int
    stage: int = 0  # position of the stage on the route (0 = first tier)
    phase: str = ""  # "prefill" or "decode"
    step: int = 0  # 0 = prefill, i = i-th decode step
    peer: str | None = None  # a transfer's receiver
    nbytes: int | None = None  # bytes moved by a transfer
    batch: int | None = None  # a compute span's batch size at the stage (continuous batching)

    @property
    def dur_s(self) -> float:
        return self.end_s - self.start_s

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__slots__}
        return {k: v for k, v in d.items() if v is not None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Span:
        return cls(**d)


@dataclass(frozen=True)
class RequestRecord:
    request_id: int
    arrival_s: float  # scheduled arrival on the run clock
    status: Status
    prompt_tokens: int
    output_tokens: int  # tokens asked for (the trace's output length)
    route: tuple[str, ...] = ()  # node per stage, first tier first
    reason: str | None = None  # why it failed (None when completed)
    token_times_s: tuple[float, ...] = ()  # when each output token reached the broker
    end_s: float | None = None  # when it completed or failed (default: last token)
    injection_lag_s: float | None = None  # send time - scheduled time
    queueing_s: float = 0.0  # time spent waiting in stage queues, all steps
    stage_compute_s: Mapping[str, float] = field(default_factory=dict)  # node -> seconds
    hop_transfer_s: Mapping[str, float] = field(default_factory=dict)  # "src->dst" -> seconds
    retries: int = 0
    spans: tuple[Span, ...] = ()
    slo_class: str | None = None  # the request's class (scenario ``classes``)

    # --- vLLM serving-benchmark definitions ---
    @property
    def ttft_s(self) -> float | None:
        """Arrival -> first token."""
        return self.token_times_s[0] - self.arrival_s if self.token_times_s else None

    @property
    def e2e_s(self) -> float | None:
        """Arrival -> last token."""
        return self.token_times_s[-1] - self.arrival_s if self.token_times_s else None

    @property
    def tpot_s(self) -> float | None:
        """(E2E - TTFT) / (tokens - 1); None for fewer than 2 tokens."""
        n = len(self.token_times_s)
        if n < 2:
            return None
        return (self.token_times_s[-1] - self.token_times_s[0]) / (n - 1)

    @property
    def itl_s(self) -> tuple[float, ...]:
        """Gaps between consecutive tokens (tokens - 1 of them)."""
        t = self.token_times_s
        return tuple(b - a for a, b in pairwise(t))

    @property
    def finished_s(self) -> float | None:
        if self.end_s is not None:
            return self.end_s
        return self.token_times_s[-1] if self.token_times_s else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the derived latencies alongside (ignored by :meth:`from_dict`)."""
        return {
            "request_id": self.request_id,
            "arrival_s": self.arrival_s,
            "status": self.status,
            "reason": self.reason,
            "route": list(self.route),
            "prompt_tokens": self.prompt_tokens,
            "output_tokens": self.output_tokens,
            "generated_tokens": len(self.token_times_s),
            "ttft_s": self.ttft_s,
            "tpot_s": self.tpot_s,
            "e2e_s": self.e2e_s,
            "injection_lag_s": self.injection_lag_s,
            "queueing_s": self.queueing_s,
            "stage_compute_s": dict(self.stage_compute_s),
            "hop_transfer_s": dict(self.hop_transfer_s),
            "retries": self.retries,
            "end_s": self.end_s,
            "token_times_s": list(self.token_times_s),
            "spans": [s.to_dict() for s in self.spans],
            "slo_class": self.slo_class,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RequestRecord:
        return cls(
            request_id=int(d["request_id"]),
            arrival_s=float(d["arrival_s"]),
            status=d["status"],
            prompt_tokens=int(d["prompt_tokens"]),
            output_tokens=int(d["output_tokens"]),
            route=tuple(d.get("route", ())),
            reason=d.get("reason"),
            token_times_s=tuple(float(t) for t in d.get("token_times_s", ())),
            end_s=d.get("end_s"),
            injection_lag_s=d.get("injection_lag_s"),
            queueing_s=float(d.get("queueing_s", 0.0)),
            stage_compute_s=dict(d.get("stage_compute_s", {})),
            hop_transfer_s=dict(d.get("hop_transfer_s", {})),
            retries=int(d.get("retries", 0)),
            spans=tuple(Span.from_dict(s) for s in d.get("spans", ())),
            slo_class=d.get("slo_class"),
        )


def totals_from_spans(
    spans: tuple[Span, ...] | list[Span],
) -> tuple[dict[str, float], dict[str, float], float]:
    """-> (compute seconds per node, transfer seconds per 'src->dst' hop, queueing seconds)."""
    compute: dict[str, float] = {}
    hops: dict[str, float] = {}
    queue = 0.0
    for s in spans:
        if s.kind == "compute":
            compute[s.node] = compute.get(s.node, 0.0) + s.dur_s
        elif s.kind == "transfer":
            key = f"{s.node}->{s.peer}"
            hops[key] = hops.get(key, 0.0) + s.dur_s
        else:
            queue += s.dur_s
    return compute, hops, queue
