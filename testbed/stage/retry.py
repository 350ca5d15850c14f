"""One step sent until it is taken: ``busy`` / ``cache_full`` answers are retried with a back-off.

A stage that answers with a :attr:`~testbed.stage.errors.ErrorCode.retry_later` code is
applying backpressure, not failing: the same step may succeed on it a moment later. Shared by
the broker's transport (a step into a stage) and a forwarding stage (a step into the next one).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from testbed.stage.client import ForwardResult, StageClient
from testbed.stage.errors import StageRejectedError, StageTimeoutError
from testbed.stage.forward import NO_OPTIONS, StepOptions
from testbed.stage.route import RouteHop


@dataclass(frozen=True, slots=True)
class Backoff:
    first_s: float = 0.005  # the first wait after a busy answer
    max_s: float = 0.2  # waits double up to this


async def forward_until_taken(
    client: StageClient,
    request_id: str,
    kind: str,
    start_pos: int,
    data: Sequence[int] | torch.Tensor,
    *,
    timeout_s: float,
    options: StepOptions = NO_OPTIONS,
    route: Sequence[RouteHop] = (),
    backoff: Backoff = Backoff(),
    on_busy: Callable[[], None] | None = None,
) -> ForwardResult:
    """``client.forward`` until the stage takes the step or ``timeout_s`` has passed
    (:class:`StageTimeoutError`, named by the client's stage); other errors propagate."""
    deadline = time.monotonic() + timeout_s
    wait_s = backoff.first_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise StageTimeoutError(
                f"stage {client.name}: busy for the whole {timeout_s:g}s call timeout",
                stage=client.name,
            )
        try:
            return await client.forward(
                request_id, kind, start_pos, data,
                timeout_s=left, options=options, route=route, chain_timeout_s=left,
            )  # fmt: skip
        except StageRejectedError as exc:
            if exc.stage != client.name or exc.code is None or not exc.code.retry_later:
                raise  # not backpressure from this stage (a failure, or one further down)
            if on_busy is not None:
                on_busy()
            await asyncio.sleep(min(wait_s, max(deadline - time.monotonic(), 0.0)))
            wait_s = min(wait_s * 2, backoff.max_s)
