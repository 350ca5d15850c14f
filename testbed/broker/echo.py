"""Echo stages: the real stage server (:class:`testbed.stage.server.StageServer`, real wire
format, real queueing and error codes) with a model-free executor, for broker tests and the
broker benchmark.

:class:`EchoExecutor` keeps per-request "caches" exactly as the layer executor does (a prefill
opens one at position 0, each decode must come at the cache's length, a release frees it; a
wrong position is a 409, an unknown request a 404), so a broker that loses track of a route or
a position fails loudly. It computes nothing: hidden states are zeros, the last stage's token
is a fixed function of the position (EOS included, so forced lengths are exercised), and a
step takes ``compute_s`` seconds (a sleep on the server's worker thread; 0 = instant).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from testbed.model.executor import (
    CacheFullError,
    CacheStateError,
    ExecutorInputError,
    StepOutput,
    UnknownRequestError,
)

EOS_ID = 2


@dataclass(frozen=True)
class EchoInfo:
    path: str = "echo"
    name: str = "echo"
    model_type: str = "echo"
    architecture: str = "Echo"
    num_blocks: int = 4
    hidden_size: int = 8
    vocab_size: int = 512
    max_position_embeddings: int = 4096
    checkpoint_dtype: str = "float32"
    eos_token_ids: tuple[int, ...] = (EOS_ID,)


@dataclass
class EchoExecutor:
    """Executor interface of :class:`testbed.model.executor.LayerRangeExecutor`, no model."""

    start: int
    end: int
    num_blocks: int = 4
    hidden_size: int = 8
    vocab_size: int = 512
    compute_s: float = 0.0  # seconds per step (slept on the worker thread)
    per_token_s: float = 0.0  # + this per input token (prefill costs more than decode)
    max_requests: int = 256
    max_context: int = 4096
    steps: int = 0  # steps served (for tests)
    _lengths: dict[str, int] = field(default_factory=dict)
    _used: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.info = EchoInfo(
            num_blocks=self.num_blocks, hidden_size=self.hidden_size, vocab_size=self.vocab_size
        )
        self.is_first = self.start == 0
        self.is_last = self.end == self.num_blocks
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.param_bytes = 0

    # -- accounting (as LayerRangeExecutor) ----------------------------------------------------
    def kv_bytes(self) -> int:
        return sum(self._lengths.values()) * self.hidden_size * 4

    @property
    def request_ids(self) -> list[str]:
        return list(self._lengths)

    def has_request(self, request_id: str) -> bool:
        return request_id in self._lengths

    def idle_requests(self, idle_s: float) -> list[str]:
        now = time.monotonic()
        return [r for r, t in list(self._used.items()) if now - t > idle_s]

    def release(self, request_id: str) -> bool:
        self._used.pop(request_id, None)
        return self._lengths.pop(request_id, None) is not None

    def check_input(self, kind: str, x: torch.Tensor, start_pos: int, request_id: str) -> None:
        if kind not in ("prefill", "decode"):
            raise ExecutorInputError(f"step kind {kind!r} is not prefill or decode")
        if self.is_first:
            if x.dtype not in (torch.int64, torch.int32) or x.dim() != 2 or x.shape[0] != 1:
                raise ExecutorInputError(
                    f"the first stage takes token ids int64[1, q], got {x.dtype}{list(x.shape)}"
                )
            if x.numel() and (int(x.min()) < 0 or int(x.max()) >= self.vocab_size):
                raise ExecutorInputError(f"token ids must be in [0, {self.vocab_size})")
        elif not x.is_floating_point() or x.dim() != 3 or x.shape[2] != self.hidden_size:
            raise ExecutorInputError(
                f"stage {self.start}:{self.end} takes hidden float[1, q, {self.hidden_size}], "
                f"got {x.dtype}{list(x.shape)}"
            )
        q = x.shape[1]
        if q < 1:
            raise ExecutorInputError("a step needs at least one token")
        length = self._lengths.get(request_id)
        if kind == "prefill":
            if length is not None:
                raise CacheStateError(f"request {request_id!r} already has a cache")
            if start_pos != 0:
                raise CacheStateError(f"prefill starts at position 0, got {start_pos}")
            if len(self._lengths) >= self.max_requests:
                raise CacheFullError(f"stage holds {len(self._lengths)} request caches")
        else:
            if length is None:
                raise UnknownRequestError(f"unknown request id {request_id!r}")
            if q != 1:
                raise ExecutorInputError(f"a decode step carries exactly 1 token, got {q}")
            if start_pos != length:
                raise CacheStateError(
                    f"request {request_id!r}: decode at position {start_pos}, cache holds {length}"
                )
        if start_pos + q > self.max_context:
            raise CacheStateError(f"{start_pos + q} tokens exceed the context")

    def step(self, request_id: str, kind: str, x: torch.Tensor, start_pos: int) -> StepOutput:
        self.check_input(kind, x, start_pos, request_id)
        t0 = time.perf_counter()
        q = int(x.shape[1])
        wait = self.compute_s + self.per_token_s * q
        if wait > 0:
            time.sleep(wait)  # on the server's worker thread, as real compute would be
        self._lengths[request_id] = start_pos + q
        self._used[request_id] = time.monotonic()
        self.steps += 1
        hidden = None if self.is_last else torch.zeros((1, q, self.hidden_size))
        token = echo_token(start_pos + q, self.vocab_size) if self.is_last else None
        return StepOutput(hidden, None, token, start_pos + q, time.perf_counter() - t0)


def echo_token(length: int, vocab_size: int = 512) -> int:
    """The echo's "next token" after ``length`` tokens: EOS every 3rd position."""
    return EOS_ID if length % 3 == 0 else 4 + length % (vocab_size - 4)


@dataclass
class EchoStages:
    """Running echo stage servers: node -> server, urls, executors."""

    servers: dict[str, Any]

    @property
    def urls(self) -> dict[str, str]:
        return {n: s.url for n, s in self.servers.items()}

    def executor(self, node: str) -> EchoExecutor:
        return self.servers[node].executor  # type: ignore[no-any-return]

    async def stop(self, node: str) -> None:
        """Stop one node's server (a crash from the broker's point of view)."""
        await self.servers[node].aclose()


@contextlib.asynccontextmanager
async def echo_stages(
    ranges: Mapping[str, tuple[int, int]],
    *,
    num_blocks: int,
    compute_s: Mapping[str, float] | float = 0.0,
    per_token_s: float = 0.0,
    max_inflight: int = 1,
    max_queue: int = 64,
) -> AsyncIterator[EchoStages]:
    """Start one echo stage server per node on loopback (port 0); stop them all on exit."""
    from testbed.stage.server import StageConfig, StageServer

    servers: dict[str, Any] = {}
    try:
        for node, (a, b) in ranges.items():
            c = compute_s.get(node, 0.0) if isinstance(compute_s, Mapping) else compute_s
            ex = EchoExecutor(a, b, num_blocks=num_blocks, compute_s=c, per_token_s=per_token_s)
            cfg = StageConfig(
                model_dir="echo",
                start=a,
                end=b,
                name=node,
                max_inflight=max_inflight,
                max_queue=max_queue,
            )
            srv = StageServer(cfg, executor=ex)
            await srv.start()
            servers[node] = srv
        yield EchoStages(servers)
    finally:
        for srv in servers.values():
            await srv.aclose()


async def serve_echo(
    node: str, start: int, end: int, num_blocks: int, compute_s: float = 0.0, port: int = 0
) -> None:
    """One echo stage server until SIGTERM/SIGINT or stdin closes; prints one JSON line
    ``{"node", "url", "pid"}`` once listening (benchmarks run stages in their own processes)."""
    import asyncio
    import json
    import os
    import signal
    import sys

    from testbed.stage.server import StageConfig, StageServer

    ex = EchoExecutor(start, end, num_blocks=num_blocks, compute_s=compute_s)
    cfg = StageConfig(model_dir="echo", start=start, end=end, name=node, port=port, max_queue=4096)
    srv = StageServer(cfg, executor=ex)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def until_eof() -> None:
        await reader.read()
        stop.set()

    watcher = asyncio.create_task(until_eof())
    await srv.start()
    try:
        sys.stdout.write(json.dumps({"node": node, "url": srv.url, "pid": os.getpid()}) + "\n")
        sys.stdout.flush()
        await stop.wait()
    finally:
        watcher.cancel()
        await asyncio.wait([watcher])  # its own cancellation, not ours: ours still propagates
        await srv.aclose()


def main(argv: list[str] | None = None) -> None:
    import argparse
    import asyncio

    p = argparse.ArgumentParser(description="serve one echo stage (no model) on loopback")
    p.add_argument("--node", required=True)
    p.add_argument("--blocks", required=True, help="START:END")
    p.add_argument("--num-blocks", type=int, required=True)
    p.add_argument("--compute-s", type=float, default=0.0)
    p.add_argument("--port", type=int, default=0)
    a = p.parse_args(argv)
    start, end = (int(x) for x in a.blocks.split(":"))
    asyncio.run(serve_echo(a.node, start, end, a.num_blocks, a.compute_s, a.port))


if __name__ == "__main__":
    main()
