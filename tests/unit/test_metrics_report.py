"""Results files: records round-trip, summary JSON, PNG plots, Perfetto trace, comparison."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from testbed.metrics import (
    RequestRecord,
    Span,
    compare_rows,
    markdown_table,
    rich_table,
    summarize,
    summary_table,
)
from testbed.metrics.chrome_trace import chrome_trace
from testbed.metrics.report import load_records, load_summary, write_comparison, write_run_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_records(scale: float = 1.0) -> list[RequestRecord]:
    out = []
    for i in range(6):
        a = i * 0.5
        toks = tuple(a + scale * (0.2 + 0.05 * k) for k in range(4))
        spans = (
            Span("compute", "edge-0", a + 0.01, a + 0.05, i, stage=0, phase="prefill"),
            Span(
                "transfer",
                "edge-0",
                a + 0.05,
                a + 0.07,
                i,
                stage=0,
                phase="prefill",
                peer="cloud-0",
                nbytes=8192,
            ),
            Span("compute", "cloud-0", a + 0.07, a + 0.15, i, stage=1, phase="prefill"),
            Span("compute", "cloud-0", a + 0.2, a + 0.22, i, stage=1, phase="decode", step=1),
        )
        out.append(
            RequestRecord(
                request_id=i,
                arrival_s=a,
                status="completed",
                prompt_tokens=16,
                output_tokens=4,
                route=("edge-0", "cloud-0"),
                token_times_s=toks,
                injection_lag_s=0.0005,
                queueing_s=0.01,
                stage_compute_s={"edge-0": 0.04, "cloud-0": 0.1},
                hop_transfer_s={"edge-0->cloud-0": 0.02},
                spans=spans,
            )
        )
    out.append(
        RequestRecord(
            6,
            3.0,
            "failed",
            16,
            4,
            route=("edge-0", "cloud-1"),
            reason="stage down: cloud-1",
            end_s=3.2,
        )
    )
    return out


def test_run_report_files(tmp_path: Path) -> None:
    recs = make_records()
    summary = summarize(recs, nodes=["edge-0", "cloud-0", "cloud-1"])
    files = write_run_report(
        tmp_path / "run", recs, summary, extra={"config": {"seed": 1}}, run_name="bsdp+arts"
    )
    for key in ("latency_cdf", "latency_over_time", "utilisation"):
        data = files[key].read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, key
    assert load_records(files["requests"]) == recs  # lossless round trip
    s = load_summary(files["summary"])
    assert s["completed"] == 6 and s["failed_by_reason"] == {"stage down: cloud-1": 1}
    assert s["config"] == {"seed": 1} and s["e2e_s"]["mean"] == pytest.approx(0.35)
    rows = list(csv.DictReader(io.StringIO(files["requests_csv"].read_text())))
    assert (
        len(rows) == 7
        and rows[0]["route"] == "edge-0>cloud-0"
        and rows[6]["reason"] == "stage down: cloud-1"
    )
    trace = json.loads(files["trace"].read_text())
    events = trace["traceEvents"]
    names = {e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert names == {"edge-0", "cloud-0"}
    xs = [e for e in events if e["ph"] == "X"]
    assert len(xs) == 24 and {e["cat"] for e in xs} == {"compute", "transfer"}
    assert all(e["dur"] >= 0 and isinstance(e["ts"], float) for e in xs)


def test_chrome_trace_threads() -> None:
    t = chrome_trace(make_records()[:1])
    threads = {
        (e["pid"], e["args"]["name"]) for e in t["traceEvents"] if e["name"] == "thread_name"
    }
    pids = {e["args"]["name"]: e["pid"] for e in t["traceEvents"] if e["name"] == "process_name"}
    assert (pids["edge-0"], "stage 0") in threads and (pids["cloud-0"], "stage 1") in threads
    assert (pids["edge-0"], "send -> cloud-0") in threads
    x = next(e for e in t["traceEvents"] if e.get("cat") == "transfer")
    assert (
        x["args"]["bytes"] == 8192
        and x["ts"] == pytest.approx(0.05e6)
        and x["dur"] == pytest.approx(0.02e6)
    )
    decode = next(e for e in t["traceEvents"] if e["ph"] == "X" and e["name"].startswith("decode"))
    assert decode["name"] == "decode r0#1"


def test_comparison(tmp_path: Path) -> None:
    fast, slow = make_records(1.0), make_records(2.0)
    runs = [
        ("bsdp+arts", summarize(fast).to_dict()),
        ("even+round_robin", summarize(slow).to_dict()),
    ]
    rows = compare_rows(runs)
    e2e = next(r for r in rows if r.metric.key == "e2e_s.mean")
    assert e2e.ratios[0] == 1.0 and e2e.ratios[1] == pytest.approx((2 * 0.35) / 0.35)
    assert not any(r.metric.key == "goodput_rps" for r in rows)  # no SLO in either run
    md = markdown_table([lab for lab, _ in runs], rows)
    assert (
        md.splitlines()[0]
        == "| metric | bsdp+arts | even+round_robin | even+round_robin / bsdp+arts |"
    )
    assert "2.00x" in md
    files = write_comparison(tmp_path, runs, records=[fast, slow])
    parsed = list(csv.reader(io.StringIO(files["csv"].read_text())))
    assert parsed[0] == [
        "metric",
        "key",
        "better",
        "bsdp+arts",
        "bsdp+arts_ratio",
        "even+round_robin",
        "even+round_robin_ratio",
    ]
    e2e_row = next(p for p in parsed if p[1] == "e2e_s.mean")
    assert float(e2e_row[6]) == pytest.approx(2.0)
    for key in ("comparison", "utilisation", "latency_cdf"):
        assert files[key].read_bytes().startswith(PNG_MAGIC)
    console = Console(record=True, width=200)
    console.print(rich_table(["a", "b"], rows))
    console.print(summary_table(runs[0][1]))
    text = console.export_text()
    assert "E2E mean" in text and "2.00x" in text and "TTFT" in text


def _killed_run(tmp_path: Path, planned: int) -> Path:
    """A results folder as a replay killed after 7 of ``planned`` requests leaves it."""
    run_dir = tmp_path / "killed"
    run_dir.mkdir()
    info = {"label": "bsdp+arts", "nodes": ["edge-0", "cloud-0"], "requests_planned": planned}
    (run_dir / "run.json").write_text(json.dumps(info))
    lines = [json.dumps(r.to_dict()) for r in make_records()]
    (run_dir / "requests.jsonl").write_text("\n".join(lines) + "\n" + lines[0][:20])
    return run_dir


def test_report_of_a_killed_run_says_how_many_requests_have_no_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from testbed.cli.main import main

    run_dir = _killed_run(tmp_path, planned=40)
    main(["report", str(run_dir), "--no-plots"])
    text = " ".join(capsys.readouterr().out.split())
    assert "33 of 40 planned requests have no record" in text
    assert "skipped 1 unreadable line" in text
    rebuilt = json.loads((run_dir / "summary.json").read_text())["rebuilt_from"]
    assert rebuilt == {
        "file": "requests.jsonl",
        "records": 7,
        "skipped_lines": 1,
        "requests_planned": 40,
        "not_recorded": 33,
    }


def test_report_of_a_finished_run_has_nothing_missing(tmp_path: Path) -> None:
    from testbed.experiment.report import rebuild

    res = rebuild(_killed_run(tmp_path, planned=7), plots=False)
    assert res.records == 7 and res.planned == 7 and res.not_recorded == 0
