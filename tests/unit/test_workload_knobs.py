"""Knobs: window, scaling, clipping, limit, ordering."""

from __future__ import annotations

import pytest

from testbed.errors import WorkloadError
from testbed.workload import Knobs, TraceRow, apply_knobs


def rows(*spec: tuple[float, int, int]) -> list[TraceRow]:
    return [
        TraceRow(source_row=i + 2, t_s=100.0 + t, prompt_tokens=p, output_tokens=o)
        for i, (t, p, o) in enumerate(spec)
    ]


BASE = rows((0, 10, 5), (1, 20, 6), (3, 30, 7), (6, 40, 8), (10, 50, 9))


def test_identity() -> None:
    reqs, st = apply_knobs(BASE, Knobs())
    assert [r.arrival_s for r in reqs] == [0, 1, 3, 6, 10]
    assert [r.request_id for r in reqs] == [0, 1, 2, 3, 4]
    assert st.requests == 5 and st.prompt_tokens_total == 150 and st.output_tokens_total == 35
    assert not st.stopped_early and st.span_s == 10


def test_time_and_rate_scale() -> None:
    a, _ = apply_knobs(BASE, Knobs(time_scale=2.0))
    assert [r.arrival_s for r in a] == [0, 2, 6, 12, 20]
    b, _ = apply_knobs(BASE, Knobs(rate_scale=4.0))
    assert [r.arrival_s for r in b] == [0, 0.25, 0.75, 1.5, 2.5]
    c, _ = apply_knobs(BASE, Knobs(time_scale=2.0, rate_scale=4.0))
    assert [r.arrival_s for r in c] == [0, 0.5, 1.5, 3, 5]


def test_window_rebases_on_first_kept_and_stops() -> None:
    reqs, st = apply_knobs(BASE, Knobs(start_s=1, duration_s=5))  # trace time [1, 6)
    assert [r.source_row for r in reqs] == [3, 4]
    assert [r.arrival_s for r in reqs] == [0, 2]
    assert st.before_window == 1 and st.stopped_early and st.rows_read == 4
    assert st.window_first_s == 1


def test_limit_and_clip() -> None:
    reqs, st = apply_knobs(BASE, Knobs(max_requests=3, max_prompt_tokens=15, max_output_tokens=6))
    assert [(r.prompt_tokens, r.output_tokens) for r in reqs] == [(10, 5), (15, 6), (15, 6)]
    assert (
        st.prompt_clipped == 2 and st.output_clipped == 1 and st.stopped_early and st.rows_read == 3
    )


def test_zero_tokens_raised_to_one() -> None:
    reqs, st = apply_knobs(rows((0, 0, 0), (1, 3, 0)), Knobs())
    assert [(r.prompt_tokens, r.output_tokens) for r in reqs] == [(1, 1), (3, 1)]
    assert st.raised_to_min == 3


def test_out_of_order_sorted_and_counted() -> None:
    reqs, st = apply_knobs(rows((0, 1, 1), (5, 2, 2), (3, 3, 3), (3, 4, 4)), Knobs())
    assert [r.prompt_tokens for r in reqs] == [1, 3, 4, 2]
    assert [r.request_id for r in reqs] == [0, 1, 2, 3]
    assert st.out_of_order == 2  # both rows at t=3 come after the row at t=5


def test_clip_truncates_prefix_hashes() -> None:
    r = [
        TraceRow(
            source_row=1, t_s=0, prompt_tokens=2000, output_tokens=1, prefix_hash_ids=(1, 2, 3, 4)
        )
    ]
    reqs, _ = apply_knobs(r, Knobs(max_prompt_tokens=600))
    assert reqs[0].prefix_hash_ids == (1, 2)


def test_empty_and_invalid() -> None:
    reqs, st = apply_knobs([], Knobs())
    assert reqs == () and st.requests == 0
    for bad in (
        dict(time_scale=0),
        dict(rate_scale=-1),
        dict(start_s=-1),
        dict(duration_s=0),
        dict(max_requests=0),
    ):
        with pytest.raises(WorkloadError):
            Knobs(**bad)  # type: ignore[arg-type]
