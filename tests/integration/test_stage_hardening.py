"""A stage server under hostile input: bounded memory, 4xx with a reason, good requests served.

Real stage servers on loopback with the echo executor (no model); the goal test runs `testbed
stage serve` on the tiny model as a process and reads its RSS from /proc.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import torch

from testbed.broker.echo import EchoExecutor
from testbed.stage.limits import InputLimits
from testbed.stage.server import StageConfig, StageServer
from testbed.stage.wire import MAGIC, decode, encode

REPO = Path(__file__).resolve().parents[2]
HIDDEN = 8  # the echo's hidden size: a middle stage takes float32[1, q, 8]


def echo_server(start: int = 1, end: int = 4, compute_s: float = 0.0, **cfg) -> StageServer:
    ex = EchoExecutor(start, end, compute_s=compute_s, max_requests=cfg.get("max_requests", 256))
    return StageServer(StageConfig("echo", start, end, **cfg), ex)


def fwd(rid: str, kind: str, pos: int, x: torch.Tensor, **meta) -> bytes:
    return encode({"request_id": rid, "kind": kind, "start_pos": pos, **meta}, {"input": x})


async def post(url: str, body: bytes, path: str = "/forward") -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s, s.post(url + path, data=body) as resp:
        return resp.status, await resp.read()


async def partial_upload(port: int, body: bytes, *, announce: int, path: str = "/forward"):
    """An HTTP POST that announces ``announce`` body bytes and sends only ``body``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {announce}\r\n\r\n"
    writer.write(head.encode() + body)
    await writer.drain()
    return reader, writer


async def http_answer(reader: asyncio.StreamReader, timeout_s: float = 5.0) -> bytes:
    """The raw HTTP answer on a connection (status line, headers, JSON body)."""
    data = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)
    length = int(data.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    return data + await asyncio.wait_for(reader.readexactly(length), timeout_s)


async def until(cond, timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


async def tcp_answer(reader: asyncio.StreamReader, timeout_s: float = 5.0):
    prefix = await asyncio.wait_for(reader.readexactly(8), timeout_s)
    (n,) = struct.unpack("<I", prefix[4:])
    return decode(prefix + await asyncio.wait_for(reader.readexactly(n), timeout_s))


# ------------------------------------------------------------------------------------- HTTP
async def test_stalled_uploads_take_no_queue_place_and_are_dropped_after_the_timeout():
    inputs = InputLimits(read_timeout_s=1.0)
    async with echo_server(compute_s=0.05, max_inflight=1, max_queue=8, inputs=inputs) as srv:
        body = fwd("s", "prefill", 0, torch.zeros(1, 100, HIDDEN))
        stalled = [
            await partial_upload(srv.port, body[:500], announce=len(body)) for _ in range(10)
        ]
        await until(lambda: srv.intake.budget.in_use_bytes > 0)
        goods = [fwd(f"g{i}", "prefill", 0, torch.zeros(1, 3, HIDDEN)) for i in range(6)]
        answers = await asyncio.gather(*(post(srv.url, g) for g in goods))  # 1 runs, 5 wait
        assert [status for status, _ in answers] == [200] * 6, answers
        for reader, writer in stalled:  # each stalled upload: dropped with a 408 and a reason
            answer = await http_answer(reader)
            assert b" 408 " in answer.split(b"\r\n")[0] and b"upload dropped" in answer
            writer.close()
            await writer.wait_closed()
        assert srv.intake.budget.in_use_bytes == 0


async def test_a_client_that_disconnects_mid_body_leaves_no_error_and_no_memory(caplog):
    caplog.set_level(logging.ERROR)
    async with echo_server() as srv:
        body = fwd("d", "prefill", 0, torch.zeros(1, 1000, HIDDEN))
        for _ in range(3):
            _, writer = await partial_upload(srv.port, body[: len(body) // 2], announce=len(body))
            await until(lambda: srv.intake.budget.in_use_bytes > 0)
            writer.close()
            await until(lambda: srv.intake.budget.in_use_bytes == 0)
        status, _ = await post(srv.url, fwd("ok", "prefill", 0, torch.zeros(1, 3, HIDDEN)))
        assert status == 200
    assert not [r for r in caplog.records if r.name.startswith("aiohttp")], caplog.text


async def test_payloads_over_the_budget_wait_then_get_busy_and_get_in_once_it_frees():
    # budget 256 KiB; a middle echo stage's largest input is 4096 x 8 x 4 = 128 KiB
    inputs = InputLimits(mem_budget_bytes=256 << 10, budget_wait_s=0.3, read_timeout_s=1.5)
    async with echo_server(inputs=inputs) as srv:
        big = fwd("b", "prefill", 0, torch.zeros(1, 4000, HIDDEN))
        holders = [await partial_upload(srv.port, big[:300], announce=len(big)) for _ in range(2)]
        await until(lambda: srv.intake.budget.in_use_bytes == 2 * 4000 * HIDDEN * 4)
        status, text = await post(srv.url, big)
        assert status == 429 and json.loads(text)["code"] == "busy"
        assert b"memory budget" in text
        await until(lambda: srv.intake.budget.in_use_bytes == 0, 5)  # stalled ones dropped
        assert (await post(srv.url, big))[0] == 200
        for _, w in holders:
            w.close()


async def test_an_announcement_over_the_stage_input_bound_is_413_before_allocating():
    async with echo_server() as srv:
        too_big = fwd("x", "prefill", 0, torch.zeros(1, 5000, HIDDEN))  # > 4096 tokens
        status, text = await post(srv.url, too_big)
        assert status == 413 and b"exceeds stage stage-1-4's limit of 131072" in text
        status, text = await post(srv.url, encode({}, {"x": torch.zeros(200_000)}), "/sink")
        assert status == 200  # a sink may be larger than an input, up to the budget


async def test_deep_json_and_non_finite_hidden_states_are_400_bad_input():
    async with echo_server() as srv:
        for body in (b"[" * 100_000 + b"]" * 100_000, b'{"request_id": ' + b"[" * 50_000):
            status, text = await post(srv.url, body, "/release")
            assert status in (400, 413) and json.loads(text)["code"] == "bad_input"
        for bad in (float("nan"), float("inf"), float("-inf")):
            x = torch.zeros(1, 3, HIDDEN)
            x[0, 1, 2] = bad
            status, text = await post(srv.url, fwd("n", "prefill", 0, x))
            assert status == 400 and b"NaN or Inf" in text, text
        header = b'{"meta":' + b"[" * 30_000 + b"]" * 30_000 + b"}"
        status, text = await post(srv.url, struct.pack("<4sI", MAGIC, len(header)) + header)
        assert status == 400 and b"nested too deeply" in text
        assert srv.executor.request_ids == []  # nothing was computed
        assert (await post(srv.url, fwd("n", "prefill", 0, torch.zeros(1, 3, HIDDEN))))[0] == 200


# ------------------------------------------------------------------------------ cache slots
async def test_a_flood_of_abandoned_prefills_does_not_lock_out_good_requests():
    async with echo_server(max_requests=4, evict_idle_s=0.3) as srv:
        one = torch.zeros(1, 1, HIDDEN)
        for i in range(4):  # fresh ids that never continue
            assert (await post(srv.url, fwd(f"junk{i}", "prefill", 0, one)))[0] == 200
        status, text = await post(srv.url, fwd("good", "prefill", 0, one))
        assert status == 503 and json.loads(text)["code"] == "cache_full"  # none idle enough
        await asyncio.sleep(0.4)
        assert (await post(srv.url, fwd("good", "prefill", 0, one)))[0] == 200
        for pos in range(1, 4):  # a live request is not evicted by newcomers
            await asyncio.sleep(0.1)
            assert (await post(srv.url, fwd(f"new{pos}", "prefill", 0, one)))[0] == 200
            assert (await post(srv.url, fwd("good", "decode", pos, one)))[0] == 200
        assert "good" in srv.executor.request_ids and "junk0" not in srv.executor.request_ids
        assert srv._metrics.evicted == 4  # the four junk caches, oldest first


# ------------------------------------------------------------------------------ tensor port
async def test_tensor_port_refuses_an_oversized_announcement_without_allocating():
    async with echo_server() as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.tensor_port)
        header = json.dumps(
            {
                "meta": {"op": "forward", "request_id": "x", "kind": "prefill", "start_pos": 0},
                "tensors": [{"name": "input", "dtype": "float32", "shape": [1, 1 << 20, HIDDEN]}],
            }
        ).encode()
        writer.write(struct.pack("<4sI", MAGIC, len(header)) + header)  # 32 MiB announced
        await writer.drain()
        answer = await tcp_answer(reader)
        assert answer.meta["status"] == 413 and answer.meta["code"] == "bad_input"
        assert srv.intake.budget.in_use_bytes == 0
        writer.close()


async def test_tensor_port_drops_a_stalled_sender_and_caps_connections():
    inputs = InputLimits(read_timeout_s=0.4, max_connections=2)
    async with echo_server(inputs=inputs) as srv:
        body = fwd("s", "prefill", 0, torch.zeros(1, 1000, HIDDEN))
        r1, w1 = await asyncio.open_connection("127.0.0.1", srv.tensor_port)
        w1.write(body[:1000])  # header and a little payload, then nothing
        await w1.drain()
        await until(lambda: srv.intake.budget.in_use_bytes == 1000 * HIDDEN * 4)
        r2, w2 = await asyncio.open_connection("127.0.0.1", srv.tensor_port)
        r3, w3 = await asyncio.open_connection("127.0.0.1", srv.tensor_port)  # one too many
        answer = await tcp_answer(r3)
        assert answer.meta["status"] == 429 and "max 2" in answer.meta["error"]
        assert await asyncio.wait_for(r1.read(), 5) == b""  # the stalled one is cut off
        assert srv.intake.budget.in_use_bytes == 0
        w2.write(fwd("ok", "prefill", 0, torch.zeros(1, 3, HIDDEN)))  # the other one works
        assert (await tcp_answer(r2)).meta["status"] == 200
        for w in (w1, w2, w3):
            w.close()


async def test_a_client_refused_by_the_connection_cap_hears_busy_not_a_reset():
    """The port answers 429 busy to a connection over its cap, often before the client has
    sent anything: the client must report that answer (retry later), not a closed connection
    (which would mark the node down)."""
    from testbed.stage.client import StageClient
    from testbed.stage.tensor_port import open_connection
    from testbed.stage.wire import WireLimits, encode_parts

    inputs = InputLimits(max_connections=1)
    async with echo_server(start=0, end=2, inputs=inputs) as srv, StageClient(srv.url) as a:
        await a.forward("a", "prefill", 0, [5, 6, 7])  # its connection stays pooled
        conn = await open_connection("127.0.0.1", srv.tensor_port, WireLimits())
        await asyncio.sleep(0.2)  # the refusal arrives before the request, as under load
        meta = {"op": "forward", "request_id": "b", "kind": "prefill", "start_pos": 0}
        answer = await conn.request(encode_parts(meta, {"input": torch.tensor([[5, 6, 7]])}))
        assert answer.meta["status"] == 429 and answer.meta["code"] == "busy"
        assert not conn.usable
        # refused after the request was sent: the answer says the port closes it, so the
        # client does not pool it (its next step would find the connection closed: EOF)
        late = await open_connection("127.0.0.1", srv.tensor_port, WireLimits())
        meta["request_id"] = "c"
        answer = await late.request(encode_parts(meta, {"input": torch.tensor([[5, 6, 7]])}))
        assert answer.meta["status"] == 429 and answer.meta["closing"] is True
        assert not late.usable


async def test_a_client_keeps_a_bounded_number_of_idle_connections():
    """Steps in flight at once each take a connection; once they end, at most
    MAX_IDLE_CONNECTIONS stay open (a stage's port cap is shared by all its senders)."""
    from testbed.stage.client import MAX_IDLE_CONNECTIONS, StageClient

    async with echo_server(start=0, end=2) as srv, StageClient(srv.url) as c:
        n = MAX_IDLE_CONNECTIONS + 8
        await asyncio.gather(*(c.forward(f"r{i}", "prefill", 0, [5, 6]) for i in range(n)))
        await until(lambda: len(srv._tensor_server._conns) <= MAX_IDLE_CONNECTIONS)
        assert len(c._tcp_pool) == MAX_IDLE_CONNECTIONS


# -------------------------------------------------------------------------------------- CLI
def run_cli(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "testbed", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=env,
        cwd=REPO,
    )


@pytest.mark.model
def test_stage_serve_bad_setup_is_one_line_and_exit_2(tiny_model, tmp_path):
    model = str(tiny_model("phi3"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("[1, 2]")
    strings = tmp_path / "strings"
    strings.mkdir()
    cfg = json.loads((tiny_model("phi3") / "config.json").read_text())
    (strings / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": "4"}))
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        cases = [
            (["--model-dir", str(bad)], "must be a mapping"),
            (["--model-dir", str(strings)], "num_hidden_layers: Input should be a valid integer"),
            (["--model-dir", model, "--port", str(port)], f"port {port} on 127.0.0.1 is already"),
            (["--model-dir", model, "--host", "no-such-host.invalid"], "--host"),
            (["--model-dir", model, "--host", "192.0.2.1"], "--host"),  # not ours
            (["--model-dir", model, "--max-requests", "-1"], "--max-requests"),
            (["--model-dir", model, "--mem-budget", "lots"], "--mem-budget"),
        ]
        for args, match in cases:
            got = run_cli("stage", "serve", "--blocks", "0:4", *args)
            lines = got.stderr.strip().splitlines()
            assert got.returncode == 2, (args, got.stderr)
            assert len(lines) == 1 and lines[0].startswith("error:") and match in lines[0], lines
    finally:
        busy.close()


# ------------------------------------------------------------------------------------- goal
def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def announce(tokens: int) -> bytes:
    """A tensor-port forward header announcing float32[1, tokens, 64], without its payload."""
    header = json.dumps(
        {
            "meta": {"op": "forward", "request_id": "h", "kind": "prefill", "start_pos": 0},
            "tensors": [{"name": "input", "dtype": "float32", "shape": [1, tokens, 64]}],
        }
    ).encode()
    return struct.pack("<4sI", MAGIC, len(header)) + header


@pytest.mark.model
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
async def test_rss_stays_within_the_budget_under_a_hostile_mix_while_good_requests_are_served(
    tiny_model,
):
    budget = 8 << 20
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "testbed", "stage", "serve", "--model-dir"],
        str(tiny_model("phi3")),
        *["--blocks", "1:4", "--mem-budget", str(budget), "--read-timeout-s", "1"],
        *["--max-connections", "16", "--threads", "1"],
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), 120))
        url, port, tport, pid = ready["url"], ready["port"], ready["tensor_port"], ready["pid"]
        hidden = torch.randn(1, 16, 64)

        async def good(i: int) -> list[tuple[int, bytes]]:
            rid = f"good{i}"
            answers = [await post(url, fwd(rid, "prefill", 0, hidden))]
            for pos in range(16, 20):
                answers.append(await post(url, fwd(rid, "decode", pos, hidden[:, :1])))
            answers.append(await post(url, json.dumps({"request_id": rid}).encode(), "/release"))
            return [(status, b"" if status == 200 else text) for status, text in answers]

        assert {status for status, _ in await good(-1)} == {200}  # warm up
        base = rss_bytes(pid)
        peak = base
        sampling = True

        async def sample() -> None:
            nonlocal peak
            while sampling:
                peak = max(peak, rss_bytes(pid))
                await asyncio.sleep(0.01)

        big = fwd("s", "prefill", 0, torch.zeros(1, 4000, 64))  # ~1 MB: the stage's largest
        writers: list[asyncio.StreamWriter] = []

        async def hostile() -> None:
            for _ in range(2):
                for _ in range(10):  # stalled uploads (HTTP and tensor port)
                    _, w = await partial_upload(port, big[: 64 << 10], announce=len(big))
                    writers.append(w)
                    _, w = await asyncio.open_connection("127.0.0.1", tport)
                    w.write(big[: 64 << 10])
                    writers.append(w)
                for _ in range(5):  # announcements of 100 MB (over the stage's bound)
                    _, w = await asyncio.open_connection("127.0.0.1", tport)
                    w.write(announce(400_000))
                    writers.append(w)
                    _, w = await partial_upload(port, announce(400_000), announce=102_400_200)
                    writers.append(w)
                for _ in range(10):  # aborted uploads
                    _, w = await partial_upload(port, big[: len(big) // 2], announce=len(big))
                    w.close()
                for _ in range(10):  # junk JSON and junk frames
                    await post(url, b"[" * 60_000, "/release")
                    await post(url, b"\xff" * 5000, "/release")
                    await post(url, b"TBW1junk")
                await asyncio.sleep(0.3)

        sampler = asyncio.create_task(sample())
        attack = asyncio.create_task(hostile())
        results = await asyncio.gather(*(good(i) for i in range(20)))
        await attack
        await asyncio.sleep(1.5)  # stalled senders time out
        sampling = False
        await sampler
        for w in writers:
            w.close()
        refused = [a for answers in results for a in answers if a[0] != 200]
        assert not refused, refused
        grown = peak - base
        assert grown < budget + (40 << 20), f"RSS grew {grown >> 20} MiB (budget {budget >> 20})"
        async with aiohttp.ClientSession() as s, s.get(url + "/metrics") as resp:
            metrics = await resp.text()
        assert 'status="413"' in metrics and 'status="400"' in metrics
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)
