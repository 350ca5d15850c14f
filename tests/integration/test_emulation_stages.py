"""Emulated stage servers over real loopback HTTP: tokens stay exact, padding is checked."""

from __future__ import annotations

import aiohttp
import pytest
import torch

from testbed.emulation.executor import EmulatedExecutor, pack_hidden
from testbed.emulation.fidelity import collect, summarize_pacing
from testbed.emulation.timing import EmulationSpec, StageTiming
from testbed.model.executor import LayerRangeExecutor
from testbed.spec.devices import CATALOG, DeviceProfile
from testbed.spec.model_profile import load_model_profile
from testbed.stage.pipeline import PipelineClient
from testbed.stage.server import StageConfig, StageServer
from testbed.stage.wire import decode, encode
from tests.factories import reference_generate

pytestmark = pytest.mark.model

PROMPT = [5, 17, 99, 200, 31, 7, 250, 3, 44]
RANGES = [(0, 2), (2, 3), (3, 4)]
DEVICES = ["jetson-agx-orin", "rtx-3090", "a100-80gb"]


def _studied():
    base = load_model_profile("phi-3-medium", "float16")
    arch = base.arch.model_copy(update={"num_blocks": 4, "name": "phi-3-medium-4"})
    return base.model_copy(update={"arch": arch})


def _server(path, a, b, device):
    spec = EmulationSpec(node=device, profile=_studied(), device=DeviceProfile(**CATALOG[device]))
    ex = EmulatedExecutor(LayerRangeExecutor(path, a, b), StageTiming(spec, a, b))
    return StageServer(StageConfig(str(path), a, b, emulation=spec.to_json()), executor=ex)


@pytest.fixture
def standin(tiny_model):
    return tiny_model("phi3", layers=4, heads=4, kv_heads=2)


@pytest.mark.parametrize("transport", ["http", "tcp"])
async def test_tokens_equal_the_standins_generate_through_emulated_stages(standin, transport):
    want = reference_generate(standin, PROMPT, 8)
    servers = [_server(standin, a, b, d) for (a, b), d in zip(RANGES, DEVICES, strict=True)]
    for s in servers:
        await s.start()
    try:
        urls = [s.url for s in servers]
        async with PipelineClient(urls, transport=transport) as pipe:
            result = await pipe.generate(PROMPT, 8)
        assert result.token_ids == want
        prefill = result.steps[0]
        # the first stage's answer to the prefill carries the studied model's hidden size
        assert prefill.stages[0].bytes_received >= len(PROMPT) * 5120 * 2
        assert prefill.stages[1].bytes_sent >= len(PROMPT) * 5120 * 2
        reps = await collect({f"s{i}": u for i, u in enumerate(urls)})
        summary = summarize_pacing(reps)
        assert summary["steps"] == 3 * 8
        assert all(n["steps"] == 8 for n in summary["nodes"].values())
    finally:
        for s in servers:
            await s.aclose()


async def test_bad_padding_is_a_400(standin):
    server = _server(standin, 2, 3, "rtx-3090")
    await server.start()
    try:
        packed = pack_hidden(torch.randn(1, 3, 64), 5120, torch.float16)
        raw = packed.view(torch.uint8).clone()
        raw[0, 1, 4000] = 7
        meta = {"request_id": "r", "kind": "prefill", "start_pos": 0}
        async with aiohttp.ClientSession() as session:
            for tensor, status in (
                (raw.view(torch.float16), 400),
                (torch.randn(1, 3, 64), 400),  # the stand-in's size: not what the wire carries
                (packed, 200),
            ):
                body = encode(
                    meta | {"request_id": f"r{status}-{tensor.shape[2]}"}, {"input": tensor}
                )
                async with session.post(server.url + "/forward", data=body) as resp:
                    data = await resp.read()
                    assert resp.status == status, data[:300]
                    if status == 200:
                        msg = decode(data)
                        assert msg.tensors["hidden"].shape == (1, 3, 5120)
                        assert set(msg.meta["emulation"]) == {"predicted_s", "emulated_s", "real_s"}
            async with session.get(server.url + "/emulation") as resp:
                rep = await resp.json()
        assert rep["steps_total"] == 1 and rep["device"] == "NVIDIA GeForce RTX 3090"
    finally:
        await server.aclose()
