"""Emulated devices: timing (pure), padding on the wire, pacing windows, memory, fidelity."""

from __future__ import annotations

import pytest
import torch

from testbed.emulation.executor import EmulatedExecutor, pack_hidden, unpack_hidden
from testbed.emulation.fidelity import summarize_pacing
from testbed.emulation.plumbing import emulation_specs, serve_args
from testbed.emulation.standin import standin_args
from testbed.emulation.timing import EmulationSpec, StageTiming
from testbed.errors import ConfigError
from testbed.model.executor import CacheFullError, ExecutorInputError, LayerRangeExecutor
from testbed.spec.devices import CATALOG, DeviceProfile
from testbed.spec.model_profile import load_model_profile


def spec(model: str = "phi-3-medium", device: str = "rtx-3090", **kw) -> EmulationSpec:
    return EmulationSpec(
        node="n",
        profile=load_model_profile(model, "float16"),
        device=DeviceProfile(**CATALOG[device]),
        **kw,
    )


# -- timing -------------------------------------------------------------------------------------
def test_step_time_is_the_cost_models_blocks_plus_embed_and_head():
    s = spec()
    mid = StageTiming(s, 10, 20)
    from testbed.cost.model import CostModel

    cost = CostModel(s.profile)
    assert mid.step_s("prefill", 256, 0) == pytest.approx(10 * cost.block_prefill_s(s.device, 256))
    assert mid.step_s("decode", 1, 300) == pytest.approx(10 * cost.block_decode_s(s.device, 300))
    first, last = StageTiming(s, 0, 10), StageTiming(s, 30, 40)
    assert first.step_s("decode", 1, 300) > mid.step_s("decode", 1, 300)  # + embedding
    assert last.step_s("decode", 1, 300) > mid.step_s("decode", 1, 300)  # + LM head
    # decode reads a growing KV cache; prefill grows with the prompt
    assert mid.step_s("decode", 1, 3000) > mid.step_s("decode", 1, 10)
    assert mid.step_s("prefill", 1024, 0) > 3 * mid.step_s("prefill", 256, 0)


def test_faster_device_is_faster_and_dilation_multiplies():
    slow = StageTiming(spec(device="jetson-agx-orin"), 0, 20)
    fast = StageTiming(spec(device="a100-80gb"), 0, 20)
    assert fast.step_s("decode", 1, 500) < slow.step_s("decode", 1, 500)
    dil = StageTiming(spec(device="a100-80gb", dilation=3.0), 0, 20)
    assert dil.step_s("decode", 1, 500) == pytest.approx(3 * fast.step_s("decode", 1, 500))


def test_kv_capacity_is_memory_after_weights_over_kv_per_token():
    s = spec(device="rtx-3090")
    t = StageTiming(s, 0, 10)
    p = s.profile
    weights = 10 * p.block_weight_bytes() + p.embed_weight_bytes()
    assert t.kv_capacity_tokens() == (s.device.mem - weights) // (10 * p.kv_bytes_per_token())
    with pytest.raises(ConfigError, match="does not fit"):
        StageTiming(spec(device="jetson-orin-nano"), 0, 40).kv_capacity_tokens()


def test_spec_travels_as_json_and_bad_json_is_a_config_error():
    s = spec()
    assert EmulationSpec.from_json(s.to_json()) == s
    with pytest.raises(ConfigError, match="--emulate"):
        EmulationSpec.from_json('{"node": 1}')


def test_standin_keeps_family_and_blocks():
    for name in ("phi-3-medium", "llama-3-8b"):
        p = load_model_profile(name)
        args = standin_args(p)
        assert args["arch"] == p.arch.model_type
        assert args["layers"] == p.num_blocks
        assert args["hidden_size"] * 4 <= p.activation_bytes_per_token()


def test_plumbing_gives_every_planned_node_its_device():
    from testbed.cost.model import CostModel
    from testbed.cost.planner import make_plan
    from testbed.partition import PARTITIONERS
    from testbed.spec.topology import load_topology

    topo = load_topology("topologies/three-tier.yaml")
    prof = load_model_profile("phi-3-medium", "float16")
    plan = make_plan(topo, CostModel(prof), PARTITIONERS.create("bsdp"))
    specs = emulation_specs(topo, plan, prof)
    held = {n for st in plan.active_stages() for n in st.nodes}
    assert set(specs) == held
    args = serve_args(specs)
    for name, argv in args.items():
        got = EmulationSpec.from_json(argv[argv.index("--emulate") + 1])
        assert got.device == topo.node(name)[1].device


# -- bytes on the wire --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_pack_unpack_is_exact_and_has_the_studied_size(dtype):
    h = torch.randn(1, 7, 64)
    packed = pack_hidden(h, 5120, dtype)
    assert packed.dtype == dtype and packed.shape == (1, 7, 5120)
    assert packed.numel() * packed.element_size() == 7 * 5120 * packed.element_size()
    assert torch.equal(unpack_hidden(packed, 5120, dtype, 64), h)


def test_bad_padding_or_shape_is_refused():
    packed = pack_hidden(torch.randn(1, 3, 64), 5120, torch.float16)
    raw = packed.view(torch.uint8).clone()
    raw[0, 2, -1] = 1
    with pytest.raises(ExecutorInputError, match="padding is not zero"):
        unpack_hidden(raw.view(torch.float16), 5120, torch.float16, 64)
    with pytest.raises(ExecutorInputError, match="studied model's hidden states"):
        unpack_hidden(torch.zeros(1, 3, 64), 5120, torch.float16, 64)
    with pytest.raises(ExecutorInputError, match="studied model's hidden states"):
        unpack_hidden(packed.float(), 5120, torch.float16, 64)


# -- pacing -------------------------------------------------------------------------------------
class FakeClock:
    """Monotonic clock advanced by the work (compute_s per step) and by sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def _standin(tiny_model, layers=4):
    return tiny_model("phi3", layers=layers, heads=4, kv_heads=2)


def _studied(layers=4):
    base = load_model_profile("phi-3-medium", "float16")
    arch = base.arch.model_copy(update={"num_blocks": layers, "name": "phi-3-medium-4"})
    return base.model_copy(update={"arch": arch})


def test_step_holds_until_the_deadline_and_records_it(tiny_model):
    path = _standin(tiny_model)
    clock = FakeClock()
    s = EmulationSpec(node="n", profile=_studied(), device=DeviceProfile(**CATALOG["rtx-3090"]))
    timing = StageTiming(s, 0, 2)
    ex = EmulatedExecutor(LayerRangeExecutor(path, 0, 2), timing, clock=clock, sleep=clock.sleep)
    out = ex.step("r", "prefill", torch.tensor([[5, 6, 7]]), 0)
    pred = timing.step_s("prefill", 3, 0)
    assert clock.slept == [pytest.approx(pred)]  # real work took 0 on the fake clock
    assert out.compute_s == pytest.approx(pred)
    assert out.hidden is not None and out.hidden.shape == (1, 3, 5120)
    assert out.hidden.dtype == torch.float16
    rep = ex.pacing_report()
    assert rep["steps"][0][:3] == ["prefill", 3, 0]
    assert ex.kv_bytes() == 3 * 2 * s.profile.kv_bytes_per_token()


def test_overrun_is_counted_and_not_slept(tiny_model):
    path = _standin(tiny_model)
    clock = FakeClock()
    s = EmulationSpec(node="n", profile=_studied(), device=DeviceProfile(**CATALOG["h100"]))
    inner = LayerRangeExecutor(path, 0, 2)
    real_step = inner.step

    def slow_step(*a):  # the real work takes 1 s on the fake clock
        clock.now += 1.0
        return real_step(*a)

    inner.step = slow_step
    ex = EmulatedExecutor(inner, StageTiming(s, 0, 2), clock=clock, sleep=clock.sleep)
    ex.step("r", "prefill", torch.tensor([[5, 6, 7]]), 0)
    assert clock.slept == []
    summary = summarize_pacing({"n": ex.pacing_report()})
    assert summary["overruns"] == 1 and summary["overrun_fraction"] == 1.0
    assert summary["ok"] is False


def test_paced_step_matches_its_prediction_on_the_real_clock(tiny_model):
    path = _standin(tiny_model)
    s = EmulationSpec(
        node="n", profile=_studied(), device=DeviceProfile(**CATALOG["jetson-orin-nano"])
    )
    timing = StageTiming(s, 0, 4)
    ex = EmulatedExecutor(LayerRangeExecutor(path, 0, 4), timing)
    import time

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as emulated stages run (a loaded host makes torch threads spin)
    try:
        ex.step("r", "prefill", torch.tensor([[5, 6, 7, 8]]), 0)  # warm-up
        for pos in range(4, 12):
            t0 = time.monotonic()
            ex.step("r", "decode", torch.tensor([[9]]), pos)
            took = time.monotonic() - t0
            pred = timing.step_s("decode", 1, pos)
            assert pred > 0.05  # 4 blocks of Phi-3-medium on an Orin Nano
            assert took == pytest.approx(pred, rel=0.2, abs=0.01)
    finally:
        torch.set_num_threads(threads)
    summary = summarize_pacing({"n": ex.pacing_report()})
    assert summary["steps"] == 9
    assert summary["pacing_error_rel_p50"] < 0.1


def test_kv_capacity_refuses_a_prefill_that_does_not_fit(tiny_model):
    path = _standin(tiny_model)
    prof = _studied()
    mem = prof.block_weight_bytes() + 10 * prof.kv_bytes_per_token()  # one block, 10 tokens
    s = EmulationSpec(
        node="n", profile=prof, device=DeviceProfile(**{**CATALOG["rtx-3090"], "mem": mem})
    )
    timing = StageTiming(s, 1, 2)
    assert timing.kv_capacity_tokens() == 10
    ex = EmulatedExecutor(LayerRangeExecutor(path, 1, 2), timing, sleep=lambda s: None)
    eight = pack_hidden(torch.randn(1, 8, 64), 5120, torch.float16)
    ex.check_input("prefill", eight, 0, "a")
    ex.step("a", "prefill", eight, 0)
    with pytest.raises(CacheFullError, match="KV cache full"):
        ex.check_input("prefill", eight, 0, "b")
    one = pack_hidden(torch.randn(1, 1, 64), 5120, torch.float16)
    ex.step("a", "decode", one, 8)
    ex.step("a", "decode", one, 9)
    with pytest.raises(CacheFullError):  # a decode past the device's memory
        ex.step("a", "decode", one, 10)
    ex.release("a")
    ex.check_input("prefill", eight, 0, "b")  # room again


# -- time dilation ------------------------------------------------------------------------------
def test_dilation_scales_links_arrivals_and_back():
    from testbed.emulation.dilation import dilate_requests, dilate_topology, undilate_records
    from testbed.metrics.records import RequestRecord, Span
    from testbed.spec.topology import load_topology
    from testbed.workload.request import TraceRequest

    topo = load_topology("topologies/three-tier.yaml")
    slow = dilate_topology(topo, 4.0)
    assert slow.links[0].delay_s == pytest.approx(4 * topo.links[0].delay_s)
    assert slow.links[0].jitter_s == pytest.approx(4 * topo.links[0].jitter_s)
    assert slow.links[0].bandwidth_bps == pytest.approx(topo.links[0].bandwidth_bps / 4)
    assert slow.tiers[1].lan.delay_s == pytest.approx(4 * topo.tiers[1].lan.delay_s)
    assert (slow.links[0].src, slow.links[0].dst) == (topo.links[0].src, topo.links[0].dst)
    reqs = dilate_requests([TraceRequest(0, 0.0, 5, 3, 1), TraceRequest(1, 2.5, 5, 3, 2)], 4.0)
    assert [r.arrival_s for r in reqs] == [0.0, 10.0]
    rec = RequestRecord(
        request_id=1,
        arrival_s=10.0,
        status="completed",
        prompt_tokens=5,
        output_tokens=2,
        token_times_s=(12.0, 14.0),
        queueing_s=0.4,
        stage_compute_s={"a": 2.0},
        spans=(Span("compute", "a", 10.0, 12.0, 1),),
    )
    (back,) = undilate_records([rec], 4.0)
    assert back.ttft_s == pytest.approx(0.5) and back.tpot_s == pytest.approx(0.5)
    assert back.stage_compute_s["a"] == pytest.approx(0.5)
    assert back.spans[0].end_s == pytest.approx(3.0)


def test_dilation_scales_a_timeline_and_its_record_back():
    from testbed.emulation.dilation import dilate_timeline, undilate_applied
    from testbed.spec.timeline import TimelineEvent

    asked = [
        TimelineEvent.model_validate({"at": "30s", "node": "e1", "speed": 0.5}),
        TimelineEvent.model_validate(
            {"at": "60s", "link": "edge->fog", "bandwidth": "10Mbit", "delay": "40ms"}
        ),
        TimelineEvent.model_validate({"at": "90s", "rate_scale": 2.0}),
    ]
    slow = dilate_timeline(asked, 4.0)
    assert [e.at_s for e in slow] == [120.0, 240.0, 360.0]
    assert slow[0].speed == 0.5 and slow[2].rate_scale == 2.0  # not times or rates of links
    assert slow[1].bandwidth_bps == pytest.approx(2.5e6) and slow[1].delay_s == pytest.approx(0.16)
    assert slow[1].jitter_s is None and slow[1].loss_pct is None  # unnamed fields stay unnamed
    assert dilate_timeline(asked, 1.0) == tuple(asked)
    # what the applier recorded on the dilated clock, back on the emulated one, as asked
    applied = [
        {"at_s": 240.0, "applied_s": 240.4, "kind": "link", "what": slow[1].describe(),
         "bandwidth_bps": 2.5e6, "delay_s": 0.16, "jitter_s": 0.008, "loss_pct": 0.1},
    ]  # fmt: skip
    (back,) = undilate_applied(applied, 4.0, [asked[1]])
    assert back["at_s"] == 60.0 and back["applied_s"] == pytest.approx(60.1)
    assert back["bandwidth_bps"] == pytest.approx(10e6) and back["delay_s"] == pytest.approx(0.04)
    assert back["jitter_s"] == pytest.approx(0.002) and back["loss_pct"] == 0.1
    assert back["what"] == asked[1].describe() and "10" in back["what"]


def test_dilation_in_the_timing_and_the_fidelity_report():
    s = spec(dilation=5.0)
    t = StageTiming(s, 0, 10)
    plain = StageTiming(spec(), 0, 10)
    assert t.step_s("decode", 1, 100) == pytest.approx(5 * plain.step_s("decode", 1, 100))
    rep = {"dilation": 5.0, "steps": [["decode", 1, 100, 0.05, 0.0501, 0.02]]}
    em = summarize_pacing({"n": rep})
    assert em["pacing_error_p50_s"] == pytest.approx(0.0001 / 5)
    assert em["pacing_error_rel_p50"] == pytest.approx(0.002)
    assert em["dilation"] == 5.0


# -- scenario -> prepared run -------------------------------------------------------------------
def test_prepare_plans_the_studied_model_and_runs_its_standin(tmp_path, monkeypatch):
    from pathlib import Path

    import yaml

    from testbed.experiment.prepare import prepare
    from testbed.model.info import read_model_info
    from testbed.spec.scenario import load_scenario

    repo = Path(__file__).resolve().parents[2]
    loaded = load_scenario(repo / "scenarios" / "paper-phi3-medium.yaml")
    assert loaded.spec.execution == "emulated"
    prep = prepare(loaded, "heft+heft", 3)
    assert prep.profile.arch.name == "phi-3-medium" and prep.emulated
    assert read_model_info(prep.model_dir).num_blocks == 40
    assert set(prep.serve_args or {}) == {n for s in prep.plan.active_stages() for n in s.nodes}
    prompt = prep.prompt_fn()(prep.requests[0])
    assert max(prompt) < read_model_info(prep.model_dir).vocab_size  # the stand-in's vocabulary

    k = loaded.spec.dilation  # the shipped scenario's (make demo's) time dilation
    data = yaml.safe_load((repo / "scenarios" / "paper-phi3-medium.yaml").read_text())
    data.update(topology=str(repo / "topologies" / "three-tier.yaml"), dilation=3 * k)
    data["workload"]["path"] = str(repo / "scenarios" / "traces" / "azure-conv-2023-head1000.csv")
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    slow = prepare(load_scenario(path), "heft+heft", 3)
    assert [r.arrival_s for r in slow.requests] == pytest.approx(
        [3 * r.arrival_s for r in prep.requests]
    )
    assert slow.topology.links[0].delay_s == pytest.approx(3 * prep.topology.links[0].delay_s)
    assert slow.plan == prep.plan  # planned on the real (undilated) cluster
    data.update(dilation=3)
    data.update(execution="real")
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="dilation: 3 applies to emulated runs only"):
        load_scenario(path)


def test_a_batch_is_paced_as_the_roofline_of_the_batch(tiny_model):
    """Continuous batching on an emulated device: one window for the whole batch, the batch's
    roofline (weights read once), shorter than the rows one after another; tokens as unbatched."""
    from testbed.model.batch import BatchStep

    path = _standin(tiny_model)
    s = EmulationSpec(node="n", profile=_studied(), device=DeviceProfile(**CATALOG["a100-80gb"]))
    timing = StageTiming(s, 0, 4)
    clock = FakeClock()
    ex = EmulatedExecutor(LayerRangeExecutor(path, 0, 4), timing, clock=clock, sleep=clock.sleep)
    ref = EmulatedExecutor(LayerRangeExecutor(path, 0, 4), timing, sleep=lambda _s: None)
    prompts = {"a": [5, 6, 7], "b": [9, 10, 11, 12, 13]}
    first = {}
    for rid, p in prompts.items():
        first[rid] = ex.step(rid, "prefill", torch.tensor([p]), 0).token_id
        assert ref.step(rid, "prefill", torch.tensor([p]), 0).token_id == first[rid]
    clock.slept.clear()
    rows = [
        BatchStep(rid, "decode", torch.tensor([[first[rid]]]), len(p)) for rid, p in prompts.items()
    ]
    outs = ex.step_batch(rows)
    pred = timing.batch_s([("decode", 1, 3), ("decode", 1, 5)])
    apart = timing.step_s("decode", 1, 3) + timing.step_s("decode", 1, 5)
    assert pred < apart  # the weights are read once for the batch
    assert clock.slept == [pytest.approx(pred)]
    for rid, out in zip(prompts, outs, strict=True):
        assert not isinstance(out, Exception)
        assert out.compute_s == pytest.approx(pred)
        want = ref.step(rid, "decode", torch.tensor([[first[rid]]]), len(prompts[rid]))
        assert out.token_id == want.token_id
    assert ex.pacing_report()["steps"][-1][:2] == ["decode", 2]
    assert timing.batch_s([("decode", 1, 3)]) == pytest.approx(timing.step_s("decode", 1, 3))
