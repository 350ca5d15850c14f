"""Metric definitions on hand-computed examples (vLLM serving-benchmark conventions)."""

from __future__ import annotations

import pytest

from testbed.metrics import (
    SLO,
    Dist,
    RequestRecord,
    Span,
    merged_busy_s,
    summarize,
    totals_from_spans,
)


def rec(
    rid: int, arrival: float, tokens: list[float], prompt: int = 10, **kw: object
) -> RequestRecord:
    kw.setdefault("status", "completed")
    return RequestRecord(
        request_id=rid,
        arrival_s=arrival,
        prompt_tokens=prompt,
        output_tokens=len(tokens),
        token_times_s=tuple(tokens),
        **kw,  # type: ignore[arg-type]
    )


A = rec(0, 1.0, [1.5, 1.7, 2.0, 2.1], prompt=10, injection_lag_s=0.001, queueing_s=0.05)
B = rec(1, 2.0, [2.4], prompt=20, injection_lag_s=0.003)
C = rec(2, 3.0, [3.2, 3.6], prompt=30, injection_lag_s=0.002, queueing_s=0.15)
D = rec(3, 3.5, [3.9], prompt=40, status="failed", reason="stage down: fog-1", end_s=4.0)
E = rec(4, 3.6, [], prompt=5, status="failed", reason="stage down: fog-1", end_s=3.7)
F = rec(5, 3.6, [], prompt=5, status="failed", reason="timeout", end_s=3.8)


def test_per_request_definitions() -> None:
    assert A.ttft_s == pytest.approx(0.5)
    assert A.e2e_s == pytest.approx(1.1)
    assert A.tpot_s == pytest.approx(0.2)  # (1.1 - 0.5) / (4 - 1)
    assert A.itl_s == pytest.approx((0.2, 0.3, 0.1))
    assert len(A.itl_s) == A.output_tokens - 1
    assert B.tpot_s is None and B.itl_s == () and B.ttft_s == B.e2e_s == pytest.approx(0.4)
    assert E.ttft_s is None and E.e2e_s is None and E.finished_s == 3.7
    assert A.finished_s == 2.1


def test_dist_percentiles_linear() -> None:
    d = Dist.of([0.5, 0.4, 0.2])
    assert d.count == 3 and d.mean == pytest.approx(0.36666666)
    assert (
        d.p50 == pytest.approx(0.4)
        and d.p90 == pytest.approx(0.48)
        and d.p99 == pytest.approx(0.498)
    )
    assert d.max == 0.5
    assert Dist.of([]) == Dist()


def test_summary_hand_computed() -> None:
    s = summarize([A, B, C, D, E, F])
    assert (s.requests, s.completed, s.failed) == (6, 3, 3)
    assert s.failed_by_reason == {"stage down: fog-1": 2, "timeout": 1}
    assert s.wall_s == pytest.approx(3.0)  # first arrival 1.0 -> last finish 4.0
    assert s.request_throughput_rps == pytest.approx(1.0)
    assert s.output_tokens == 7 and s.prompt_tokens == 60
    assert s.output_throughput_tps == pytest.approx(7 / 3)
    assert s.total_token_throughput_tps == pytest.approx(67 / 3)
    assert s.ttft_s.mean == pytest.approx((0.5 + 0.4 + 0.2) / 3)
    assert s.tpot_s.count == 2 and s.tpot_s.mean == pytest.approx(0.3)
    assert s.itl_s.count == 4 and s.itl_s.mean == pytest.approx(0.25)  # pooled gaps
    assert s.e2e_s.mean == pytest.approx(0.7) and s.e2e_s.p50 == pytest.approx(0.6)
    assert s.queueing_s.mean == pytest.approx(0.2 / 3)
    assert s.injection_lag_s.count == 3 and s.injection_lag_s.max == pytest.approx(0.003)
    assert s.goodput_rps is None and s.slo_attainment is None
    assert s.to_dict()["ttft_s"]["p50"] == pytest.approx(0.4)


def test_goodput_against_slos() -> None:
    recs = [A, B, C, D]
    s = summarize(recs, slo=SLO(ttft_s=0.45))  # A misses TTFT
    assert s.goodput_rps == pytest.approx(2 / 3) and s.slo_attainment == pytest.approx(0.5)
    s = summarize(recs, slo=SLO(ttft_s=0.45, tpot_s=0.3))  # C misses TPOT; B has no TPOT
    assert s.goodput_rps == pytest.approx(1 / 3)
    s = summarize(recs, slo=SLO(e2e_s=0.61))  # B (0.4) and C (0.6)
    assert s.goodput_rps == pytest.approx(2 / 3)
    assert s.slo == {"ttft_s": None, "tpot_s": None, "e2e_s": 0.61}
    s = summarize(recs, wall_s=10.0, slo=SLO(e2e_s=10))
    assert s.goodput_rps == pytest.approx(0.3) and s.request_throughput_rps == pytest.approx(0.3)


def test_merged_busy_union() -> None:
    assert merged_busy_s([(0, 1), (0.5, 2), (3, 4), (4, 5), (6, 6)]) == pytest.approx(4.0)
    assert merged_busy_s([]) == 0.0
    assert merged_busy_s([(2, 3), (0, 10)]) == pytest.approx(10.0)


def test_utilisation_from_spans_and_override() -> None:
    spans = (
        Span("compute", "edge", 1.0, 1.2, 0, stage=0, phase="prefill"),
        Span("compute", "edge", 1.1, 1.3, 0, stage=0, phase="decode", step=1),  # batched: overlaps
        Span("transfer", "edge", 1.3, 1.35, 0, stage=0, peer="cloud", nbytes=4096),
        Span("compute", "cloud", 1.35, 1.55, 0, stage=1, phase="prefill"),
        Span("compute", "edge", 2.0, 2.1, 0, stage=0, phase="decode", step=2),
        Span("queue", "cloud", 1.3, 1.35, 0, stage=1),
    )
    r = RequestRecord(
        0, 1.0, "completed", 3, 2, route=("edge", "cloud"), token_times_s=(1.6, 2.5), spans=spans
    )
    s = summarize([r], nodes=["fog"])
    assert s.wall_s == pytest.approx(1.5)
    assert s.node_busy_s == pytest.approx({"cloud": 0.2, "edge": 0.4, "fog": 0.0})
    assert s.node_utilisation == pytest.approx({"cloud": 0.2 / 1.5, "edge": 0.4 / 1.5, "fog": 0.0})
    assert list(s.node_busy_s) == ["fog", "cloud", "edge"]  # given order first, then seen
    assert list(summarize([r], nodes=["edge", "fog", "cloud"]).node_utilisation) == [
        "edge",
        "fog",
        "cloud",
    ]
    s = summarize([r], node_busy_s={"edge": 0.75})
    assert s.node_utilisation == {"edge": 0.5}
    compute, hops, queue = totals_from_spans(spans)
    assert compute == pytest.approx({"edge": 0.5, "cloud": 0.2})
    assert hops == pytest.approx({"edge->cloud": 0.05}) and queue == pytest.approx(0.05)


def test_empty_run() -> None:
    s = summarize([])
    assert (
        s.requests == 0 and s.wall_s == 0 and s.request_throughput_rps == 0 and s.e2e_s.count == 0
    )
