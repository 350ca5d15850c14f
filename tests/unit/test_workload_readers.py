"""Trace readers: the real shipped traces, and malformed rows of every format."""

from __future__ import annotations

import itertools
import os
from collections import Counter
from pathlib import Path

import pytest

from testbed.errors import WorkloadError
from testbed.workload import Knobs, apply_knobs, read_azure, read_burstgpt, read_mooncake

REPO = Path(__file__).resolve().parents[2]
_CANDIDATES = [
    os.environ.get("TESTBED_TRACES_DIR", ""),
    str(REPO.parent / "shared" / "traces"),  # CI and developer checkouts: shared/ beside the repo
]


def _trace(name: str) -> Path:
    for d in _CANDIDATES:
        if d and (Path(d) / name).is_file():
            return Path(d) / name
    if os.environ.get("CI"):
        pytest.fail(
            f"trace {name} not found in {_CANDIDATES}; CI must have shared/traces beside the repo"
        )
    pytest.skip(f"trace {name} not found in {_CANDIDATES} (set TESTBED_TRACES_DIR)")


# --- real traces -------------------------------------------------------------------------------


def test_azure_conv_real_trace_counts_and_order() -> None:
    reqs, stats = apply_knobs(read_azure(_trace("AzureLLMInferenceTrace_conv.csv")), Knobs())
    assert stats.rows_read == len(reqs) == 19366
    assert stats.prompt_tokens_total == 22361870
    assert stats.output_tokens_total == 4088665
    assert reqs[0].arrival_s == 0.0 and reqs[0].source_row == 2
    assert all(a.arrival_s <= b.arrival_s for a, b in itertools.pairwise(reqs))
    assert stats.out_of_order == 0
    # 18:15:46.68059 -> 19:14:08.402527 (the 7th fractional digit is dropped)
    assert reqs[-1].arrival_s == pytest.approx(3501.721937, abs=1e-6)
    assert reqs[1].arrival_s == pytest.approx(50.995169 - 46.680590, abs=1e-6)
    assert (reqs[0].prompt_tokens, reqs[0].output_tokens) == (374, 44)


def test_mooncake_real_trace_counts_and_hashes() -> None:
    reqs, stats = apply_knobs(read_mooncake(_trace("conversation_trace.jsonl")), Knobs())
    assert len(reqs) == 12031
    assert stats.prompt_tokens_total == 144793823 and stats.output_tokens_total == 4122048
    assert all(a.arrival_s <= b.arrival_s for a, b in itertools.pairwise(reqs))
    assert len({r.arrival_s for r in reqs}) == 1180
    assert all(len(r.prefix_hash_ids) == -(-r.prompt_tokens // 512) for r in reqs)
    assert reqs[0].prefix_hash_ids[:3] == (0, 1, 2) and reqs[0].prompt_tokens == 6758


def test_azure_real_trace_window_stops_early() -> None:
    reqs, stats = apply_knobs(
        read_azure(_trace("AzureLLMInferenceTrace_conv.csv")), Knobs(start_s=60, duration_s=30)
    )
    assert stats.stopped_early and stats.rows_read < 19366
    assert 0 < len(reqs) == stats.rows_read - stats.before_window - 1
    assert reqs[0].arrival_s == 0.0 and reqs[-1].arrival_s < 30
    assert stats.window_first_s >= 60


def test_shipped_azure_sample_matches_full_trace_head() -> None:
    sample = REPO / "scenarios" / "traces" / "azure-conv-2023-head1000.csv"
    if not sample.is_file():
        pytest.skip(f"{sample} is not in this checkout")
    reqs, stats = apply_knobs(read_azure(sample), Knobs())
    assert len(reqs) == 1000
    assert (stats.prompt_tokens_total, stats.output_tokens_total) == (1014189, 247262)
    # 18:15:46.68059 -> 18:19:22.707983
    assert reqs[-1].arrival_s == pytest.approx(216.027393, abs=1e-6)
    full, _ = apply_knobs(
        read_azure(_trace("AzureLLMInferenceTrace_conv.csv")), Knobs(max_requests=1000)
    )
    assert full == reqs


# --- small files ---------------------------------------------------------------------------


def _write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


AZ_HEAD = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def test_azure_2024_timezone_and_column_order(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        "a.csv",
        "GeneratedTokens,TIMESTAMP,ContextTokens\n"
        "10,2024-05-10 00:00:00.0091280+00:00,100\n"
        "\n"
        "20,2024-05-10 00:00:01.5091280+00:00,200\n",
    )
    rows = list(read_azure(p))
    assert [(r.t_s, r.prompt_tokens, r.output_tokens, r.source_row) for r in rows] == [
        (0.0, 100, 10, 2),
        (1.5, 200, 20, 4),
    ]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("2023-11-16 18:15:46.68,abc,3\n", "line 2|:2: column 'ContextTokens': 'abc'"),
        ("2023-11-16 18:15:46.68,-4,3\n", "negative"),
        ("16/11/2023 18:15,4,3\n", ":2: column 'TIMESTAMP'"),
        ("2023-11-16 18:15:46.68,4\n", ":2: column 'GeneratedTokens' is missing"),
        ("2023-11-16 18:15:46.68,4,3.5\n", "'3.5' is not a token count"),
    ],
)
def test_azure_malformed_rows(tmp_path: Path, body: str, needle: str) -> None:
    p = _write(
        tmp_path, "bad.csv", AZ_HEAD + "2023-11-16 18:15:46.0,1,1\n" + body.replace(":2:", ":3:")
    )
    with pytest.raises(WorkloadError) as ei:
        list(read_azure(p))
    msg = str(ei.value)
    assert str(p) in msg
    assert any(n.replace(":2:", ":3:") in msg for n in needle.split("|")), msg
    assert "fix" in msg or "write" in msg


def test_azure_missing_column_names_expected_header(tmp_path: Path) -> None:
    p = _write(tmp_path, "bad.csv", "TIMESTAMP,Context\n2023-11-16 18:15:46.0,1\n")
    with pytest.raises(
        WorkloadError,
        match=r"missing column\(s\) 'ContextTokens', 'GeneratedTokens'.*TIMESTAMP,ContextTokens,GeneratedTokens",
    ):
        list(read_azure(p))
    empty = _write(tmp_path, "empty.csv", "")
    with pytest.raises(WorkloadError, match="empty"):
        list(read_azure(empty))


def test_azure_mixed_timezones_rejected(tmp_path: Path) -> None:
    p = _write(
        tmp_path, "tz.csv", AZ_HEAD + "2024-05-10 00:00:00+00:00,1,1\n2024-05-10 00:00:01,1,1\n"
    )
    with pytest.raises(WorkloadError, match=r":3: .*time zone"):
        list(read_azure(p))


BG_HEAD = "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"


def test_burstgpt_failures_dropped_and_counted(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        "b.csv",
        BG_HEAD
        + "5,ChatGPT,472,18,490,Conversation log\n"
        + "7,ChatGPT,100,0,100,Conversation log\n"
        + "45,GPT-4,1087,230,1317,API log\n"
        + "50,ChatGPT,10,,10,Conversation log\n"
        + "118,ChatGPT,417,276,693,Conversation log\n",
    )
    counts: Counter[str] = Counter()
    reqs, stats = apply_knobs(read_burstgpt(p, counts=counts), Knobs(), counts)
    assert [(r.arrival_s, r.prompt_tokens, r.output_tokens, r.source_row) for r in reqs] == [
        (0.0, 472, 18, 2),
        (40.0, 1087, 230, 4),
        (113.0, 417, 276, 6),
    ]
    assert stats.failed_skipped == 2 and stats.rows_read == 3

    counts = Counter()
    rows = list(read_burstgpt(p, models=["chatgpt"], log_types=["Conversation log"], counts=counts))
    assert [r.source_row for r in rows] == [2, 6]
    assert counts == Counter(failed_skipped=2, filtered_out=1)


def test_burstgpt_malformed(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        "b.csv",
        BG_HEAD + "5,ChatGPT,472,18,490,Conversation log\nsoon,ChatGPT,1,2,3,API log\n",
    )
    with pytest.raises(
        WorkloadError, match=r"b\.csv:3: column 'Timestamp': 'soon' is not a number of seconds"
    ):
        list(read_burstgpt(p))
    p = _write(tmp_path, "c.csv", BG_HEAD + "5,ChatGPT,many,18,490,Conversation log\n")
    with pytest.raises(WorkloadError, match=r"c\.csv:2: column 'Request tokens'"):
        list(read_burstgpt(p))
    p = _write(tmp_path, "d.csv", "Timestamp,Request tokens\n1,2\n")
    with pytest.raises(WorkloadError, match=r"missing column\(s\) 'Response tokens'"):
        list(read_burstgpt(p))
    p = _write(tmp_path, "e.csv", "Timestamp,Request tokens,Response tokens\n1,2,3\n")
    assert len(list(read_burstgpt(p))) == 1  # optional columns may be absent...
    with pytest.raises(WorkloadError, match="no 'Model' column"):
        list(read_burstgpt(p, models=["GPT-4"]))  # ...unless filtered on


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ('{"timestamp": 0, "input_length": 5', ":2: not a JSON object"),
        ("[1, 2]", ":2: expected a JSON object"),
        ('{"timestamp": 0, "input_length": 5}', ":2: missing key(s) 'output_length'"),
        ('{"timestamp": "x", "input_length": 5, "output_length": 3}', ":2: column 'timestamp'"),
        ('{"timestamp": 1, "input_length": 5.5, "output_length": 3}', ":2: column 'input_length'"),
        ('{"timestamp": 1, "input_length": 5, "output_length": -3}', "negative"),
        (
            '{"timestamp": 1, "input_length": 5, "output_length": 3, "hash_ids": [1, "a"]}',
            ":2: column 'hash_ids'",
        ),
    ],
)
def test_mooncake_malformed(tmp_path: Path, line: str, needle: str) -> None:
    good = '{"timestamp": 0, "input_length": 5, "output_length": 3, "hash_ids": [0]}\n'
    p = _write(tmp_path, "m.jsonl", good + line + "\n")
    with pytest.raises(WorkloadError) as ei:
        list(read_mooncake(p))
    assert needle in str(ei.value) and str(p) in str(ei.value)


def test_mooncake_ms_and_optional_hashes(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        "m.jsonl",
        '{"timestamp": 1000, "input_length": 5, "output_length": 3}\n\n{"timestamp": 2500, "input_length": 0, "output_length": 3, "hash_ids": [7]}\n',
    )
    reqs, stats = apply_knobs(read_mooncake(p), Knobs())
    assert [(r.arrival_s, r.prompt_tokens, r.prefix_hash_ids, r.source_row) for r in reqs] == [
        (0.0, 5, (), 1),
        (1.5, 1, (7,), 3),
    ]
    assert stats.raised_to_min == 1
