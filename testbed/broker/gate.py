"""A partition at application level: messages to a cut-off node wait until it is reachable
again or their deadline passes (as TCP retransmits into a partition, then times out).

Used where the kernel cannot drop a node's packets (the ``app`` and ``kernel-rate+app-delay``
shaping backends): :func:`testbed.runtime.control.partition_node` sets the node's
``partitioned`` flag and :class:`GatedTransport` holds every call to it, health checks
included, so the broker sees exactly what a real partition shows it: no answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

from testbed.broker.transport import (
    NO_OPTIONS,
    ChainTransport,
    RouteResult,
    StageTimeoutError,
    StageTransport,
    StepKind,
    StepOptions,
    StepResult,
)

POLL_S = 0.02  # how often a held message looks whether the partition healed


class GatedTransport:
    """Wraps a :class:`StageTransport`; ``is_cut(node)`` says whether the node is cut off."""

    def __init__(self, inner: StageTransport, is_cut: Callable[[str], bool]) -> None:
        self.inner = inner
        self.is_cut = is_cut

    async def _through(self, node: str, timeout_s: float, what: str) -> float:
        """Wait while ``node`` is cut off; the time left of ``timeout_s`` (raises at 0)."""
        deadline = time.monotonic() + timeout_s
        while self.is_cut(node):
            left = deadline - time.monotonic()
            if left <= 0:
                raise StageTimeoutError(
                    f"stage {node}: no answer to {what} within {timeout_s:g}s (partitioned)",
                    stage=node,
                )
            await asyncio.sleep(min(POLL_S, left))
        return max(deadline - time.monotonic(), 1e-3)

    async def start(self) -> None:
        await self.inner.start()

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def health(self, node: str, *, timeout_s: float) -> bool:
        try:
            left = await self._through(node, timeout_s, "a health check")
        except StageTimeoutError:
            return False
        return await self.inner.health(node, timeout_s=left)

    async def forward(
        self,
        node: str,
        request_id: str,
        kind: StepKind,
        start_pos: int,
        data: object,
        *,
        timeout_s: float,
        options: StepOptions = NO_OPTIONS,
    ) -> StepResult:
        left = await self._through(node, timeout_s, f"{kind} step of {request_id!r}")
        return await self.inner.forward(
            node, request_id, kind, start_pos, data, timeout_s=left, options=options
        )

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
    ) -> RouteResult:
        """Held while any node of the route is cut off (checked when the step is sent)."""
        inner: ChainTransport = self.inner  # type: ignore[assignment]
        left = timeout_s
        for node in route:
            left = await self._through(node, left, f"{kind} step of {request_id!r}")
        return await inner.forward_route(
            route, request_id, kind, start_pos, data, timeout_s=left, options=options
        )

    async def release(self, node: str, request_id: str, *, timeout_s: float) -> None:
        left = await self._through(node, timeout_s, f"release of {request_id!r}")
        await self.inner.release(node, request_id, timeout_s=left)

    def __getattr__(self, name: str) -> object:  # busy_retries and other counters
        return getattr(self.inner, name)
