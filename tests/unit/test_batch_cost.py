"""The roofline of a batched step: weights read once, FLOPs and KV traffic summed."""

from __future__ import annotations

import pytest

from testbed.cost.model import CostModel, batch_speedup, batch_step_s
from testbed.spec.devices import CATALOG, DeviceProfile
from testbed.spec.model_profile import ModelProfile, load_model_profile


@pytest.fixture
def profile() -> ModelProfile:
    return load_model_profile("llama-3-8b")


def test_a_batch_of_one_is_the_single_step(profile: ModelProfile) -> None:
    gpu = DeviceProfile(**CATALOG["a100-80gb"])
    cost = CostModel(profile)
    assert batch_step_s(profile, gpu, [512]) == pytest.approx(cost.block_decode_s(gpu, 512))
    assert batch_step_s(profile, gpu, prefill_tokens=[256], blocks=3) == pytest.approx(
        3 * cost.block_prefill_s(gpu, 256)
    )
    assert batch_step_s(profile, gpu) == 0.0


def test_decodes_share_the_weight_read(profile: ModelProfile) -> None:
    gpu = DeviceProfile(**CATALOG["a100-80gb"])
    one = batch_step_s(profile, gpu, [512])
    sixteen = batch_step_s(profile, gpu, [512] * 16)
    # bandwidth-bound: 16 rows cost far less than 16 single steps, more than one
    assert one < sixteen < 4 * one
    nbytes = profile.block_weight_bytes() + 16 * (
        profile.block_decode_bytes(512) - profile.block_weight_bytes()
    )
    assert sixteen == pytest.approx(nbytes / gpu.effective_bandwidth + gpu.step_overhead)
    assert batch_speedup(profile, gpu, 16, 512) == pytest.approx(16 * one / sixteen)
    assert batch_speedup(profile, gpu, 1, 512) == 1.0
