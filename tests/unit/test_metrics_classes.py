"""Per-class SLO attainment and goodput, batch size over time, and their compare rows."""

from __future__ import annotations

import pytest

from testbed.metrics.chrome_trace import chrome_trace
from testbed.metrics.compare import compare_rows
from testbed.metrics.records import RequestRecord, Span
from testbed.metrics.summary import SLO, batch_series, summarize


def rec(i, cls, ttft, batch=(), status="completed"):
    spans = tuple(Span("compute", "n1", t, t + 0.01, i, batch=b) for t, b in batch)
    return RequestRecord(
        i, 0.0, status, 4, 3, ("n1",), token_times_s=(ttft, ttft + 0.1, ttft + 0.2),
        spans=spans, slo_class=cls,
    )  # fmt: skip


CLASSES = {"chat": SLO(ttft_s=1.0, tpot_s=0.2), "batch": SLO(e2e_s=2.0)}


def test_attainment_and_goodput_per_class():
    records = [
        rec(0, "chat", 0.5, [(0.0, 1), (0.5, 3)]),
        rec(1, "chat", 1.5, [(0.5, 3)]),  # TTFT missed
        rec(2, "batch", 1.9),  # E2E 2.1 > 2: missed
        rec(3, "batch", 0.1),
        rec(4, None, 0.1),
    ]
    s = summarize(records, wall_s=10.0, classes=CLASSES)
    chat, batch = s.classes["chat"], s.classes["batch"]
    assert chat["requests"] == 2 and chat["slo_attainment"] == 0.5
    assert chat["ttft_attainment"] == 0.5 and chat["goodput_rps"] == pytest.approx(0.1)
    assert batch["slo_attainment"] == 0.5 and batch["ttft_attainment"] is None
    assert batch_series(records) == {"n1": [(0.0, 1), (0.5, 3)]}
    assert s.node_batch_mean == {"n1": 2.0}
    runs = [("a", s.to_dict()), ("b", summarize(records[:1], wall_s=5, classes=CLASSES).to_dict())]
    labels = {r.metric.label: r.values for r in compare_rows(runs)}
    assert labels["chat: TTFT attainment"] == (0.5, 1.0)
    assert labels["n1: mean batch"] == (2.0, 2.0)
    assert RequestRecord.from_dict(records[0].to_dict()) == records[0]


def test_perfetto_counter_of_batch_sizes():
    trace = chrome_trace([rec(0, "chat", 0.5, [(0.0, 1), (0.5, 3)]), rec(1, "chat", 1, [(0.5, 3)])])
    counters = [e for e in trace["traceEvents"] if e["ph"] == "C"]
    assert [(e["ts"], e["args"]["batch"]) for e in counters] == [(0.0, 1), (0.5e6, 3)]


def test_batch_plot_is_written(tmp_path):
    from testbed.metrics.report import plot_batch_sizes

    out = plot_batch_sizes(tmp_path / "batch.png", [rec(0, "chat", 0.5, [(0.0, 1), (0.5, 3)])])
    assert out.stat().st_size > 1000
