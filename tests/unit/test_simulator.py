"""`testbed simulate`: the event engine against hand-computed timings, links, KV, ARTS, calibrate."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from testbed.broker.layout import Layout, WorkPredictor
from testbed.metrics.records import RequestRecord, Span
from testbed.schedule import SCHEDULERS
from testbed.sim.calibrate import fit_profile
from testbed.sim.engine import SimConfig, Simulator
from testbed.sim.links import Network, Pipe
from testbed.sim.run import SimSetup, prepare_sim, simulate
from testbed.sim.steps import StepTimes
from testbed.spec.scenario import load_scenario
from testbed.spec.topology import LinkSpec
from testbed.workload.request import TraceRequest
from tests.factories import REPO

TINY = REPO / "scenarios" / "tiny-azure.yaml"


@pytest.fixture(scope="module")
def setup() -> SimSetup:
    return prepare_sim(load_scenario(TINY), "bsdp+arts")


def req(i: int, t: float, p: int = 16, o: int = 4) -> TraceRequest:
    return TraceRequest(request_id=i, arrival_s=t, prompt_tokens=p, output_tokens=o, source_row=i)


def engine(setup: SimSetup, layout: Layout | None = None, sched: str = "arts", **cfg) -> Simulator:  # type: ignore[no-untyped-def]
    lay = layout or setup.layout
    return Simulator(
        lay,
        WorkPredictor(lay, setup.prep.cost),
        SCHEDULERS.create(sched),
        StepTimes(lay, setup.prep.cost),
        Network(lay.hop_links),
        SimConfig(**cfg),
    )


def test_small_scenario_completes_every_request(setup: SimSetup) -> None:
    out = simulate(setup)
    assert len(out.records) == len(setup.requests) > 0
    assert all(r.status == "completed" for r in out.records)
    assert all(len(r.token_times_s) == r.output_tokens for r in out.records)
    assert all(0 < r.ttft_s <= r.e2e_s for r in out.records)  # type: ignore[operator]


def test_single_request_on_an_idle_route_is_the_analytic_sum(setup: SimSetup) -> None:
    p, o = 24, 5
    sim = engine(setup)
    (rec,) = sim.run([req(0, 1.0, p, o)]).records
    steps, lay, act = sim.steps, setup.layout, setup.prep.cost.profile.activation_bytes_per_token()

    def hop(links: tuple[LinkSpec, ...], nbytes: int) -> float:
        return sum(nbytes * 8 / ln.bandwidth_bps + ln.delay_s for ln in links)

    expected, t = [], 1.0
    for k in range(o):
        for s, name in enumerate(rec.route):
            t += steps.prefill_s(name, p) if k == 0 else steps.decode_s(name, p + k - 1)
            if s + 1 < len(rec.route):
                t += hop(lay.hop_links[s], act * (p if k == 0 else 1))
        t += sum(hop(links, 4) for links in lay.hop_links)  # the token back to the client
        expected.append(t)
    assert rec.token_times_s == pytest.approx(expected, abs=1e-6)
    assert rec.e2e_s == pytest.approx(expected[-1] - 1.0, abs=1e-6)
    # the prefill step time is the broker's prediction of it
    pred = WorkPredictor(lay, setup.prep.cost).predict(p, o)
    for name in rec.route:
        assert steps.prefill_s(name, p) == pytest.approx(pred.prefill_s[name])


def test_link_contention_doubles_the_time_of_two_simultaneous_transfers() -> None:
    link = LinkSpec(bandwidth="8Mbit", delay="0ms")
    net = Network([[link]])
    one = net.forward(0, 0.0, 10_000)
    two = net.forward(0, 0.0, 10_000)
    assert one == pytest.approx(0.01) and two == pytest.approx(2 * one)
    # the reverse direction is its own pipe; delay is added after the occupancy
    pipe = Pipe(8e6, 0.005)
    assert pipe.send(0.0, 10_000) == pytest.approx((0.01, 0.015))
    assert pipe.send(0.0, 10_000) == pytest.approx((0.02, 0.025))
    assert Network([[link]]).back(0.0, 10_000) == pytest.approx(0.01)


def test_kv_capacity_makes_requests_wait(setup: SimSetup) -> None:
    lay = setup.layout
    kv = WorkPredictor(lay, setup.prep.cost).predict(32, 8).kv_bytes
    last = lay.stages[-1].nodes[0]
    small = {n: replace(i, kv_capacity_bytes=kv[i.stage] * 3 // 2) for n, i in lay.nodes.items()}
    tight = Layout(lay.stages, small, lay.hop_links, lay.num_blocks)
    reqs = [req(0, 0.0, 32, 8), req(1, 0.0, 32, 8)]
    roomy = engine(setup).run(reqs).records
    waited = engine(setup, tight).run(reqs).records
    assert all(r.status == "completed" for r in waited)
    # with room for one cache, the second request's prefill on the shared node waits for the
    # first request to leave: its first token comes after the first request's last one
    assert waited[1].route[-1] == waited[0].route[-1] == last
    assert waited[1].token_times_s[0] > waited[0].token_times_s[-1]
    assert roomy[1].token_times_s[0] < roomy[0].token_times_s[-1]
    too_small = {n: replace(i, kv_capacity_bytes=1) for n, i in lay.nodes.items()}
    (rec,) = (
        engine(setup, Layout(lay.stages, too_small, lay.hop_links, lay.num_blocks))
        .run([req(0, 0.0)])
        .records
    )
    assert rec.status == "failed" and "KV cache full" in (rec.reason or "")


def test_arts_avoids_a_slowed_node(setup: SimSetup) -> None:
    stage = next(st for st in setup.layout.stages if len(st.nodes) > 1)
    slow = stage.nodes[1]
    reqs = [req(i, 0.2 * i, 64, 8) for i in range(60)]
    runs = {
        name: engine(setup, sched=name, slowdown={slow: 300.0}).run(reqs)
        for name in ("arts", "round_robin")
    }
    assert runs["round_robin"].routed[slow] == 30
    assert runs["arts"].routed[slow] <= 6
    mean = {k: sum(r.e2e_s for r in v.records) / 60 for k, v in runs.items()}  # type: ignore[misc]
    assert mean["arts"] < 0.8 * mean["round_robin"], mean


def test_calibrate_recovers_known_coefficients() -> None:
    fixed, per_tok, per_ctx, overhead = 0.004, 2e-5, 3e-7, 0.0015
    recs = []
    for i in range(30):
        p, o = 20 + 7 * i, 3 + i % 5
        spans = [Span("transfer", "client", 0.0, overhead, i, 0, "prefill", 0, peer="n1", nbytes=8)]
        t = 0.0
        for k in range(o):
            new, ctx = (p, 0) if k == 0 else (1, p + k - 1)
            d = fixed + per_tok * new + per_ctx * ctx
            spans.append(
                Span("compute", "n1", t, t + d, i, 0, "prefill" if k == 0 else "decode", k)
            )
            t += d
        recs.append(
            RequestRecord(
                i, 0.0, "completed", p, o, ("n1",), token_times_s=(t,), spans=tuple(spans)
            )
        )
    prof = fit_profile(recs)
    f = prof.nodes["n1"]
    assert (f.fixed_s, f.per_token_s, f.per_context_s) == pytest.approx(
        (fixed, per_tok, per_ctx), rel=1e-6
    )
    assert prof.hop_overhead_s == pytest.approx(overhead)


def test_cli_simulate_writes_a_replay_folder_marked_simulated(tmp_path: Path) -> None:
    from testbed.cli.main import main

    main(["simulate", str(TINY), "--output", str(tmp_path), "--requests", "5", "--no-plots"])
    (run,) = tmp_path.iterdir()
    for name in ("requests.jsonl", "requests.csv", "summary.json", "trace.json", "config.json"):
        assert (run / name).exists(), name
    assert json.loads((run / "summary.json").read_text())["mode"] == "simulated"
    assert json.loads((run / "config.json").read_text())["mode"] == "simulated"
    prof = tmp_path / "p.json"
    main(["calibrate", str(run), "-o", str(prof)])
    assert json.loads(prof.read_text())["kind"] == "testbed.calibrated-profile"


def test_a_calibrated_profile_feeds_the_simulator(tmp_path: Path, setup: SimSetup) -> None:
    import yaml

    from testbed.sim.steps import CalibratedProfile, StepFit

    nodes = {
        n: StepFit(fixed_s=0.01, per_token_s=0.0, per_context_s=0.0) for n in setup.layout.nodes
    }
    prof = CalibratedProfile(nodes=nodes, hop_overhead_s=0.002)
    (tmp_path / "p.json").write_text(prof.model_dump_json())
    data = yaml.safe_load(TINY.read_text())
    data.update(
        topology=str(TINY.parent / data["topology"]),
        profile="p.json",
        workload=data["workload"] | {"path": str(TINY.parent / data["workload"]["path"])},
    )
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(data))
    cal = prepare_sim(load_scenario(tmp_path / "s.yaml"), "bsdp+arts")
    assert cal.prep.calibrated == prof
    rec = simulate(cal, requests=[req(0, 0.0, 16, 1)]).records[0]
    n = len(rec.route)
    links = sum(
        2 * ln.delay_s
        + (16 * cal.prep.cost.profile.activation_bytes_per_token() + 4) * 8 / ln.bandwidth_bps
        for hop in cal.layout.hop_links
        for ln in hop
    )
    assert rec.e2e_s == pytest.approx(0.01 * n + 0.002 * n + links, abs=1e-9)


def test_sweep_rescales_rates_and_lengths(setup: SimSetup) -> None:
    from testbed.sim.sweep import markdown, mean_rate, run_sweep, vary

    fast = vary(setup.requests, "rate", 4.0)
    assert mean_rate(fast) == pytest.approx(4.0)
    assert {r.output_tokens for r in vary(setup.requests, "output_tokens", 7)} == {7}
    pts = run_sweep(setup.prep.loaded, ["bsdp+arts"], "rate", [0.5, 8.0], requests=10)
    assert [p.value for p in pts] == [0.5, 8.0]
    assert pts[1].e2e_mean_s >= pts[0].e2e_mean_s  # type: ignore[operator]
    assert "bsdp+arts" in markdown(pts)


def test_calibrated_fits_scale_with_blocks_and_feed_the_planner(setup: SimSetup) -> None:
    from testbed.cost.planner import make_plan
    from testbed.partition import PARTITIONERS
    from testbed.sim.steps import CalibratedProfile, StepFit, per_block_request_s, planner_times

    fit = StepFit(fixed_s=0.01, per_token_s=0.001, per_context_s=0.0, blocks=2)
    # per block: (prefill 0.01 + 0.001 * 8, then 3 decode steps of 0.011) / 2 blocks
    assert per_block_request_s(fit, 8, 4) == pytest.approx((0.018 + 3 * 0.011) / 2)
    node = setup.layout.stages[-1].nodes[0]
    m = setup.layout.stages[-1].num_blocks
    steps = StepTimes(setup.layout, setup.prep.cost, CalibratedProfile(nodes={node: fit}))
    assert steps.prefill_s(node, 8) == pytest.approx(0.018 * m / 2)
    # a node made very slow by its calibration loses its blocks in the plan
    slow = {n: StepFit(fixed_s=50.0, per_token_s=0.0, per_context_s=0.0, blocks=1) for n in [node]}
    spec = setup.prep.loaded.spec
    part = PARTITIONERS.create("bsdp")
    before = make_plan(setup.prep.topology, setup.prep.cost, part, spec.planning)
    after = make_plan(
        setup.prep.topology,
        setup.prep.cost,
        part,
        spec.planning,
        node_block_s=planner_times(CalibratedProfile(nodes=slow)),
    )
    tier = setup.layout.stages[-1].tier
    held = {st.tier: st.end - st.start for st in after.stages}
    assert held[tier] < {st.tier: st.end - st.start for st in before.stages}[tier]


def test_admission_cap_holds_requests_back_like_the_broker(setup: SimSetup) -> None:
    a, b = engine(setup, max_active_requests=1).run([req(0, 0.0), req(1, 0.0)]).records
    assert a.injection_lag_s == 0.0
    assert b.injection_lag_s == pytest.approx(a.e2e_s)
    assert b.token_times_s[0] > a.token_times_s[-1]


def test_the_scheduler_sees_the_brokers_ledger(setup: SimSetup) -> None:
    """Snapshots come from the shared ledger: a routed request counts on every node of its
    route (queue, predicted work, KV) until it leaves; every step is fed back, then the leave."""
    from dataclasses import dataclass, field

    from testbed.schedule import ClusterSnapshot, RequestView, Scheduler, StageCompletion

    @dataclass
    class Spy(Scheduler):
        inner: Scheduler = field(default_factory=lambda: SCHEDULERS.create("jsq"))
        snaps: list[ClusterSnapshot] = field(default_factory=list)
        events: list[StageCompletion] = field(default_factory=list)

        def route(self, request: RequestView, snapshot: ClusterSnapshot) -> tuple[str, ...]:
            self.snaps.append(snapshot)
            return self.inner.route(request, snapshot)

        def on_complete(self, event: StageCompletion) -> None:
            self.events.append(event)

    spy = Spy()
    lay = setup.layout
    sim = Simulator(
        lay,
        WorkPredictor(lay, setup.prep.cost),
        spy,
        StepTimes(lay, setup.prep.cost),
        Network(lay.hop_links),
    )
    first, _ = sim.run([req(0, 0.0, 16, 3), req(1, 0.001, 16, 3)]).records
    seen = {n.name: n for st in spy.snaps[1].stages for n in st}
    pred = WorkPredictor(lay, setup.prep.cost).predict(16, 3)
    for s, name in enumerate(first.route):
        assert seen[name].queue_len == 1
        assert seen[name].mem_free_bytes == lay.nodes[name].kv_capacity_bytes - pred.kv_bytes[s]
    mine = [e for e in spy.events if e.request_id == 0]
    assert len(mine) == 3 * len(first.route) + len(first.route)  # 3 steps per stage, then leave
    assert [e.finished for e in mine[-len(first.route) :]] == [True] * len(first.route)
    assert sim.ledger.in_flight() == 0
