"""The batch-aware roofline (issue 15 item 2): weights read once, FLOPs and KV reads summed."""

from __future__ import annotations

import pytest

from testbed.cost.model import CostModel, roofline_s
from testbed.spec.devices import CATALOG, DeviceProfile
from testbed.spec.model_profile import load_model_profile


@pytest.fixture(scope="module")
def cost() -> CostModel:
    return CostModel(load_model_profile("phi-3-mini", dtype="float16"))


def dev(name: str) -> DeviceProfile:
    return DeviceProfile(**CATALOG[name])


def test_a_batch_of_one_is_the_single_step(cost: CostModel) -> None:
    for d in (dev("a100-80gb"), dev("jetson-agx-orin")):
        assert cost.block_batch_s(d, contexts=[700]) == pytest.approx(cost.block_decode_s(d, 700))
        assert cost.block_batch_s(d, prompts=[300]) == pytest.approx(cost.block_prefill_s(d, 300))


def test_a_batch_is_the_roofline_of_its_summed_work(cost: CostModel) -> None:
    d, p = dev("a100-80gb"), cost.profile
    ctx = [100, 900, 2000]
    w = p.block_weight_bytes()
    flops = sum(p.block_decode_flops(c) for c in ctx) + p.block_prefill_flops(64)
    nbytes = w + sum(p.block_decode_bytes(c) - w for c in ctx) + (p.block_prefill_bytes(64) - w)
    got = cost.block_batch_s(d, prompts=[64], contexts=ctx)
    assert got == pytest.approx(roofline_s(flops, nbytes, d) + d.step_overhead)


def test_decode_batches_amortise_the_weights(cost: CostModel) -> None:
    d = dev("a100-80gb")
    one = cost.block_batch_s(d, contexts=[512])
    b32 = cost.block_batch_s(d, contexts=[512] * 32)
    # memory-bound decode: 32 steps in one pass cost far less than 32 passes, more than one
    assert one < b32 < 32 * one / 4
    # and the time grows with the KV caches read, not with the weights again
    longer = cost.block_batch_s(d, contexts=[4096] * 32)
    assert longer > b32
