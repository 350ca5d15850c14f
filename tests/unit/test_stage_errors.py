"""Every stage error code, end to end: a real stage server (the echo executor) on loopback
answers, and the client raises the typed error with that code, over HTTP and the tensor port;
the broker marks a node down only when it is gone (unreachable, timeout, shutting down)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch

from testbed.broker.echo import EchoExecutor
from testbed.errors import StageError, StageTimeoutError
from testbed.model.contract import StepOutput
from testbed.stage.client import StageClient
from testbed.stage.errors import (
    ErrorCode,
    StageProtocolError,
    StageRejectedError,
    StageUnreachableError,
    marks_node_down,
    status_and_code,
)
from testbed.stage.server import StageConfig, StageServer
from testbed.stage.wire import encode

TRANSPORTS = ["http", "tcp"]


class _Failing(EchoExecutor):
    """An echo whose step fails inside "the model" (a bug, an OOM)."""

    def step(self, request_id: str, kind: str, x: torch.Tensor, start_pos: int) -> StepOutput:
        raise RuntimeError("CUDA out of memory (on purpose)")

    def step_batch(self, steps: Any) -> list[StepOutput | Exception]:
        raise RuntimeError("CUDA out of memory (on purpose)")


async def _server(ex: EchoExecutor, **cfg: object) -> StageServer:
    server = StageServer(StageConfig("echo", ex.start, ex.end, **cfg), executor=ex)  # type: ignore[arg-type]
    await server.start()
    return server


@pytest.fixture
async def echo() -> AsyncIterator[StageServer]:
    server = await _server(EchoExecutor(0, 2, num_blocks=4, max_requests=1))
    try:
        yield server
    finally:
        await server.aclose()


async def _rejected(client: StageClient, *args: object, **kw: object) -> StageRejectedError:
    with pytest.raises(StageRejectedError) as info:
        await client.forward(*args, **kw)  # type: ignore[arg-type]
    return info.value


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_each_refusal_arrives_as_its_code(echo: StageServer, transport: str) -> None:
    async with StageClient(echo.url, transport=transport, name="edge-1") as c:
        err = await _rejected(c, "ghost", "decode", 3, [1])
        assert (err.status, err.code, err.stage) == (404, ErrorCode.UNKNOWN_REQUEST, "edge-1")
        err = await _rejected(c, "r", "prefill", 0, [1, 512 + 7])
        assert (err.status, err.code) == (400, ErrorCode.BAD_INPUT)
        err = await _rejected(c, "r", "prefill", 2, [1, 2])
        assert (err.status, err.code) == (409, ErrorCode.BAD_POSITION)
        await c.forward("r", "prefill", 0, [1, 2, 3])
        err = await _rejected(c, "r", "decode", 7, [4])
        assert (err.status, err.code) == (409, ErrorCode.BAD_POSITION)
        err = await _rejected(c, "s", "prefill", 0, [1, 2])  # max_requests=1: slot taken
        assert (err.status, err.code) == (503, ErrorCode.CACHE_FULL)
        assert err.code.retry_later and not marks_node_down(err)
        assert await c.release("r")
        await c.forward("s", "prefill", 0, [1, 2])  # the slot is free again
        echo.stop_admitting()
        err = await _rejected(c, "s", "decode", 2, [4])
        assert (err.status, err.code) == (503, ErrorCode.SHUTTING_DOWN)
        assert marks_node_down(err)
    async with StageClient(echo.url, transport="http") as c:
        with pytest.raises(StageRejectedError) as info:
            await c.health()
        assert info.value.code == ErrorCode.SHUTTING_DOWN


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_failure_inside_the_model_is_a_model_error(transport: str) -> None:
    server = await _server(_Failing(0, 4, num_blocks=4))
    try:
        async with StageClient(server.url, transport=transport) as c:
            err = await _rejected(c, "r", "prefill", 0, [1, 2])
            assert (err.status, err.code) == (500, ErrorCode.MODEL_ERROR)
            assert "out of memory" in err.reason and not marks_node_down(err)
    finally:
        await server.aclose()


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_full_queue_is_busy(transport: str) -> None:
    server = await _server(EchoExecutor(0, 4, num_blocks=4, compute_s=0.5), max_queue=0)
    try:
        async with StageClient(server.url, transport=transport) as c:
            running = asyncio.create_task(c.forward("a", "prefill", 0, [1]))
            async with StageClient(server.url, transport=transport) as c2:
                for _ in range(200):  # until "a" runs on the worker
                    if server._running == 1:
                        break
                    await asyncio.sleep(0.005)
                err = await _rejected(c2, "b", "prefill", 0, [1])
            assert (err.status, err.code) == (429, ErrorCode.BUSY)
            assert err.code.retry_later and not marks_node_down(err)
            assert (await running).token_id is not None
    finally:
        await server.aclose()


async def test_malformed_messages_are_bad_input_over_http(echo: StageServer) -> None:
    async with StageClient(echo.url) as c:
        status, body = await c.post_raw("/forward", b"NOPE" + b"\0" * 20)
        assert status == 400 and b'"code": "bad_input"' in body
        meta = {"request_id": "r", "kind": "prefill", "start_pos": 0, "extra": 1}
        status, body = await c.post_raw("/forward", encode(meta, {"input": torch.ones(1, 1)}))
        assert status == 400 and b'"code": "bad_input"' in body


async def test_no_answer_is_unreachable_or_timeout() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with StageClient(f"http://127.0.0.1:{port}", name="gone") as c:
        with pytest.raises(StageUnreachableError) as info:
            await c.forward("r", "prefill", 0, [1])
    assert isinstance(info.value, ConnectionError) and info.value.stage == "gone"
    assert marks_node_down(info.value)
    server = await _server(EchoExecutor(0, 4, num_blocks=4, compute_s=1.0))
    try:
        async with StageClient(server.url, name="slow") as c:
            with pytest.raises(StageTimeoutError) as tinfo:
                await c.forward("r", "prefill", 0, [1], timeout_s=0.2)
        assert isinstance(tinfo.value, TimeoutError) and tinfo.value.stage == "slow"
        assert marks_node_down(tinfo.value)
    finally:
        await server.aclose()


def test_only_a_gone_node_is_marked_down() -> None:
    statuses = {
        ErrorCode.BUSY: 429,
        ErrorCode.CACHE_FULL: 503,
        ErrorCode.SHUTTING_DOWN: 503,
        ErrorCode.BAD_INPUT: 400,
        ErrorCode.BAD_POSITION: 409,
        ErrorCode.UNKNOWN_REQUEST: 404,
        ErrorCode.MODEL_ERROR: 500,
        ErrorCode.IN_USE: 409,  # a /load while requests are held
    }
    assert set(statuses) == set(ErrorCode)
    for code, status in statuses.items():
        err = StageRejectedError("n", status, code, "shutting down")  # text never decides
        assert marks_node_down(err) == (code == ErrorCode.SHUTTING_DOWN), code
    assert not marks_node_down(StageRejectedError("n", 503, None, "stage is shutting down"))
    assert not marks_node_down(StageProtocolError("n", "malformed response"))
    assert not marks_node_down(StageError("anything"))
    assert marks_node_down(StageUnreachableError("n", "refused"))
    assert marks_node_down(StageTimeoutError("no answer"))


def test_the_status_table_maps_executor_errors() -> None:
    from testbed.model.contract import (
        CacheFullError,
        CacheStateError,
        ExecutorInputError,
        UnknownRequestError,
    )
    from testbed.stage.wire import WireFormatError

    assert status_and_code(UnknownRequestError("x")) == (404, ErrorCode.UNKNOWN_REQUEST)
    assert status_and_code(CacheStateError("x")) == (409, ErrorCode.BAD_POSITION)
    assert status_and_code(ExecutorInputError("x")) == (400, ErrorCode.BAD_INPUT)
    assert status_and_code(CacheFullError("x")) == (503, ErrorCode.CACHE_FULL)
    assert status_and_code(WireFormatError("x", too_large=True)) == (413, ErrorCode.BAD_INPUT)
    assert status_and_code(RuntimeError("x")) == (500, ErrorCode.MODEL_ERROR)


async def test_the_broker_transport_waits_out_a_full_cache(echo: StageServer) -> None:
    """cache_full is backpressure: the transport backs off and retries, it does not fail."""
    from testbed.broker.http import HttpStageTransport

    transport = HttpStageTransport({"edge-1": echo.url})
    await transport.start()
    try:
        await transport.forward("edge-1", "a", "prefill", 0, [1, 2], timeout_s=5)
        waiting = asyncio.create_task(
            transport.forward("edge-1", "b", "prefill", 0, [1, 2], timeout_s=5)
        )
        while transport.busy_retries < 2:  # noqa: ASYNC110 - polls a counter
            await asyncio.sleep(0.005)
        assert not waiting.done()
        await transport.release("edge-1", "a", timeout_s=5)
        assert (await waiting).output is not None
        with pytest.raises(StageRejectedError) as info:  # any other code propagates at once
            await transport.forward("edge-1", "c", "decode", 3, [1], timeout_s=5)
        assert info.value.code == ErrorCode.UNKNOWN_REQUEST and info.value.stage == "edge-1"
    finally:
        await transport.aclose()
