"""Echo stages: the real stage server (:class:`testbed.stage.server.StageServer`, real wire
format, real queueing and error codes) with a model-free executor, for broker tests and the
broker benchmark.

:class:`EchoExecutor` keeps per-request "caches" exactly as the layer executor does (a prefill
opens one at position 0, each decode must come at the cache's length, a release frees it; a
wrong position is a 409, an unknown request a 404), so a broker that loses track of a route or
a position fails loudly. It computes nothing: hidden states are zeros, the last stage's token
is a fixed function of the position (EOS included, so forced lengths are exercised), and a
step takes ``compute_s`` seconds (a sleep on the server's worker thread; 0 = instant, and
the server then runs the step on its event loop: a thread hop would cost more than the step).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from testbed.model.contract import (
    BatchStep,
    CacheFullError,
    CacheStateError,
    ExecutorInputError,
    StepOutput,
    check_step,
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
    """A :class:`testbed.model.contract.StageExecutor` without a model (thread-safe as the
    contract asks: the request table is guarded by a lock)."""

    start: int
    end: int
    num_blocks: int = 4
    hidden_size: int = 8
    vocab_size: int = 512
    compute_s: float = 0.0  # seconds per step (slept on the worker thread)
    per_token_s: float = 0.0  # + this per input token (prefill costs more than decode)
    max_requests: int = 256
    max_context: int = 4096
    steps: int = 0  # request steps served (for tests)
    batches: list[int] = field(default_factory=list)  # rows of each step_batch (for tests)
    _lengths: dict[str, int] = field(default_factory=dict)
    _used: dict[str, float] = field(default_factory=dict)
    _opening: set[str] = field(default_factory=set)  # prefills running: slots taken
    _partial: set[str] = field(default_factory=set)  # chunked prefills under way
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.info = EchoInfo(
            num_blocks=self.num_blocks, hidden_size=self.hidden_size, vocab_size=self.vocab_size
        )
        self.is_first = self.start == 0
        self.is_last = self.end == self.num_blocks
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.param_bytes = 0

    @property
    def instant(self) -> bool:
        """No compute time: the stage server runs its steps on the loop, not a worker thread."""
        return self.compute_s == 0 and self.per_token_s == 0

    # -- accounting (as LayerRangeExecutor) ----------------------------------------------------
    def kv_bytes(self) -> int:
        with self._lock:
            return sum(self._lengths.values()) * self.hidden_size * 4

    @property
    def request_ids(self) -> list[str]:
        with self._lock:
            return list(self._lengths)

    def has_request(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._lengths

    def idle_requests(self, idle_s: float) -> list[str]:
        now = time.monotonic()
        with self._lock:
            return [r for r, t in self._used.items() if now - t > idle_s]

    def release(self, request_id: str) -> bool:
        with self._lock:
            self._used.pop(request_id, None)
            partial = request_id in self._partial
            self._partial.discard(request_id)
            return self._lengths.pop(request_id, None) is not None or partial

    def check_input(self, kind: str, x: torch.Tensor, start_pos: int, request_id: str) -> None:
        with self._lock:
            self._check_locked(kind, x, start_pos, request_id)

    def _check_locked(self, kind: str, x: torch.Tensor, start_pos: int, request_id: str) -> None:
        check_step(
            kind,
            x,
            start_pos,
            request_id,
            start=self.start,
            end=self.end,
            is_first=self.is_first,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            max_context=self.max_context,
            cached_length=self._lengths.get(request_id),
            held=len(self._lengths) + len(self._opening) + len(self._partial),
            max_requests=self.max_requests,
        )

    def step(self, request_id: str, kind: str, x: torch.Tensor, start_pos: int) -> StepOutput:
        with self._lock:  # check and take the cache slot at once (steps run concurrently)
            self._check_locked(kind, x, start_pos, request_id)
            opening = request_id not in self._lengths
            if opening:
                self._opening.add(request_id)
        try:
            t0 = time.perf_counter()
            q = int(x.shape[1])
            wait = self.compute_s + self.per_token_s * q
            if wait > 0:
                time.sleep(wait)  # on the server's worker thread, as real compute would be
            with self._lock:
                if opening or request_id in self._lengths:  # not one released meanwhile
                    self._lengths[request_id] = start_pos + q
                    self._used[request_id] = time.monotonic()
                self.steps += 1
        finally:
            with self._lock:
                self._opening.discard(request_id)
        hidden = None if self.is_last else torch.zeros((1, q, self.hidden_size))
        token = echo_token(start_pos + q, self.vocab_size) if self.is_last else None
        return StepOutput(hidden, None, token, start_pos + q, time.perf_counter() - t0)

    def step_batch(self, steps: Sequence[BatchStep]) -> list[StepOutput | Exception]:
        """A batched step: one sleep of ``compute_s`` for the whole batch (weights read once)
        plus ``per_token_s`` per token of every row; rows are checked as :meth:`step` does."""
        results: list[StepOutput | Exception | None] = [None] * len(steps)
        ok: list[int] = []
        with self._lock:
            for i, s in enumerate(steps):
                try:
                    self._take_locked(s)
                    ok.append(i)
                except (ExecutorInputError, CacheFullError) as exc:
                    results[i] = exc
        t0 = time.perf_counter()
        tokens = sum(int(steps[i].x.shape[1]) for i in ok)
        wait = (self.compute_s + self.per_token_s * tokens) if ok else 0.0
        if wait > 0:
            time.sleep(wait)  # on the server's worker thread, as real compute would be
        compute_s = time.perf_counter() - t0
        with self._lock:
            self.batches.append(len(ok))
            for i in ok:
                s = steps[i]
                rid, length = s.request_id, s.start_pos + int(s.x.shape[1])
                self.steps += 1
                if s.kind == "prefill" and rid not in self._partial:
                    continue  # released meanwhile
                if s.kind == "decode" and rid not in self._lengths:
                    continue
                self._lengths[rid] = length
                self._used[rid] = time.monotonic()
                if s.kind == "prefill" and s.last_chunk:
                    self._partial.discard(rid)
                q = int(s.x.shape[1])
                hidden = None if self.is_last else torch.zeros((1, q, self.hidden_size))
                token = echo_token(length, self.vocab_size) if self.is_last else None
                results[i] = StepOutput(hidden, None, token, length, compute_s)
        return [
            r if r is not None else CacheStateError(f"request {s.request_id!r} was released")
            for r, s in zip(results, steps, strict=True)
        ]

    def _take_locked(self, s: BatchStep) -> None:
        rid = s.request_id
        if s.kind == "prefill" and s.start_pos > 0:  # the next chunk of a prompt
            if rid not in self._partial or self._lengths.get(rid) != s.start_pos:
                raise CacheStateError(f"request {rid!r}: no prefill to continue at {s.start_pos}")
            return
        if rid in self._opening or rid in self._partial:
            raise CacheStateError(f"request {rid!r} is already being prefilled")
        self._check_locked(s.kind, s.x, s.start_pos, rid)
        if s.kind == "prefill":
            self._partial.add(rid)


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
        ex = self.servers[node].executor
        assert isinstance(ex, EchoExecutor)
        return ex

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
    batch: Any = None,  # testbed.stage.batcher.BatchLimits (default: the server's)
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
                **({} if batch is None else {"batch": batch}),
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
    from testbed.stage.tasks import cancel_and_wait

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
        await cancel_and_wait(watcher)
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
