"""``POST /speed`` on stage servers in this process: an emulated stage paces its steps at a
fraction of its device's speed (a timeline slowdown), keeps it across ``/load``, and a real
stage refuses it (its speed is its CPU quota's)."""

from __future__ import annotations

import aiohttp
import pytest
import torch

from testbed.stage.server import StageConfig, StageServer
from testbed.stage.wire import encode
from tests.integration.test_stage_load import _emulation, load

pytestmark = pytest.mark.model


async def post_speed(url, body):
    async with aiohttp.ClientSession() as s, s.post(url + "/speed", json=body) as resp:
        return resp.status, await resp.json()


async def prefill(url, rid):
    msg = encode(
        {"request_id": rid, "kind": "prefill", "start_pos": 0},
        {"input": torch.tensor([[1, 2, 3, 4]])},
    )
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/forward", data=msg) as resp:
            assert resp.status == 200, await resp.text()
        async with s.post(url + "/release", json={"request_id": rid}) as resp:
            assert resp.status == 200
        async with s.get(url + "/emulation") as resp:
            rep = await resp.json()
    kind, tokens, _ctx, predicted, emulated, _real = rep["steps"][-1]
    assert (kind, tokens) == ("prefill", 4)
    return predicted, emulated, rep["speed"]


@pytest.fixture
def model(tiny_model):
    return tiny_model("phi3", layers=4, heads=4, kv_heads=2)


async def test_an_emulated_stage_runs_at_the_speed_it_is_given(model):
    # a Jetson Orin Nano prefilling 4 tokens of 2 Phi-3-medium blocks: tens of ms, so the
    # window (not the stand-in's work) sets the step time at speed 1 and at speed 0.5
    server = StageServer(
        StageConfig(str(model), 0, 2, name="s", emulation=_emulation("jetson-orin-nano"))
    )
    await server.start()
    try:
        url = server.url
        base, held, speed = await prefill(url, "a")
        assert speed == 1.0 and held >= base * 0.98
        for body, match in (
            ({}, "JSON body"),
            ({"speed": 0}, "got speed 0"),
            ({"speed": -1}, "got speed -1"),
            ({"speed": 65}, "got speed 65"),
            ({"speed": "0.5"}, "got speed '0.5'"),
            ({"speed": True}, "got speed True"),
            ({"speed": 0.5, "x": 1}, "JSON body"),
        ):
            status, err = await post_speed(url, body)
            assert status == 400 and err["code"] == "bad_input", (body, err)
            assert match in err["error"], (body, err)
        status, body = await post_speed(url, {"speed": 0.5})
        assert status == 200 and body["speed"] == 0.5, body
        slow, held, speed = await prefill(url, "b")
        assert speed == 0.5
        assert slow == pytest.approx(2 * base, rel=1e-9)  # the device's window / 0.5
        assert held >= slow * 0.98  # and the step was held for it
        # a plan change on the same stage keeps the slowdown (the new blocks' window / 0.5)
        status, _ = await load(url, {"start": 0, "end": 1})
        assert status == 200
        one, _held, speed = await prefill(url, "c")
        assert speed == 0.5
        assert one == pytest.approx(2 * server.executor.timing.step_s("prefill", 4, 0))  # type: ignore[attr-defined]
        # a range loaded beside it (a re-partitioning's overlap) runs at that speed too, and a
        # new speed reaches both
        status, _ = await load(url, {"start": 0, "end": 2, "keep": True})
        assert status == 200
        gens = server.executor
        held = [gens.executor(n) for n in gens.numbers]  # type: ignore[attr-defined]
        assert len(held) == 2 and [e.speed for e in held] == [0.5, 0.5]
        status, _ = await post_speed(url, {"speed": 0.25})
        assert status == 200 and [e.speed for e in held] == [0.25, 0.25]
    finally:
        await server.aclose()


async def test_a_real_stage_refuses_a_speed(model):
    server = StageServer(StageConfig(str(model), 0, 2, name="s"))
    await server.start()
    try:
        status, err = await post_speed(server.url, {"speed": 0.5})
        assert status == 400 and "not emulated" in err["error"], err
    finally:
        await server.aclose()


async def test_a_timeline_slowdown_of_an_emulated_node_goes_to_its_stage(
    model, tmp_path, monkeypatch
):
    from testbed.runtime import control
    from testbed.runtime.base import NodeEndpoint, RunningTestbed, load_running

    monkeypatch.setenv("TESTBED_STATE_DIR", str(tmp_path))
    cfg = StageConfig(str(model), 0, 4, name="e1", emulation=_emulation("jetson-orin-nano"))
    server = StageServer(cfg)
    await server.start()
    try:
        ep = NodeEndpoint(
            "e1", "edge", 0, server.url, 0, 4, "emulated Jetson Orin Nano", "127.0.0.1", 9101
        )
        assert ep.emulated
        tb = RunningTestbed("tb0000beef", "local", "app", "t.yaml", "t", str(model), {"e1": ep})
        tb.save()
        await control.set_node_speed(tb, "e1", 0.25)
        assert server.executor.speed == 0.25  # type: ignore[attr-defined]
        assert load_running(tb.run_id).nodes["e1"].speed == 0.25  # recorded in the state
        # a crashed node is only recorded: its restarted stage is told once healthy
        await control.set_node_speed(tb, "e1", 0.5, crashed=True)
        assert server.executor.speed == 0.25  # type: ignore[attr-defined]
        assert tb.nodes["e1"].speed == 0.5
    finally:
        await server.aclose()
    # no stage answers: the event fails with the node and the reason
    with pytest.raises(control.RuntimeBackendError, match="e1: setting its emulated speed"):
        await control.set_node_speed(tb, "e1", 0.5)


async def _step(s, url, rid, kind, pos, ids):
    msg = encode(
        {"request_id": rid, "kind": kind, "start_pos": pos}, {"input": torch.tensor([ids])}
    )
    async with s.post(url + "/forward", data=msg) as resp:
        assert resp.status == 200, await resp.text()


async def test_the_emulation_report_covers_both_ranges_of_an_overlap(model):
    # a migration's overlap: a request in flight steps on the old range while a new one
    # prefills on the range loaded beside it; GET /emulation reports every step of both, in
    # order, with the indices taken before the migration still valid after the unload
    server = StageServer(
        StageConfig(str(model), 0, 2, name="s", emulation=_emulation("jetson-orin-nano"))
    )
    await server.start()
    url = server.url
    try:
        async with aiohttp.ClientSession() as s:

            async def report(since):
                async with s.get(url + "/emulation", params={"since": since}) as resp:
                    assert resp.status == 200, await resp.text()
                    return await resp.json()

            since = (await report(0))["steps_total"]  # the warm-up's steps come before
            await _step(s, url, "old", "prefill", 0, [1, 2, 3, 4, 5])
            status, _ = await load(url, {"start": 0, "end": 1, "keep": True})
            assert status == 200
            await _step(s, url, "old", "decode", 5, [6])  # on blocks 0:2, its cache's
            await _step(s, url, "new", "prefill", 0, [1, 2, 3])  # on blocks 0:1
            during = await report(since)
            steps = [(k, q, c) for k, q, c, *_ in during["steps"]]
            assert steps == [("prefill", 5, 0), ("decode", 1, 5), ("prefill", 3, 0)]
            old_window, new_window = during["steps"][0][3], during["steps"][2][3]
            assert new_window < old_window  # one block's window, not two blocks'
            assert during["steps_total"] == since + 3
            async with s.post(url + "/release", json={"request_id": "old"}) as resp:
                assert resp.status == 200
            async with s.post(url + "/unload", json={"start": 0, "end": 2}) as resp:
                assert resp.status == 200, await resp.text()
            await _step(s, url, "new", "decode", 3, [4])
            after = await report(since)
            assert after["steps"][:3] == during["steps"]
            assert [(k, q, c) for k, q, c, *_ in after["steps"][3:]] == [("decode", 1, 3)]
    finally:
        await server.aclose()
