"""Synthetic gamma arrivals and length distributions, through the spec."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from testbed.errors import WorkloadError
from testbed.workload import load_workload, parse_workload_spec
from testbed.workload.synthetic import gamma_arrivals


@pytest.mark.parametrize("k", [0.25, 1.0, 4.0])
def test_gamma_rate_and_burstiness(k: float) -> None:
    rng = np.random.default_rng(7)
    t = gamma_arrivals(rng, 5.0, k, num_requests=40001)
    gaps = np.diff(t)
    assert t[0] == 0 and np.all(gaps >= 0) and len(t) == 40001
    assert gaps.mean() == pytest.approx(0.2, rel=0.03)
    cv = gaps.std() / gaps.mean()
    assert cv == pytest.approx(1 / np.sqrt(k), rel=0.05)


def test_gamma_duration_bound() -> None:
    t = gamma_arrivals(np.random.default_rng(1), 100.0, 1.0, duration_s=30.0)
    assert t.max() < 30.0 and len(t) == pytest.approx(3000, rel=0.1)
    t2 = gamma_arrivals(np.random.default_rng(1), 100.0, 1.0, duration_s=30.0, num_requests=10)
    assert len(t2) == 10
    with pytest.raises(WorkloadError, match="num_requests or duration_s"):
        gamma_arrivals(np.random.default_rng(1), 1.0)
    with pytest.raises(WorkloadError, match="rate_rps"):
        gamma_arrivals(np.random.default_rng(1), 0.0, num_requests=3)


def _load(**kw: object):
    return load_workload(parse_workload_spec({"kind": "synthetic", **kw}), Path("."))


def test_seeded_determinism_and_independent_streams() -> None:
    a = _load(
        rate_rps=2,
        num_requests=50,
        seed=3,
        prompt_tokens={"dist": "uniform", "low": 10, "high": 20},
        output_tokens=8,
    )
    b = _load(
        rate_rps=2,
        num_requests=50,
        seed=3,
        prompt_tokens={"dist": "uniform", "low": 10, "high": 20},
        output_tokens=8,
    )
    c = _load(
        rate_rps=2,
        num_requests=50,
        seed=4,
        prompt_tokens={"dist": "uniform", "low": 10, "high": 20},
        output_tokens=8,
    )
    d = _load(rate_rps=2, num_requests=50, seed=3, prompt_tokens=99, output_tokens=8)
    assert a.requests == b.requests and a.requests != c.requests
    # changing the lengths does not move the arrivals
    assert [r.arrival_s for r in a.requests] == [r.arrival_s for r in d.requests]
    assert all(10 <= r.prompt_tokens <= 20 and r.output_tokens == 8 for r in a.requests)
    assert a.description["seed"] == 3 and len(a) == 50


def test_default_seed_used_when_spec_has_none() -> None:
    spec = parse_workload_spec(
        {
            "kind": "synthetic",
            "rate_rps": 1,
            "num_requests": 5,
            "prompt_tokens": 4,
            "output_tokens": 4,
        }
    )
    a = load_workload(spec, Path("."), default_seed=1)
    b = load_workload(spec, Path("."), default_seed=2)
    assert a.requests != b.requests and a.description["seed"] == 1


def test_length_distributions() -> None:
    n = 20000
    norm = _load(
        rate_rps=1,
        num_requests=n,
        seed=0,
        prompt_tokens={"dist": "normal", "mean": 100, "std": 80, "low": 10, "high": 300},
        output_tokens=1,
    )
    p = np.array([r.prompt_tokens for r in norm.requests])
    assert p.min() == 10 and p.max() <= 300 and abs(np.median(p) - 100) < 5
    logn = _load(
        rate_rps=1,
        num_requests=n,
        seed=0,
        prompt_tokens=1,
        output_tokens={"dist": "lognormal", "mean": 200, "sigma": 0.5},
    )
    o = np.array([r.output_tokens for r in logn.requests])
    assert o.mean() == pytest.approx(200, rel=0.03) and o.min() >= 1


def test_synthetic_knobs_apply(tmp_path: Path) -> None:
    w = _load(
        rate_rps=10,
        num_requests=100,
        seed=0,
        prompt_tokens=500,
        output_tokens=50,
        rate_scale=2,
        max_prompt_tokens=300,
        max_requests=20,
    )
    base = _load(rate_rps=10, num_requests=100, seed=0, prompt_tokens=500, output_tokens=50)
    assert len(w) == 20 and all(r.prompt_tokens == 300 for r in w.requests)
    assert w.requests[5].arrival_s == pytest.approx(base.requests[5].arrival_s / 2)
    assert w.stats.prompt_clipped == 20


def test_lengths_from_trace(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:00:00,11,1\n2023-11-16 18:00:01,22,2\n"
    )
    spec = {"kind": "synthetic", "rate_rps": 1, "num_requests": 200, "seed": 0}
    w = load_workload(
        parse_workload_spec({**spec, "lengths_from": {"path": "t.csv", "format": "azure"}}),
        tmp_path,
    )
    pairs = {(r.prompt_tokens, r.output_tokens) for r in w.requests}
    assert pairs == {(11, 1), (22, 2)}  # joint draw: never (11, 2)
    e = load_workload(
        parse_workload_spec(
            {
                **spec,
                "prompt_tokens": {"dist": "empirical", "path": "t.csv", "format": "azure"},
                "output_tokens": 3,
            }
        ),
        tmp_path,
    )
    assert {r.prompt_tokens for r in e.requests} == {11, 22}
