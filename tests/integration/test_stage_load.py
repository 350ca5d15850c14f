"""``POST /load`` on stage servers in this process: a new block range swapped into a running
server (range checks, refusal while requests are held, /info after the swap), and pipelined
tokens still equal to the whole model's ``generate`` after a reload, real and emulated."""

from __future__ import annotations

import aiohttp
import pytest
import torch

from testbed.emulation.timing import EmulationSpec
from testbed.spec.devices import CATALOG, DeviceProfile
from testbed.spec.model_profile import load_model_profile
from testbed.stage.pipeline import PipelineClient
from testbed.stage.server import StageConfig, StageServer
from testbed.stage.wire import encode
from tests.factories import reference_generate

pytestmark = pytest.mark.model

PROMPT = [5, 17, 99, 200, 31, 7, 250, 3, 44]


async def load(url, body):
    async with aiohttp.ClientSession() as s, s.post(url + "/load", json=body) as resp:
        return resp.status, await resp.json()


async def info(url):
    async with aiohttp.ClientSession() as s, s.get(url + "/info") as resp:
        return await resp.json()


def _emulation(device: str) -> str:
    base = load_model_profile("phi-3-medium", "float16")
    arch = base.arch.model_copy(update={"num_blocks": 4, "name": "phi-3-medium-4"})
    spec = EmulationSpec(
        node=device,
        profile=base.model_copy(update={"arch": arch}),
        device=DeviceProfile(**CATALOG[device]),
    )
    return spec.to_json()


@pytest.fixture
def model(tiny_model):
    return tiny_model("phi3", layers=4, heads=4, kv_heads=2)


async def test_load_checks_the_range_and_refuses_while_requests_are_held(model):
    server = StageServer(StageConfig(str(model), 0, 2, name="s"))
    await server.start()
    try:
        url = server.url
        for body, match in (
            ({"start": 0}, "JSON body"),
            ([0, 2], "JSON body"),
            ({"start": 0, "end": 2, "x": 1}, "JSON body"),
            ({"start": "0", "end": 2}, "integers"),
            ({"start": True, "end": 2}, "integers"),
            ({"start": 2, "end": 2}, "not a range"),
            ({"start": 0, "end": 5}, "inside the model's 0:4"),
            ({"start": -1, "end": 1}, "not a range"),
        ):
            status, err = await load(url, body)
            assert status == 400 and err["code"] == "bad_input", (body, err)
            assert match in err["error"], (body, err)
        # a request holds a KV cache: the swap would break it
        msg = encode(
            {"request_id": "r", "kind": "prefill", "start_pos": 0},
            {"input": torch.tensor([[1, 2, 3]])},
        )
        async with aiohttp.ClientSession() as s:
            async with s.post(url + "/forward", data=msg) as resp:
                assert resp.status == 200
            status, err = await load(url, {"start": 0, "end": 1})
            assert status == 409 and err["code"] == "in_use", err
            assert "1 request cache" in err["error"]
            async with s.post(url + "/release", json={"request_id": "r"}) as resp:
                assert resp.status == 200
        assert (await info(url))["blocks"] == [0, 2]
        status, body = await load(url, {"start": 0, "end": 1})
        assert status == 200 and body["loaded"] is True, body
        got = await info(url)
        assert got["blocks"] == [0, 1] and got["is_last"] is False and got["loads"] == 1
        assert got["warmup"]["steps"] >= 2  # the new blocks were warmed up before serving
        assert server.config.end == 1
        status, body = await load(url, {"start": 0, "end": 1})  # the same range: nothing to do
        assert status == 200 and body["loaded"] is False and (await info(url))["loads"] == 1
    finally:
        await server.aclose()


async def test_forward_is_refused_while_loading(model):
    server = StageServer(StageConfig(str(model), 0, 2, name="s"))
    await server.start()
    try:
        server.loading = (0, 3)  # what a /load under way looks like to the routes
        msg = encode(
            {"request_id": "r", "kind": "prefill", "start_pos": 0}, {"input": torch.tensor([[1]])}
        )
        async with aiohttp.ClientSession() as s:
            async with s.post(server.url + "/forward", data=msg) as resp:
                err = await resp.json()
                assert resp.status == 429 and err["code"] == "busy", err
                assert "loading blocks 0:3" in err["error"]
            async with s.get(server.url + "/health") as resp:
                assert resp.status == 200 and (await resp.json())["loading"] == [0, 3]
            status, err = await load(server.url, {"start": 0, "end": 1})
            assert status == 409 and "already loading" in err["error"]
    finally:
        server.loading = None
        await server.aclose()


@pytest.mark.parametrize("emulated", [False, True], ids=["real", "emulated"])
async def test_tokens_equal_generate_after_a_reload(model, emulated):
    want = reference_generate(model, PROMPT, 6)
    devices = ["jetson-agx-orin", "a100-80gb"]
    servers = [
        StageServer(
            StageConfig(
                str(model), a, b, name=f"s{i}", emulation=_emulation(d) if emulated else None
            )
        )
        for i, ((a, b), d) in enumerate(zip([(0, 1), (1, 4)], devices, strict=True))
    ]
    for s in servers:
        await s.start()
    try:
        urls = [s.url for s in servers]
        async with PipelineClient(urls) as pipe:
            assert (await pipe.generate(PROMPT, 6)).token_ids == want
        for url, rng in zip(urls, [(0, 3), (3, 4)], strict=True):
            status, body = await load(url, {"start": rng[0], "end": rng[1]})
            assert status == 200 and body["blocks"] == list(rng), body
        async with PipelineClient(urls) as pipe:
            assert (await pipe.generate(PROMPT, 6)).token_ids == want
        if emulated:  # the new blocks' timing: 3 Jetson blocks now, the pacing report anew
            ex = servers[0].executor
            assert (ex.timing.start, ex.timing.end) == (0, 3)  # type: ignore[attr-defined]
            async with aiohttp.ClientSession() as s, s.get(urls[0] + "/emulation") as resp:
                rep = await resp.json()
            assert rep["steps_total"] == 6  # this executor's steps only
    finally:
        for s in servers:
            await s.aclose()
