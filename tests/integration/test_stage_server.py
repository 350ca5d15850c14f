"""Stage servers in this process over real loopback HTTP: bad input, capacity, pipelines."""

from __future__ import annotations

import asyncio
import itertools
import struct
import threading

import aiohttp
import pytest
import torch

from testbed.errors import StageError
from testbed.model.executor import LayerRangeExecutor, read_model_info
from testbed.stage.client import StageClient, StageRejectedError
from testbed.stage.pipeline import PipelineClient
from testbed.stage.server import StageConfig, StageServer
from testbed.stage.wire import MAGIC, decode, encode
from tests.factories import reference_generate

pytestmark = pytest.mark.model

PROMPT = [5, 17, 99, 200, 31, 7, 250, 3, 44]


class Servers:
    """Start in-process stage servers for a split; close them all."""

    def __init__(self, path, cuts, **cfg):
        n = read_model_info(path).num_blocks
        self.ranges = list(itertools.pairwise([0, *cuts, n]))
        self.servers = [
            StageServer(
                StageConfig(str(path), a, b, **cfg),
                executor=LayerRangeExecutor(path, a, b, max_requests=cfg.get("max_requests", 256)),
            )
            for a, b in self.ranges
        ]

    async def __aenter__(self):
        for s in self.servers:
            await s.start()
        return self

    async def __aexit__(self, *exc):
        for s in self.servers:
            await s.aclose()

    @property
    def urls(self):
        return [s.url for s in self.servers]


@pytest.mark.parametrize("arch", ["phi3", "llama"])
@pytest.mark.parametrize(
    ("cuts", "transport"),
    [([], "tcp"), ([1, 2, 3], "tcp"), ([1], "tcp"), ([1, 2, 3], "http")],
    ids=["whole", "one-per-stage", "uneven", "one-per-stage-http"],
)
async def test_pipelined_generation_matches_generate(tiny_model, arch, cuts, transport):
    path = tiny_model(arch)
    want = reference_generate(path, PROMPT, 10)
    sent = []

    async def hook(nbytes):
        sent.append(nbytes)

    async with Servers(path, cuts) as srv:
        hooks = [hook] * len(srv.urls)
        async with PipelineClient(srv.urls, hooks=hooks, transport=transport) as pipe:
            result = await pipe.generate(PROMPT, 10)
            for s in srv.servers:
                assert s.executor.request_ids == []  # released at the end
    assert result.token_ids == want
    steps = len(result.steps)
    assert len(sent) == steps * len(srv.urls)  # every hop went through the hook
    timing = result.timings()
    assert len(timing["per_stage"]) == len(srv.urls)
    assert all(st["service_s"] > 0 for st in timing["per_stage"])


async def test_concurrent_requests_match_generate(tiny_model):
    path = tiny_model("phi3")
    prompts = [PROMPT, [9, 8, 7, 6], [100, 200, 300, 400, 500, 2, 3], [42]]
    wants = [reference_generate(path, p, 8) for p in prompts]
    async with Servers(path, [2, 3], max_inflight=2) as srv:
        async with PipelineClient(srv.urls) as pipe:
            results = await asyncio.gather(*(pipe.generate(p, 8) for p in prompts))
    assert [r.token_ids for r in results] == wants


async def post(url, body, path="/forward"):
    async with aiohttp.ClientSession() as s, s.post(url + path, data=body) as resp:
        return resp.status, await resp.read()


def fwd(rid, kind, pos, x, **meta):
    return encode({"request_id": rid, "kind": kind, "start_pos": pos, **meta}, {"input": x})


async def test_bad_input_gets_4xx_and_the_server_keeps_serving(tiny_model):
    import json

    path = tiny_model("phi3")
    async with Servers(path, [2]) as srv:
        first, second = srv.urls
        ok = fwd("r", "prefill", 0, torch.tensor([[1, 2, 3]]))
        cases = [
            (first, ok[: len(ok) // 2], 400, "truncated"),
            (first, b"GET / HTTP/1.1", 400, "bad magic"),
            (first, struct.pack("<4sI", MAGIC, 50 << 20), 413, "exceeds the limit"),
            (first, fwd("r", "prefill", 0, torch.randn(1, 3, 64)), 400, "token ids"),
            (first, fwd("r", "prefill", 0, torch.tensor([[1, 9999]])), 400, "must be in"),
            (second, fwd("r", "prefill", 0, torch.randn(1, 3, 32)), 400, "hidden states"),
            (second, fwd("r", "prefill", 0, torch.randn(1, 3, 64).half()), 200, ""),
            (first, fwd("x", "decode", 3, torch.tensor([[1]])), 404, "unknown request id"),
            (first, fwd("r", "sideways", 0, torch.tensor([[1]])), 400, "meta.kind"),
            (first, fwd("", "prefill", 0, torch.tensor([[1]])), 400, "request_id"),
            (first, fwd("r", "prefill", -1, torch.tensor([[1]])), 400, "start_pos"),
            (first, fwd("r", "prefill", 0, torch.tensor([[1]]), extra=1), 400, "unknown meta"),
            (first, encode({"request_id": "r", "kind": "prefill", "start_pos": 0}), 400, "input"),
        ]
        for url, body, status, match in cases:
            got, text = await post(url, body)
            assert got == status, (match, text)
            if status >= 400:
                err = json.loads(text)
                assert match in err["error"] and err["status"] == status
        # a live request: wrong position and a second prefill are conflicts
        assert (await post(first, ok))[0] == 200
        got, text = await post(first, fwd("r", "decode", 7, torch.tensor([[4]])))
        assert got == 409 and b"expected position 3" in text
        got, text = await post(first, ok)
        assert got == 409 and b"already has a cache" in text
        got, text = await post(first, b'{"oops"', "/release")
        assert got == 400
        # still serving: the valid decode works, health is fine, errors were counted
        got, text = await post(first, fwd("r", "decode", 3, torch.tensor([[4]])))
        assert got == 200 and decode(text).meta["length"] == 4
        async with StageClient(first) as c:
            assert (await c.health())["status"] == "ok"
            metrics = await c.metrics()
            info = await c.info()
            assert await c.release("r") and not await c.release("r")
        assert 'testbed_stage_errors_total{stage="stage-0-2",status="400"}' in metrics
        assert 'testbed_stage_tokens_total{stage="stage-0-2",kind="decode"} 1' in metrics
        assert info["blocks"] == [0, 2] and info["is_first"] and not info["is_last"]
        assert info["param_bytes"] > 0 and info["rss_bytes"] > 0 and info["pid"] > 0


class _Gate:
    """An executor whose steps wait for a gate (to fill the queue on purpose)."""

    def __init__(self, inner):
        self._inner = inner
        self.gate = threading.Event()
        self.entered = threading.Event()

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def step(self, *args):
        self.entered.set()
        assert self.gate.wait(30)
        return self._inner.step(*args)

    def step_batch(self, steps):
        self.entered.set()
        assert self.gate.wait(30)
        return self._inner.step_batch(steps)


async def test_full_queue_answers_429_and_recovers(tiny_model):
    path = tiny_model("phi3")
    gated = _Gate(LayerRangeExecutor(path, 0, 4))
    server = StageServer(StageConfig(str(path), 0, 4, max_inflight=1, max_queue=1), gated)
    await server.start()
    try:
        url = server.url
        running = asyncio.create_task(post(url, fwd("a", "prefill", 0, torch.tensor([[1, 2]]))))
        await asyncio.to_thread(gated.entered.wait, 10)
        waiting = asyncio.create_task(post(url, fwd("b", "prefill", 0, torch.tensor([[3]]))))
        for _ in range(200):  # until "b" is queued
            if server._waiting_steps == 1:
                break
            await asyncio.sleep(0.01)
        status, text = await post(url, fwd("c", "prefill", 0, torch.tensor([[3]])))
        assert status == 429 and b"busy" in text
        gated.gate.set()
        assert (await running)[0] == 200 and (await waiting)[0] == 200
        assert (await post(url, fwd("c", "prefill", 0, torch.tensor([[3]]))))[0] == 200
        async with StageClient(url) as c:
            assert 'reason="queue_full"} 1' in await c.metrics()
    finally:
        gated.gate.set()
        await server.aclose()


async def test_idle_caches_expire_and_cache_slots_are_bounded(tiny_model):
    path = tiny_model("phi3")
    async with Servers(path, [], request_ttl_s=0.2, max_requests=1) as srv:
        (url,) = srv.urls
        assert (await post(url, fwd("a", "prefill", 0, torch.tensor([[1, 2]]))))[0] == 200
        status, text = await post(url, fwd("b", "prefill", 0, torch.tensor([[1, 2]])))
        assert status == 503 and b"release finished requests" in text
        await asyncio.sleep(0.5)
        status, _ = await post(url, fwd("a", "decode", 2, torch.tensor([[3]])))
        assert status == 404  # evicted after the TTL
        assert (await post(url, fwd("b", "prefill", 0, torch.tensor([[1, 2]]))))[0] == 200


async def test_client_errors_name_the_stage_and_the_reason(tiny_model):
    path = tiny_model("phi3")
    async with Servers(path, []) as srv:
        async with StageClient(srv.urls[0]) as c:
            with pytest.raises(StageRejectedError, match=r"HTTP 404.*unknown request id") as info:
                await c.forward("ghost", "decode", 5, [1])
            assert info.value.status == 404
            r = await c.forward("r", "prefill", 0, [1, 2, 3], want_logits=True)
            assert r.token_id is not None and r.logits is not None and r.logits.shape == (1, 512)
            assert r.token_id == int(torch.argmax(r.logits))
            status, _ = await c.post_raw("/sink", encode({}, {"x": torch.zeros(1000)}))
            assert status == 200


async def tcp_exchange(port, data: bytes, *, wait_close=False):
    """Send raw bytes to a tensor port; return the decoded answer (and whether it closed)."""
    from testbed.stage.wire import read_message

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()

        class _R:  # read_message's stream interface over asyncio's StreamReader
            readexactly = reader.readexactly

            async def readany(self):
                return b""

        msg = await asyncio.wait_for(read_message(_R()), 10)
        closed = False
        if wait_close:
            closed = await asyncio.wait_for(reader.read(1), 10) == b""
        return msg, closed
    finally:
        writer.close()
        await writer.wait_closed()


async def test_tensor_port_answers_bad_frames_and_keeps_serving(tiny_model):
    from testbed.stage.client import StageClient

    path = tiny_model("phi3")
    async with Servers(path, []) as srv:
        port = srv.servers[0].tensor_port
        assert port
        # broken framing: an error answer, then the connection is closed
        msg, closed = await tcp_exchange(port, b"NOPE" + b"\0" * 20, wait_close=True)
        assert msg.meta["status"] == 400 and "bad magic" in msg.meta["error"] and closed
        msg, closed = await tcp_exchange(
            port, struct.pack("<4sI", MAGIC, 50 << 20), wait_close=True
        )
        assert msg.meta["status"] == 413 and closed
        # a truncated frame and a hang-up must not disturb the server
        _r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(fwd("t", "prefill", 0, torch.tensor([[1, 2, 3]]))[:20])
        await w.drain()
        w.close()
        await w.wait_closed()
        # a well-framed bad request: 4xx answer, connection stays usable
        async with StageClient(srv.urls[0], transport="tcp") as c:
            with pytest.raises(StageRejectedError, match="unknown request id") as err:
                await c.forward("ghost", "decode", 3, [1])
            assert err.value.status == 404
            r = await c.forward("r", "prefill", 0, [1, 2, 3])
            assert r.token_id is not None and len(c._tcp_pool) == 1  # same connection reused
            assert await c.sink({"x": torch.zeros(1000)}) > 4000
            got = await c.forward("r", "decode", 3, [r.token_id])
            assert got.length == 4
        async with StageClient(srv.urls[0], transport="http") as c:
            assert (await c.health())["status"] == "ok"
            assert 'status="400"} 1' in await c.metrics()


@pytest.mark.parametrize("transport", ["tcp", "http"])
async def test_a_stage_that_does_not_answer_in_time_raises_stage_timeout(tiny_model, transport):
    from testbed.errors import StageTimeoutError

    path = tiny_model("phi3")
    gated = _Gate(LayerRangeExecutor(path, 0, 4))
    server = StageServer(StageConfig(str(path), 0, 4), gated)
    await server.start()
    try:
        async with StageClient(server.url, transport=transport, timeout_s=5) as c:
            with pytest.raises(StageTimeoutError, match="no answer to prefill") as err:
                await c.forward("slow", "prefill", 0, [1, 2, 3], timeout_s=0.3)
            assert isinstance(err.value, TimeoutError)
            gated.gate.set()
            r = await c.forward("other", "prefill", 0, [1, 2, 3])  # keeps serving
            assert r.token_id is not None
    finally:
        gated.gate.set()
        await server.aclose()


async def test_auto_transport_falls_back_to_http_when_the_tensor_port_is_closed(tiny_model):
    path = tiny_model("phi3")
    async with Servers(path, []) as srv:
        server = srv.servers[0]
        server._tensor_server.close()  # announced in /info, but refuses connections
        await server._tensor_server.wait_closed()
        async with StageClient(srv.urls[0]) as c:
            r = await c.forward("r", "prefill", 0, [1, 2, 3])
            assert r.token_id is not None and c._tcp_port is None  # went over HTTP
        async with StageClient(srv.urls[0], transport="tcp") as c:
            with pytest.raises(StageError, match="tensor port"):
                await c.forward("r2", "prefill", 0, [1, 2, 3])
