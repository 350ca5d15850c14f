"""`testbed fidelity`: the comparison math and the run's own inputs (no runtime needed)."""

from __future__ import annotations

import math
from typing import Any

import pytest

from testbed.errors import ConfigError
from testbed.metrics.records import RequestRecord
from testbed.sim.fidelity import (
    Tolerances,
    compare_summaries,
    passed,
    read_config,
    relative_error,
    run_requests,
    served_max_batch,
)


def _summary(p50: float, p99: float, util: dict[str, float], **extra: Any) -> dict[str, Any]:
    return {
        "completed": 10,
        "e2e_s": {"p50": p50, "p99": p99},
        "ttft_s": {"p50": 0.1},
        "tpot_s": {"p50": 0.02},
        "node_utilisation": util,
        **extra,
    }


def test_relative_error() -> None:
    assert relative_error(2.0, 2.2) == pytest.approx(0.1)
    assert relative_error(2.0, 1.8) == pytest.approx(0.1)
    assert relative_error(None, 1.0) is None and relative_error(1.0, None) is None
    assert relative_error(0.0, 0.0) == 0.0
    assert relative_error(0.0, 0.1) == math.inf


def test_checks_at_and_past_each_tolerance() -> None:
    real = _summary(1.0, 2.0, {"a": 0.50, "b": 0.20})
    # median 9.9 % off, p99 19.9 % off, utilisation 9.9 points off: all within
    sim = _summary(1.099, 1.602, {"a": 0.599, "b": 0.101})
    checks = compare_summaries(real, sim)
    by = {c.metric: c for c in checks}
    assert [c.metric for c in checks if c.ok is not None] == [
        "e2e p50",
        "e2e p99",
        "util a",
        "util b",
    ]
    assert by["e2e p50"].error == pytest.approx(0.099) and by["e2e p50"].ok
    assert by["e2e p99"].error == pytest.approx(0.199) and by["e2e p99"].ok
    assert by["util a"].error == pytest.approx(0.099) and by["util a"].kind == "points"
    assert by["ttft p50"].ok is None and by["ttft p50"].kind == "info"
    assert passed(checks)
    # each one just past its tolerance fails on its own
    for bad, metric in (
        (_summary(1.101, 2.0, {"a": 0.5, "b": 0.2}), "e2e p50"),
        (_summary(1.0, 2.401, {"a": 0.5, "b": 0.2}), "e2e p99"),
        (_summary(1.0, 2.0, {"a": 0.5, "b": 0.301}), "util b"),
    ):
        checks = compare_summaries(real, bad)
        assert [c.metric for c in checks if c.ok is False] == [metric]
        assert not passed(checks)


def test_a_node_only_one_side_saw_counts_as_idle_on_the_other() -> None:
    checks = compare_summaries(_summary(1, 1, {"a": 0.3}), _summary(1, 1, {"b": 0.05}))
    by = {c.metric: c for c in checks}
    assert by["util a"].sim == 0.0 and by["util a"].ok is False
    assert by["util b"].real == 0.0 and by["util b"].ok is True


def test_missing_latencies_fail_the_check() -> None:
    real = _summary(1.0, 2.0, {})
    sim = {"completed": 0, "e2e_s": {"p50": None, "p99": None}, "node_utilisation": {}}
    checks = compare_summaries(real, sim, Tolerances())
    assert [c.metric for c in checks if c.ok is False] == ["e2e p50", "e2e p99"]


def test_tolerances_are_parameters() -> None:
    real, sim = _summary(1.0, 1.0, {}), _summary(1.3, 1.0, {})
    assert not passed(compare_summaries(real, sim))
    assert passed(compare_summaries(real, sim, Tolerances(e2e_p50_rel=0.31)))


def test_requests_come_from_the_records_in_arrival_order() -> None:
    recs = [
        RequestRecord(1, 0.5, "completed", prompt_tokens=7, output_tokens=3),
        RequestRecord(0, 0.0, "failed", prompt_tokens=5, output_tokens=2, reason="x"),
    ]
    reqs = run_requests(recs)
    assert [(q.request_id, q.arrival_s, q.prompt_tokens, q.output_tokens) for q in reqs] == [
        (0, 0.0, 5, 2),
        (1, 0.5, 7, 3),
    ]


def test_served_max_batch_falls_back_to_the_scenario_then_the_stage_server() -> None:
    from testbed.stage.batcher import BatchLimits

    topo = {"tiers": [{"nodes": [{"name": "a", "max_batch": 4}, {"name": "b"}]}]}
    assert served_max_batch({"topology": topo, "scenario": {}}) == {
        "a": 4,
        "b": BatchLimits().max_batch,
    }
    assert served_max_batch({"topology": topo, "scenario": {"max_batch": 2}}) == {"a": 4, "b": 2}


def test_a_simulated_or_foreign_folder_is_refused(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="give a run folder"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text('{"mode": "simulated", "scenario": {}, "plan": {}}')
    with pytest.raises(ConfigError, match="simulated run"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text('{"scenario": {}}')
    with pytest.raises(ConfigError, match="no 'plan'"):
        read_config(tmp_path)
