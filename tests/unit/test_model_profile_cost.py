"""Model profiles from HF configs / presets and the roofline cost model."""

from __future__ import annotations

import json

import pytest

from testbed.cost.model import CostModel, decode_steps
from testbed.errors import ConfigError
from testbed.spec.devices import CATALOG, DeviceProfile
from testbed.spec.model_profile import PRESETS, load_model_profile
from testbed.spec.plan import RequestShape


@pytest.mark.parametrize(
    ("preset", "billions"),
    [("phi-3-mini", 3.82), ("phi-3-medium", 13.96), ("llama-3-8b", 8.03), ("qwen2-0.5b", 0.49)],
)
def test_preset_parameter_counts_match_published_sizes(preset, billions):
    prof = load_model_profile(preset)
    assert prof.arch.total_params / 1e9 == pytest.approx(billions, rel=0.01)


def test_per_block_quantities_phi3_mini():
    p = load_model_profile("phi-3-mini", dtype="float16")
    h = 3072
    assert p.kv_bytes_per_token() == 2 * 32 * 96 * 2  # K and V, 32 kv heads x 96 dims, fp16
    assert p.activation_bytes_per_token() == h * 2
    assert p.block_weight_bytes() == p.arch.block_params * 2
    # decode flops ~ 2 x params, plus attention over the context
    assert p.block_decode_flops(0) == pytest.approx(2 * p.arch.block_params + 4 * h)
    assert p.block_decode_flops(1000) > p.block_decode_flops(0)
    assert (
        load_model_profile("phi-3-mini", dtype="float32").block_weight_bytes()
        == 2 * p.block_weight_bytes()
    )


def test_hf_config_folder(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({**PRESETS["llama-3-8b"], "architectures": ["X"]})
    )
    p = load_model_profile(tmp_path)
    assert p.arch.num_blocks == 32 and p.arch.num_kv_heads == 8 and p.arch.name == tmp_path.name


@pytest.mark.parametrize(
    ("cfg", "words"),
    [
        ({"model_type": "bert"}, ["model_type", "not supported"]),
        (
            {**PRESETS["tiny"], "hidden_size": -1},
            ["hidden_size", "greater than or equal to 1", "-1"],
        ),
        (
            {k: v for k, v in PRESETS["tiny"].items() if k != "num_hidden_layers"},
            ["num_hidden_layers", "missing"],
        ),
    ],
)
def test_bad_hf_configs(tmp_path, cfg, words):
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError) as info:
        load_model_profile(tmp_path)
    for w in words:
        assert w in str(info.value)


def test_unknown_model_names_presets():
    with pytest.raises(ConfigError, match="did you mean preset 'phi-3-mini'"):
        load_model_profile("phi-3-mni")


def test_roofline_prefill_compute_bound_decode_bandwidth_bound():
    p = load_model_profile("llama-3-8b")
    cost = CostModel(p)
    gpu = DeviceProfile(**CATALOG["a100-80gb"])
    flops_t = p.block_prefill_flops(2048) / gpu.effective_flops
    bytes_t = p.block_prefill_bytes(2048) / gpu.effective_bandwidth
    assert flops_t > bytes_t  # long prefill: compute bound
    assert cost.block_prefill_s(gpu, 2048) == pytest.approx(flops_t)
    d_flops = p.block_decode_flops(512) / gpu.effective_flops
    d_bytes = p.block_decode_bytes(512) / gpu.effective_bandwidth
    assert d_bytes > d_flops  # decode: memory bound
    assert cost.block_decode_s(gpu, 512) == pytest.approx(d_bytes)
    # a faster GPU is faster; a CPU quota slows a CPU node proportionally
    h100 = DeviceProfile(**CATALOG["h100"])
    assert cost.block_decode_s(h100, 512) < cost.block_decode_s(gpu, 512)
    cpu1 = DeviceProfile(**{**CATALOG["cpu-generic"], "cpus": 8.0})
    cpu2 = DeviceProfile(**{**CATALOG["cpu-generic"], "cpus": 2.0})
    assert cost.block_prefill_s(cpu2, 256) == pytest.approx(4 * cost.block_prefill_s(cpu1, 256))


def test_request_times_and_hops():
    p = load_model_profile("phi-3-mini")
    cost = CostModel(p)
    gpu = DeviceProfile(**CATALOG["rtx-3090"])
    shape = RequestShape(prompt_tokens=100, output_tokens=11)
    assert decode_steps(shape) == (10, 100 + 4.5)
    t = cost.block_request_times(gpu, shape)
    assert t.shape == (32,) and (t > 0).all()
    assert t[0] == pytest.approx(
        cost.block_prefill_s(gpu, 100) + 10 * cost.block_decode_s(gpu, 104.5)
    )
    from testbed.spec.topology import LinkSpec

    link = LinkSpec(bandwidth="8Mbit", delay="10ms")
    occ, delay = cost.hop_request_s(link, shape)
    assert occ == pytest.approx((100 + 10) * 3072 * 2 * 8 / 8e6)
    assert delay == pytest.approx(11 * 0.01)
