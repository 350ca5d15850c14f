"""The workload: section: validation messages, path resolution, loading every kind."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.errors import ConfigError, WorkloadError
from testbed.workload import load_workload, parse_workload_spec
from testbed.workload.spec import AzureSpec, SyntheticSpec


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (
            {"kind": "azur", "path": "x"},
            "workload: kind must be one of azure, burstgpt, mooncake, synthetic (got 'azur')",
        ),
        ({"path": "x"}, "workload: missing 'kind'"),
        (
            {"kind": "azure", "path": "x", "windw": {}},
            "unknown field 'windw'; did you mean 'window'?",
        ),
        (
            {"kind": "azure", "path": "x", "window": {"start_s": "10 mins"}},
            "workload.window.start_s: '10 mins' has unknown time unit",
        ),
        (
            {"kind": "azure", "path": "x", "window": {"durationn_s": 3}},
            "workload.window: unknown field 'durationn_s'; did you mean 'duration_s'?",
        ),
        (
            {"kind": "azure", "path": "x", "rate_scale": 0},
            "workload.rate_scale: Input should be greater than or equal to 0.001",
        ),
        ({"kind": "azure"}, "workload.path: required field is missing; add it"),
        (
            {"kind": "azure", "path": "x", "window": {"duration_s": "0s"}},
            "workload.window: duration_s must be > 0",
        ),
        (
            {"kind": "synthetic", "rate_rps": 1, "prompt_tokens": 3, "output_tokens": 3},
            "num_requests",
        ),
        (
            {"kind": "synthetic", "rate_rps": 1, "num_requests": 3},
            "prompt_tokens and output_tokens",
        ),
        (
            {
                "kind": "synthetic",
                "rate_rps": 1,
                "num_requests": 3,
                "prompt_tokens": {"dist": "uniform", "low": 9, "high": 2},
                "output_tokens": 1,
            },
            "workload.prompt_tokens: low (9) is above high (2)",
        ),
        (
            {
                "kind": "synthetic",
                "rate_rps": 1,
                "num_requests": 3,
                "prompt_tokens": {"dist": "gauss"},
                "output_tokens": 1,
            },
            "workload.prompt_tokens: dist must be one of fixed, uniform, normal, lognormal, empirical (got 'gauss')",
        ),
        (
            {
                "kind": "synthetic",
                "rate_rps": 1,
                "num_requests": 3,
                "prompt_tokens": {"dist": "normal", "mean": 5, "stdev": 1},
                "output_tokens": 1,
            },
            "did you mean 'std'?",
        ),
        (
            {
                "kind": "synthetic",
                "rate_rps": 1,
                "num_requests": 3,
                "prompt_tokens": 1,
                "output_tokens": 1,
                "lengths_from": {"path": "a", "format": "azure"},
            },
            "not both",
        ),
    ],
)
def test_helpful_validation_errors(data: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_workload_spec(data, source="scen.yaml")
    msg = str(ei.value)
    assert msg.startswith("scen.yaml: ")
    assert needle in msg, msg
    assert ei.value.exit_code == 2


def test_durations_with_units_and_frozen() -> None:
    s = parse_workload_spec(
        {"kind": "azure", "path": "t.csv", "window": {"start_s": "2min", "duration_s": 30}}
    )
    assert isinstance(s, AzureSpec)
    assert s.window is not None and (s.window.start_s, s.window.duration_s) == (120.0, 30.0)
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen error
        s.path = Path("y")  # type: ignore[misc]


def test_relative_path_resolves_against_base_dir(tmp_path: Path) -> None:
    sub = tmp_path / "traces"
    sub.mkdir()
    (sub / "t.jsonl").write_text(
        '{"timestamp": 0, "input_length": 3, "output_length": 2}\n{"timestamp": 250, "input_length": 4, "output_length": 1}\n'
    )
    spec = parse_workload_spec({"kind": "mooncake", "path": "traces/t.jsonl", "time_scale": 2})
    w = load_workload(spec, tmp_path)
    assert [r.arrival_s for r in w.requests] == [0.0, 0.5]
    assert w.description["path"] == str(sub / "t.jsonl")
    assert w.description["spec"]["kind"] == "mooncake" and w.description["stats"]["requests"] == 2
    with pytest.raises(
        ConfigError,
        match=r"workload\.path: trace file 'traces/t.jsonl' not found .*scenario file's folder",
    ):
        load_workload(spec, tmp_path / "elsewhere")


def test_burstgpt_spec_filters_and_counts(tmp_path: Path) -> None:
    (tmp_path / "b.csv").write_text(
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "0,ChatGPT,10,5,15,Conversation log\n1,GPT-4,10,0,10,API log\n2,GPT-4,20,5,25,API log\n3,ChatGPT,30,5,35,API log\n"
    )
    w = load_workload(
        parse_workload_spec({"kind": "burstgpt", "path": "b.csv", "models": ["ChatGPT"]}), tmp_path
    )
    assert [r.prompt_tokens for r in w.requests] == [10, 30]
    assert (w.stats.failed_skipped, w.stats.filtered_out) == (1, 1)
    assert w.description["stats"]["failed_skipped"] == 1


def test_empty_selection_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:00:00,1,1\n"
    )
    spec = parse_workload_spec({"kind": "azure", "path": "a.csv", "window": {"start_s": "1h"}})
    with pytest.raises(WorkloadError, match="no request left"):
        load_workload(spec, tmp_path)


def test_synthetic_spec_shorthand() -> None:
    s = parse_workload_spec(
        {
            "kind": "synthetic",
            "rate_rps": 2,
            "duration_s": "1min",
            "prompt_tokens": 128,
            "output_tokens": 16,
        }
    )
    assert isinstance(s, SyntheticSpec) and s.duration_s == 60.0
    assert s.prompt_tokens is not None and s.prompt_tokens.dist == "fixed"
    w = load_workload(s, Path("."))
    assert all(r.arrival_s < 60 for r in w.requests) and 60 < len(w) < 190
