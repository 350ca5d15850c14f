"""`testbed fidelity`: the comparison math and the run's own inputs (no runtime needed)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import pytest

from testbed.errors import ConfigError
from testbed.metrics.records import RequestRecord, Span
from testbed.sim.calibrate import (
    batch_rows,
    call_excess_s,
    contended_call_overhead_s,
    fit_profile,
)
from testbed.sim.fidelity import (
    Tolerances,
    compare_summaries,
    passed,
    read_config,
    relative_error,
    run_requests,
    served_max_batch,
)
from testbed.spec.topology import LinkSpec


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


# -- calibration of batched runs -----------------------------------------------------------------
def _rec(rid: int, p: int, spans: list[Span], route: tuple[str, ...] = ("n1",)) -> RequestRecord:
    return RequestRecord(
        rid, 0.0, "completed", p, 4, route, token_times_s=(1.0,), spans=tuple(spans)
    )


def test_batched_steps_are_one_row_per_forward() -> None:
    # requests 0 and 1 decode together twice (batch 2, 0.05 s; spans start 1 ms apart, as the
    # broker places them), request 2 prefills alone; a later forward of the same size and length
    # is a row of its own
    recs = [
        _rec(0, 10, [Span("compute", "n1", 1.000, 1.050, 0, 0, "decode", 1, batch=2),
                     Span("compute", "n1", 2.000, 2.050, 0, 0, "decode", 2, batch=2)]),
        _rec(1, 20, [Span("compute", "n1", 1.001, 1.051, 1, 0, "decode", 3, batch=2),
                     Span("compute", "n1", 2.001, 2.051, 1, 0, "decode", 4, batch=2)]),
        _rec(2, 30, [Span("compute", "n1", 0.0, 0.2, 2, 0, "prefill", 0, batch=1)]),
    ]  # fmt: skip
    rows = sorted(batch_rows(recs)["n1"])
    want = [(2, 10 + 22, 0.05), (2, 11 + 23, 0.05), (30, 0, 0.2)]
    assert [r[:2] for r in rows] == [w[:2] for w in want]
    assert [r[2] for r in rows] == pytest.approx([w[2] for w in want])


def test_fit_recovers_a_per_forward_line_from_batches() -> None:
    fixed, per_tok, per_ctx = 0.08, 1e-3, 2e-5
    recs: dict[int, list[Span]] = {i: [] for i in range(4)}
    prompts = {i: 10 + 5 * i for i in range(4)}
    t = 0.0
    for k in range(1, 6):  # decode step k of 1..4 requests batched together
        members = list(range(1 + k % 4))
        ctx = sum(prompts[i] + k - 1 for i in members)
        d = fixed + per_tok * len(members) + per_ctx * ctx
        for j, i in enumerate(members):
            recs[i].append(Span("compute", "n1", t + j * 1e-3, t + d + j * 1e-3, i, 0, "decode", k, batch=len(members)))  # fmt: skip
        t += 1.0
    for i in range(4):  # every prefill alone
        d = fixed + per_tok * prompts[i]
        recs[i].append(Span("compute", "n1", t, t + d, i, 0, "prefill", 0, batch=1))
        t += 1.0
    prof = fit_profile([_rec(i, prompts[i], recs[i]) for i in range(4)])
    f = prof.nodes["n1"]
    assert (f.fixed_s, f.per_token_s, f.per_context_s) == pytest.approx(
        (fixed, per_tok, per_ctx), rel=1e-6
    )
    assert f.samples == 5 + 4  # forwards, not steps


def test_call_overhead_is_the_mean_excess_over_the_link_model() -> None:
    link = LinkSpec(bandwidth="8Mbit", delay="10ms")
    extra = 0.003
    # one decode step through n1 -> n2: the call into n1 (no link), the call into n2 (one way
    # + 1000 bytes at 1 MB/s, and the token's way back, charged to the last call)
    spans = [
        Span("transfer", "client", 0.0, extra, 0, 0, "decode", 1, peer="n1", nbytes=10),
        Span("transfer", "n1", 0.1, 0.1 + 0.01 + 0.001 + 0.01 + extra, 0, 1, "decode", 1, peer="n2", nbytes=1000),
    ]  # fmt: skip
    rec = _rec(0, 5, spans, route=("n1", "n2"))
    assert call_excess_s([rec], [(link,)]) == pytest.approx(extra)
    assert call_excess_s([], [(link,)]) is None


def test_a_calibrated_batch_is_the_line_over_its_sums() -> None:
    from testbed.sim.run import prepare_sim
    from testbed.sim.steps import CalibratedProfile, StepFit, StepTimes
    from testbed.spec.scenario import load_scenario
    from tests.factories import REPO

    setup = prepare_sim(load_scenario(REPO / "scenarios" / "tiny-azure.yaml"), "bsdp+arts")
    node = next(iter(setup.layout.nodes))
    fit = StepFit(fixed_s=0.05, per_token_s=1e-3, per_context_s=1e-5)
    steps = StepTimes(setup.layout, setup.prep.cost, CalibratedProfile(nodes={node: fit}))
    assert steps.batch_s(node, [16], [40, 50]) == pytest.approx(0.05 + 1e-3 * 18 + 1e-5 * 90)
    assert steps.batch_s(node, [], [40]) == pytest.approx(steps.decode_s(node, 40))


def test_call_overhead_counts_link_queueing_as_the_links_time() -> None:
    """The run's transfers replayed through the simulator's pipes: a decode step's activations
    that waited behind a prefill's on a link are the link's time (the simulator queues them
    itself), not overhead; which call a shaper charges a delay to does not matter."""
    a, b = LinkSpec(bandwidth="8Mbit", delay="10ms"), LinkSpec(bandwidth="8Mbit", delay="20ms")
    extra = 0.002

    def token(rid: int, at: float, nbytes: int) -> RequestRecord:
        # client -> n1 (no link), n1 -> n2 (the app shaper: round trip of a, 20 ms), n2 -> n3
        # (round trip of b, 40 ms), nbytes at 1 MB/s on each link; the link model charges 10 +
        # 20 ms forward and 30 ms back
        occ = nbytes / 1e6
        spans = [
            Span("transfer", "client", at, at + extra, rid, 0, "decode", 1, peer="n1", nbytes=10),
            Span("transfer", "n1", at + 0.1, at + 0.1 + 0.020 + occ + extra, rid, 1, "decode", 1, peer="n2", nbytes=nbytes),
            Span("transfer", "n2", at + 0.2, at + 0.2 + 0.040 + occ + extra, rid, 2, "decode", 1, peer="n3", nbytes=nbytes),
        ]  # fmt: skip
        return _rec(rid, 5, spans, route=("n1", "n2", "n3"))

    alone = [token(0, 0.0, 1000), token(1, 1.0, 1000)]
    assert contended_call_overhead_s(alone, [(a,), (b,)]) == pytest.approx(extra)
    # request 1's step is sent 10 ms after request 0's 100 kB (0.1 s on each link): it waits
    # 90 ms behind it on each link, as the simulator's pipes would make it wait
    big = token(0, 0.0, 100_000)
    queued = token(1, 0.01, 1000)
    spans = list(queued.spans)
    for i in (1, 2):
        spans[i] = replace(spans[i], end_s=spans[i].end_s + 0.09)
    queued = replace(queued, spans=tuple(spans))
    assert contended_call_overhead_s([big, queued], [(a,), (b,)]) == pytest.approx(extra)
    # the mean excess over the bare link model charges those waits as overhead
    assert call_excess_s([big, queued], [(a,), (b,)]) == pytest.approx(extra + 0.18 / 6)
    assert contended_call_overhead_s([], [(a,)]) is None


def test_an_emulated_dilated_run_is_simulated_on_the_emulated_clock(tmp_path: Any) -> None:
    """A run folder as `replay` writes it for an emulated run at dilation 4 (its records on the
    emulated clock, its config.json with the dilated links it ran on), here from the simulator
    itself: `fidelity` simulates it with the devices' own timing, links undilated, and finds
    what it measured (a dilated link would make every token 4x slower on the wire)."""
    import json

    import yaml

    from testbed.emulation.dilation import dilate_topology, run_dilation, undilate_topology
    from testbed.sim.fidelity import check_fidelity
    from testbed.sim.run import simulate_scenario
    from testbed.spec.scenario import load_scenario
    from tests.factories import REPO

    data = yaml.safe_load((REPO / "scenarios" / "paper-llama3-8b.yaml").read_text())
    data["topology"] = str(REPO / "topologies" / "three-tier.yaml")
    data["workload"].update(
        path=str(REPO / "scenarios" / "traces" / "azure-conv-2023-head1000.csv"),
        max_requests=6, max_prompt_tokens=128, max_output_tokens=8, time_scale=0.3,
    )  # fmt: skip
    data["dilation"] = 4.0
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    run = simulate_scenario(load_scenario(tmp_path / "s.yaml"), output=tmp_path, plots=False)
    cfg = json.loads((run.out_dir / "config.json").read_text())
    del cfg["mode"]
    assert cfg["scenario"]["execution"] == "emulated" and run_dilation(cfg) == 4.0
    from testbed.spec.topology import load_topology

    topo = load_topology(REPO / "topologies" / "three-tier.yaml")
    ran = dilate_topology(topo, 4.0)  # what replay records: the links the run ran on
    assert undilate_topology(ran, 4.0).links[0].delay_s == pytest.approx(topo.links[0].delay_s)
    cfg["topology"] = {"path": "three-tier.yaml", **ran.model_dump(mode="json")}
    (run.out_dir / "config.json").write_text(json.dumps(cfg))
    res = check_fidelity(run.out_dir)
    assert res.timing == "emulated" and not res.in_sample and res.dilation == 4.0
    assert res.cost_source == "roofline"
    assert res.hop_overhead_s == pytest.approx(0.0, abs=1e-6)  # the token bytes on the way back
    by = {c.metric: c for c in res.checks}  # the same, but for that sub-microsecond overhead
    assert by["e2e p50"].error == pytest.approx(0.0, abs=1e-5)
    assert by["e2e p99"].error == pytest.approx(0.0, abs=1e-5)
    assert all(c.error == pytest.approx(0.0, abs=1e-5) for c in res.checks if c.kind == "points")
    assert res.ok and res.to_dict(Tolerances())["timing"] == "emulated"
