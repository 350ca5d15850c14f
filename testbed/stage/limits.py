"""A stage server's input limits, and the memory budget that payloads in flight share.

Hostile or broken senders must not be able to grow a stage's memory without bound. Every
message body (HTTP ``/forward`` and ``/sink``, and the tensor port) is read the same way:

1. its header is read and validated first (64 KiB at most);
2. the payload it announces is checked against the stage's largest real input (its context
   length x hidden size x 4 bytes, or x 8 bytes of token ids on the first stage): bigger is a
   413 ``bad_input`` before a byte is allocated;
3. the payload's bytes are reserved in one :class:`PayloadBudget` shared by all connections:
   when the budget is spent the payload waits (up to ``budget_wait_s``), then is refused with
   429 ``busy``; only then is its buffer allocated;
4. a body or frame that stops sending for ``read_timeout_s`` is dropped with its buffer and
   reservation (HTTP 408); a client that disconnects mid-body releases them at once.

The reservation is released when the step that uses the payload has finished.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass

from testbed.errors import ConfigError


@dataclass(frozen=True)
class InputLimits:
    """How much input a stage accepts at once, and how long it waits for a slow sender."""

    mem_budget_bytes: int = 100 << 20  # payload bytes in flight, all connections together
    budget_wait_s: float = 5.0  # a payload waits this long for budget, then 429 busy
    read_timeout_s: float = 30.0  # a body/frame with no bytes for this long is dropped
    idle_timeout_s: float = 300.0  # a tensor-port connection with no message this long closes
    max_connections: int = 64  # tensor-port connections at once (more: busy, then closed)

    def __post_init__(self) -> None:
        if self.mem_budget_bytes < 1 << 16:
            raise ConfigError(
                f"{self.mem_budget_bytes} bytes is too small; give at least 64KiB, e.g. 100MB",
                field="mem_budget",
            )
        for name in ("budget_wait_s", "read_timeout_s", "idle_timeout_s"):
            value = getattr(self, name)
            if not 0 < value < float("inf"):
                raise ConfigError(f"{value!r} must be a positive number of seconds", field=name)
        if self.max_connections < 1:
            raise ConfigError(f"{self.max_connections} must be >= 1", field="max_connections")


class Reservation:
    """Bytes held in a :class:`PayloadBudget`; :meth:`release` (idempotent) gives them back."""

    def __init__(self, budget: PayloadBudget, nbytes: int):
        self._budget: PayloadBudget | None = budget
        self.nbytes = nbytes

    def release(self) -> None:
        budget, self._budget = self._budget, None
        if budget is not None:
            budget.give_back(self.nbytes)


class PayloadBudget:
    """Bytes of payload buffers in flight, capped; a waiter gets in as soon as it fits.

    Event-loop thread only.
    """

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.in_use_bytes = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    def try_reserve(self, nbytes: int) -> Reservation | None:
        """A reservation when the bytes fit now, else None.

        First fit, not strict FIFO: a small payload (a decode step) that fits goes ahead of a
        big one still waiting, so stalled big uploads cannot delay decodes; a big one waits at
        most ``budget_wait_s`` and is then refused (429), never starved silently."""
        if self.in_use_bytes + nbytes <= self.budget_bytes:
            self.in_use_bytes += nbytes
            return Reservation(self, nbytes)
        return None

    async def reserve(self, nbytes: int, timeout_s: float) -> Reservation:
        """Wait up to ``timeout_s`` for the bytes; raises ``TimeoutError`` when they never fit."""
        if nbytes > self.budget_bytes:
            raise ValueError(f"{nbytes} bytes can never fit a budget of {self.budget_bytes}")
        got = self.try_reserve(nbytes)
        if got is not None:
            return got
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (nbytes, fut)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(timeout_s):
                await fut
        except BaseException:
            if fut.done() and not fut.cancelled():  # granted just as we gave up: hand it back
                self.give_back(nbytes)
            else:
                with contextlib.suppress(ValueError):  # _wake drops cancelled waiters too
                    self._waiters.remove(entry)
                self._wake()
            raise
        return Reservation(self, nbytes)

    def give_back(self, nbytes: int) -> None:
        self.in_use_bytes -= nbytes
        self._wake()

    def _wake(self) -> None:
        """Grant every waiter that fits, in arrival order (first fit)."""
        for entry in list(self._waiters):
            nbytes, fut = entry
            if fut.done():
                self._waiters.remove(entry)
            elif self.in_use_bytes + nbytes <= self.budget_bytes:
                self._waiters.remove(entry)
                self.in_use_bytes += nbytes
                fut.set_result(None)
