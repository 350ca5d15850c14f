"""How the broker talks to stage servers: one call per stage step, one release per request.

:class:`StageTransport` is the small interface the broker needs; :class:`HttpStageTransport`
implements it over the stage servers' HTTP wire format with :mod:`testbed.stage.client`
(one client per node, the node's app-level link hook awaited before every send).

Failures are the stage errors of :mod:`testbed.stage.errors` (their ``stage`` is the node
name), and the broker treats them in two ways, decided by
:func:`testbed.stage.errors.marks_node_down` from the error's type and code:

- the node is gone - it did not answer (unreachable, timeout) or answered ``shutting_down``:
  the broker marks it down and re-routes the request's remaining life elsewhere;
- anything else (``bad_input``, ``bad_position``, ``unknown_request``, ``model_error``, a
  malformed answer): the request fails with that reason (the same bytes elsewhere would fail
  the same way). A transport retries ``busy`` / ``cache_full`` itself until its deadline.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from testbed.stage.errors import (
    ErrorCode,
    StageError,
    StageProtocolError,
    StageRejectedError,
    StageTimeoutError,
    StageUnreachableError,
    marks_node_down,
)
from testbed.stage.forward import NO_OPTIONS, StepOptions

StepKind = Literal["prefill", "decode"]
Hook = Callable[[int], Awaitable[None]]  # before_send(nbytes): the emulated link's delay


@dataclass(frozen=True, slots=True)
class StepResult:
    output: object  # next stage's input (hidden states), or the next token id from the last stage
    service_s: float  # compute time the stage server measured for this step
    queue_s: float = 0.0  # time the step waited in the server's queue (0 when not reported)
    link_s: float = 0.0  # time spent in the emulated link hook before the send
    nbytes: int = 0  # request body bytes sent
    batch_size: int | None = None  # requests in the stage's batched step (None: not reported)
    wall_s: float = 0.0  # send start -> answer read at the sender (0 when not reported)
    forward_s: float = 0.0  # forward transport: seconds the stage spent passing the step on


@dataclass(frozen=True, slots=True)
class RouteResult:
    """A step through a whole route in the forward transport (:mod:`testbed.broker.chain`)."""

    output: object  # the last stage's token id
    hops: tuple[StepResult, ...]  # one per stage of the route, as each hop's sender measured it


class StageTransport(Protocol):
    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    async def health(self, node: str, *, timeout_s: float) -> bool: ...

    async def forward(
        self,
        node: str,
        request_id: str,
        kind: StepKind,
        start_pos: int,
        data: object,
        *,
        timeout_s: float,
        options: StepOptions = NO_OPTIONS,  # class, priority, slack: passed through unchanged
    ) -> StepResult: ...

    async def release(self, node: str, request_id: str, *, timeout_s: float) -> None: ...


class ChainTransport(StageTransport, Protocol):
    """A transport that can also send a step along a whole route, stage to stage."""

    async def forward_route(
        self,
        route: Sequence[str],
        request_id: str,
        kind: StepKind,
        start_pos: int,
        data: object,
        *,
        timeout_s: float,
        options: StepOptions = NO_OPTIONS,
    ) -> RouteResult: ...


# The errors a transport raises (re-exported for the broker and other transports).
__all__ = [
    "NO_OPTIONS",
    "ChainTransport",
    "ErrorCode",
    "RouteResult",
    "StageError",
    "StageProtocolError",
    "StageRejectedError",
    "StageTimeoutError",
    "StageTransport",
    "StageUnreachableError",
    "StepKind",
    "StepOptions",
    "StepResult",
    "marks_node_down",
]


def token_ids(data: object) -> Sequence[int] | None:
    """``data`` as a list of token ids when it is one (first stage input), else None."""
    if isinstance(data, list | tuple) and all(isinstance(t, int) for t in data):
        return data
    return None


NodeMap = Mapping[str, str]  # node -> base URL


def as_token(data: object, node: str) -> int:
    """The last stage's output as a token id (:class:`StageProtocolError` when it is none)."""
    if isinstance(data, int) and not isinstance(data, bool):
        return data
    if isinstance(data, list | tuple) and len(data) == 1 and isinstance(data[0], int):
        return int(data[0])
    raise StageProtocolError(node, f"the last stage returned {type(data).__name__}, not a token id")
