"""The broker's stage transport over HTTP: :class:`testbed.stage.client.StageClient` per node.

One aiohttp session is shared by all nodes' clients. Each node's app-level link hook (the
running testbed's ``hook_for(node)``) is awaited before every send to that node. A stage that
answers ``busy`` or ``cache_full`` (:attr:`ErrorCode.retry_later`) is retried with a short
back-off until the call's deadline: that is backpressure from the server, not a failure. Every
other error propagates as the stage error it is, named by the node (the broker decides from its
type and code).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

import aiohttp

from testbed.broker.transport import NO_OPTIONS, StepKind, StepOptions, StepResult
from testbed.stage.client import SendHook, StageClient
from testbed.stage.errors import (
    StageError,
    StageRejectedError,
    StageTimeoutError,
    StageUnreachableError,
)


class HttpStageTransport:
    """:class:`~testbed.broker.transport.StageTransport` over the stage servers' HTTP API."""

    def __init__(
        self,
        urls: Mapping[str, str],
        hooks: Mapping[str, SendHook] | None = None,
        *,
        busy_backoff_s: float = 0.005,
        busy_backoff_max_s: float = 0.2,
    ) -> None:
        self.urls = dict(urls)
        self.hooks = dict(hooks or {})
        self.busy_backoff_s = busy_backoff_s
        self.busy_backoff_max_s = busy_backoff_max_s
        self.busy_retries = 0  # how often a stage said "busy" (for the results)
        self._session: aiohttp.ClientSession | None = None
        self._clients: dict[str, StageClient] = {}

    async def start(self) -> None:
        if self._session is not None:
            return
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
        )
        self._clients = {
            n: StageClient(url, session=self._session, hook=self.hooks.get(n), name=n)
            for n, url in self.urls.items()
        }

    async def aclose(self) -> None:
        clients, self._clients = self._clients, {}
        for c in clients.values():  # their own raw tensor-port connections
            await c.aclose()
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()
            # closed transports release their sockets on the next loop iterations
            await asyncio.sleep(0.01)

    async def reconnect(self, node: str) -> None:
        """A fresh client for ``node`` (a restarted stage server: new tensor port, no cached
        connections); the broker calls it when it re-admits the node."""
        if self._session is None or node not in self._clients:
            return
        old = self._clients[node]
        self._clients[node] = StageClient(
            self.urls[node], session=self._session, hook=self.hooks.get(node), name=node
        )
        await old.aclose()

    def _client(self, node: str) -> StageClient:
        try:
            return self._clients[node]
        except KeyError:
            raise StageError(f"no client for node {node!r} (transport not started?)") from None

    async def health(self, node: str, *, timeout_s: float) -> bool:
        try:
            body = await self._client(node).health(timeout_s=timeout_s)
        except (StageTimeoutError, StageUnreachableError, StageRejectedError):
            return False
        return isinstance(body, dict) and body.get("status") == "ok"

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
        client = self._client(node)
        deadline = time.monotonic() + timeout_s
        backoff = self.busy_backoff_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StageTimeoutError(
                    f"stage {node}: busy for the whole {timeout_s:g}s call timeout", stage=node
                )
            try:
                res = await client.forward(
                    request_id, kind, start_pos, data,  # type: ignore[arg-type]
                    timeout_s=left, options=options,
                )  # fmt: skip
            except StageRejectedError as exc:
                if exc.code is None or not exc.code.retry_later:
                    raise
                self.busy_retries += 1
                await asyncio.sleep(min(backoff, max(deadline - time.monotonic(), 0.0)))
                backoff = min(backoff * 2, self.busy_backoff_max_s)
                continue
            return StepResult(
                output=res.output,
                service_s=res.service_s,
                queue_s=res.queue_s,
                link_s=res.link_s,
                nbytes=res.bytes_sent,
                batch_size=res.batch_size,
            )

    async def release(self, node: str, request_id: str, *, timeout_s: float) -> None:
        await self._client(node).release(request_id, timeout_s=timeout_s)
