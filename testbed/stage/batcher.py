"""The stage server's step queue: continuous (iteration-level) batching.

Every /forward step waiting at a stage joins one queue. Whenever a worker is free the queue
forms a batch (:func:`form_batch`, a pure function) and runs it as one
``executor.step_batch`` call: every waiting decode (one token each, each on its own KV cache
and position) and chunks of waiting prefills, up to ``max_batch`` rows and ``max_batch_tokens``
tokens. A prompt longer than ``chunk_tokens`` is prefilled over several iterations, so a long
prompt does not stall the decodes batched alongside it; its answer goes out after its last
chunk. Requests join and leave at these step boundaries. The order of admission into a batch
is (priority high first, steps that can still meet their deadline before those whose deadline
has passed, deadline early first, arrival): with no classes it is first come,
first served.

The HTTP and tensor-port protocol stays per request: each step's caller awaits its own answer.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from testbed.errors import ConfigError
from testbed.model.batch import BatchStep
from testbed.model.contract import StepOutput
from testbed.stage.forward import ForwardRequest
from testbed.stage.tasks import cancel_and_wait


@dataclass(frozen=True)
class BatchLimits:
    """How big one iteration may be (node parameters; ``stage serve`` flags)."""

    max_batch: int = 16  # rows (requests) per step
    max_batch_tokens: int = 2048  # tokens per step, decodes (1 each) and prefill chunks
    chunk_tokens: int = 512  # most prompt tokens of one request per step (0 = whole prompt)

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ConfigError(f"max_batch must be >= 1, got {self.max_batch}", field="max_batch")
        if self.max_batch_tokens < 1:
            raise ConfigError(
                f"max_batch_tokens must be >= 1, got {self.max_batch_tokens}",
                field="max_batch_tokens",
            )
        if self.chunk_tokens < 0:
            raise ConfigError(
                f"chunk_tokens must be >= 0 (0 = no chunking), got {self.chunk_tokens}",
                field="chunk_tokens",
            )


@dataclass
class Pending:
    """One request's step in the queue (a prefill may take several iterations)."""

    req: ForwardRequest
    priority: int  # higher first
    deadline_s: float  # monotonic time by which this step should finish (inf = none)
    seq: int  # arrival order
    future: asyncio.Future[StepOutput]
    ready_s: float = field(default_factory=time.perf_counter)
    done: int = 0  # prompt tokens computed so far
    running: bool = False
    first_run_s: float | None = None
    compute_s: float = 0.0  # summed batch times of its iterations
    batch_size: int = 0  # rows of its last iteration
    hidden: list[torch.Tensor] = field(default_factory=list)  # prefill chunks' outputs

    @property
    def tokens_left(self) -> int:
        return int(self.req.input.shape[1]) - self.done

    def order(self, now_s: float) -> tuple[int, bool, float, int]:
        """Batch order at monotonic time ``now_s``: priority, then the steps still on time
        (earliest deadline first), then the late ones. A late step has missed its target
        already; putting it first (plain EDF) would make the on-time ones miss theirs too."""
        return (-self.priority, self.deadline_s < now_s, self.deadline_s, self.seq)


def form_batch(
    pending: Sequence[Pending], limits: BatchLimits, now_s: float
) -> list[tuple[Pending, int]]:
    """The next iteration at monotonic time ``now_s``: (step, tokens to compute) rows, in
    :meth:`Pending.order`, up to ``max_batch`` rows and ``max_batch_tokens`` tokens. Steps
    already running (in another worker's batch) are skipped. Pure: changes nothing."""
    rows: list[tuple[Pending, int]] = []
    budget = limits.max_batch_tokens
    for p in sorted((p for p in pending if not p.running), key=lambda p: p.order(now_s)):
        if len(rows) >= limits.max_batch or budget <= 0:
            break
        take = p.tokens_left
        if p.req.kind == "prefill":
            if limits.chunk_tokens:
                take = min(take, limits.chunk_tokens)
            take = min(take, budget)
        elif take > budget:
            continue
        rows.append((p, take))
        budget -= take
    return rows


RunBatch = Callable[[list[BatchStep]], Awaitable[list[StepOutput | Exception]]]


class StepQueue:
    """Forms and runs batches while steps wait; ``max_inflight`` batches at once.

    ``run_batch`` runs one executor batch (on a worker thread) and answers per row.
    ``start()`` / ``aclose()``; :meth:`submit` from the routes.
    """

    def __init__(self, run_batch: RunBatch, limits: BatchLimits, max_inflight: int = 1):
        self._run_batch = run_batch
        self.limits = limits
        self.max_inflight = max_inflight
        self._pending: list[Pending] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()
        self.running_rows = 0
        self.batches = 0  # iterations run
        self.batch_rows = 0  # rows over all iterations
        self.last_batch = 0  # rows of the latest iteration

    @property
    def running_batches(self) -> int:
        return len(self._batches)

    @property
    def waiting(self) -> int:
        return sum(1 for p in self._pending if not p.running)

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._loop(), name="step-queue")

    async def aclose(self) -> None:
        if self._loop_task is not None:
            task, self._loop_task = self._loop_task, None
            await cancel_and_wait(task)
        for t in list(self._batches):  # worker threads cannot be stopped: let them end
            await asyncio.wait({t})
        for p in self._pending:
            if not p.future.done():
                p.future.cancel()

    async def submit(self, req: ForwardRequest) -> Pending:
        """Queue one step (ordered by its options' priority and slack) and wait for its answer;
        returns the finished entry (its future holds the output; its timings and batch size are
        on it). Raises what the row raised."""
        loop = asyncio.get_running_loop()
        opts = req.options
        deadline = math.inf if opts.slack_s is None else time.monotonic() + opts.slack_s
        p = Pending(req, opts.priority, deadline, next(self._seq), loop.create_future())
        self._pending.append(p)
        self._wake.set()
        try:
            await asyncio.shield(p.future)
        except asyncio.CancelledError:  # the caller left: drop the step at the next boundary
            p.future.cancel()
            if not p.running and p in self._pending:
                self._pending.remove(p)
            raise
        return p

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while len(self._batches) < self.max_inflight:
                rows = form_batch(self._pending, self.limits, time.monotonic())
                if not rows:
                    break
                for p, _ in rows:
                    p.running = True
                    if p.first_run_s is None:
                        p.first_run_s = time.perf_counter()
                task = asyncio.create_task(self._execute(rows))
                self._batches.add(task)
                task.add_done_callback(self._batch_done)

    async def _execute(self, rows: list[tuple[Pending, int]]) -> None:
        steps = [_batch_step(p, take) for p, take in rows]
        self.running_rows += len(rows)
        try:
            outs: Sequence[StepOutput | Exception] = await self._run_batch(steps)
        except Exception as exc:  # the whole batch failed: every row answers with it
            outs = [exc] * len(rows)
        finally:
            self.running_rows -= len(rows)
        self.batches += 1
        self.batch_rows += len(rows)
        self.last_batch = len(rows)
        for (p, take), out in zip(rows, outs, strict=True):
            p.running = False
            if isinstance(out, Exception) or p.future.done():
                self._finish(p, exc=out if isinstance(out, Exception) else None)
                continue
            p.done += take
            p.compute_s += out.compute_s
            p.batch_size = len(rows)
            if p.req.kind == "prefill" and out.hidden is not None:
                p.hidden.append(out.hidden)
            if p.tokens_left > 0:
                continue  # more chunks: stays queued
            # replace() keeps an executor's own output type and fields (an emulated device's
            # pacing numbers): only the whole prompt's hidden states and compute time change
            hidden = torch.cat(p.hidden, dim=1) if len(p.hidden) > 1 else out.hidden
            self._finish(p, out=replace(out, hidden=hidden, compute_s=p.compute_s))

    def _batch_done(self, task: asyncio.Task[None]) -> None:
        """A worker is free (and chunked prefills may have more to do): form the next batch."""
        self._batches.discard(task)
        self._wake.set()

    def _finish(
        self, p: Pending, *, out: StepOutput | None = None, exc: Exception | None = None
    ) -> None:
        if p in self._pending:
            self._pending.remove(p)
        if p.future.done():  # its caller left
            return
        if exc is not None:
            p.future.set_exception(exc)
        elif out is not None:
            p.future.set_result(out)


def _batch_step(p: Pending, take: int) -> BatchStep:
    req = p.req
    x = req.input[:, p.done : p.done + take]
    last = p.done + take >= int(req.input.shape[1])
    return BatchStep(req.request_id, req.kind, x, req.start_pos + p.done, last_chunk=last)
