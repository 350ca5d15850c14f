"""A node's call slots in the broker: at most ``limit`` calls outstanding at one node, the rest
wait here (explicit backpressure). A freed slot goes to the waiter with the least key at that
moment (ties: first come, first served), so the broker's waiting room serves in the order the
stage servers batch (priority, then steps still on time by least slack, for ``slo``) instead
of first come, first served: with more requests in flight than the cap, most of a node's
queue waits here, where a stage's order cannot reach.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

OrderKey = Callable[[float], tuple[Any, ...]]  # run-clock time -> sort key (least first)


def fifo(_now_s: float) -> tuple[Any, ...]:
    """The key of a waiter without an order: every waiter ties, so first come, first served."""
    return ()


@dataclass(eq=False)
class _Waiter:
    key: OrderKey
    seq: int
    future: asyncio.Future[None]


class NodeSlots:
    """``async with slots.hold(key):`` one outstanding call; see the module docstring."""

    def __init__(self, limit: int, clock: Callable[[], float]) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.free = limit
        self._clock = clock
        self._waiters: list[_Waiter] = []  # in arrival order
        self._ordered = 0  # waiters with a key other than fifo
        self._seq = itertools.count()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @contextlib.asynccontextmanager
    async def hold(self, key: OrderKey = fifo) -> AsyncIterator[None]:
        await self.acquire(key)
        try:
            yield
        finally:
            self.release()

    async def acquire(self, key: OrderKey = fifo) -> None:
        """Take a slot (waiting for one in ``key`` order); :meth:`release` it after. (``hold``
        does both; this pair spares a context manager on the broker's per-step path.)"""
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return
        w = _Waiter(key, next(self._seq), asyncio.get_running_loop().create_future())
        self._waiters.append(w)
        self._ordered += key is not fifo
        try:
            await w.future
        except asyncio.CancelledError:
            if w in self._waiters:
                self._take(w)
            elif w.future.done() and not w.future.cancelled():
                self.release()  # handed a slot as it was cancelled: pass it on
            raise

    def release(self) -> None:
        if not self._waiters:
            self.free += 1
            return
        if self._ordered:
            now = self._clock()
            best = min(self._waiters, key=lambda w: (w.key(now), w.seq))
        else:  # every key ties: the first to come, without evaluating any key
            best = self._waiters[0]
        self._take(best)
        best.future.set_result(None)  # the slot passes to it directly

    def _take(self, w: _Waiter) -> None:
        self._waiters.remove(w)
        self._ordered -= w.key is not fifo
