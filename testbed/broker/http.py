"""The broker's stage transport over HTTP: :class:`testbed.stage.client.StageClient` per node.

One aiohttp session is shared by all nodes' clients. Each node's app-level link hook (the
running testbed's ``hook_for(node)``) is awaited before every send to that node. A stage that
answers ``busy`` or ``cache_full`` (:attr:`ErrorCode.retry_later`) is retried with a short
back-off until the call's deadline: that is backpressure from the server, not a failure. Every
other error propagates as the stage error it is, named by the node (the broker decides from its
type and code).

:meth:`HttpStageTransport.forward_route` is the forward transport: one call to the route's
first stage, whose step carries the rest of the route (each node's URL and the app-level shape
of the link into it, from its hook): the stages pass the step on themselves
(:mod:`testbed.stage.route`) and the first one answers with the token and every hop's timings.
"""

from __future__ import annotations

import asyncio
import dataclasses
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp

from testbed.broker.transport import NO_OPTIONS, RouteResult, StepKind, StepOptions, StepResult
from testbed.net.appshaper import AppShaper
from testbed.stage.client import ForwardResult, SendHook, StageClient
from testbed.stage.errors import (
    StageError,
    StageProtocolError,
    StageRejectedError,
    StageTimeoutError,
    StageUnreachableError,
)
from testbed.stage.retry import Backoff, forward_until_taken
from testbed.stage.route import RouteHop


class HttpStageTransport:
    """:class:`~testbed.broker.transport.StageTransport` over the stage servers' HTTP API."""

    def __init__(
        self,
        urls: Mapping[str, str],
        hooks: Mapping[str, SendHook] | None = None,
        *,
        shapers: Mapping[str, AppShaper] | None = None,
        seed: int = 0,
        route_urls: Mapping[str, str] | None = None,
        busy_backoff_s: float = 0.005,
        busy_backoff_max_s: float = 0.2,
    ) -> None:
        self.urls = dict(urls)
        self.hooks = dict(hooks or {})
        # forward transport: the app-level link into each node, read at every send (a
        # timeline's set_shape reaches the stages that shape it); seeds their shapers
        self.shapers = dict(shapers or {})
        self.seed = seed
        # forward transport: each node's URL as the stage before it reaches it (default: urls)
        self.route_urls = dict(route_urls or {})
        self.busy_backoff_s = busy_backoff_s
        self.busy_backoff_max_s = busy_backoff_max_s
        self.busy_retries = 0  # how often a stage said "busy" (for the results)
        self._session: aiohttp.ClientSession | None = None
        self._clients: dict[str, StageClient] = {}
        self._hops: dict[str, RouteHop] = {}  # node -> its route entry, less the shape

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
        res = await self._send(node, request_id, kind, start_pos, data, timeout_s, options, ())
        return _step(res)

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
        """One step through ``route``: sent to its first node, passed on stage to stage."""
        rest = tuple(self._route_hop(n) for n in route[1:])
        res = await self._send(
            route[0], request_id, kind, start_pos, data, timeout_s, options, rest
        )
        hops = [_step(res)]
        try:
            hops += [_step_of_entry(e) for e in res.hops]
            got = [route[0], *(str(e["node"]) for e in res.hops)]
        except (KeyError, TypeError, ValueError) as exc:
            raise StageProtocolError(route[0], f"malformed hop timings: {exc}") from None
        if got != list(route):
            raise StageProtocolError(route[0], f"hop timings name {got}, the route is {route}")
        return RouteResult(output=res.token_id, hops=tuple(hops))

    def _route_hop(self, node: str) -> RouteHop:
        hop = self._hops.get(node)
        if hop is None:
            seed = self.seed * 1000 + zlib.crc32(node.encode()) % 1000
            hop = RouteHop(node, self.route_urls.get(node, self.urls[node]), None, seed)
            self._hops[node] = hop
        shaper = self.shapers.get(node)
        if shaper is not None:  # its shape is read at every send (a timeline may change it)
            hop = dataclasses.replace(hop, hop=shaper.shape)
        return hop

    async def _send(
        self,
        node: str,
        request_id: str,
        kind: StepKind,
        start_pos: int,
        data: object,
        timeout_s: float,
        options: StepOptions,
        route: Sequence[RouteHop],
    ) -> ForwardResult:
        return await forward_until_taken(
            self._client(node),
            request_id,
            kind,
            start_pos,
            data,  # type: ignore[arg-type]
            timeout_s=timeout_s,
            options=options,
            route=route,
            backoff=Backoff(self.busy_backoff_s, self.busy_backoff_max_s),
            on_busy=self._count_busy,
        )

    def _count_busy(self) -> None:
        self.busy_retries += 1

    async def release(self, node: str, request_id: str, *, timeout_s: float) -> None:
        await self._client(node).release(request_id, timeout_s=timeout_s)


def _step(res: ForwardResult) -> StepResult:
    return StepResult(
        output=res.output,
        service_s=res.service_s,
        queue_s=res.queue_s,
        link_s=res.link_s,
        nbytes=res.bytes_sent,
        batch_size=res.batch_size,
        wall_s=res.wall_s,
        forward_s=res.forward_s,
    )


def _step_of_entry(e: dict[str, Any]) -> StepResult:
    """A later hop's timings, as its sender reported them (:mod:`testbed.stage.route`)."""
    return StepResult(
        output=None,
        service_s=float(e["service_s"]),
        queue_s=float(e["queue_s"]),
        link_s=float(e["link_s"]),
        nbytes=int(e["nbytes"]),
        batch_size=int(e["batch_size"]),
        wall_s=float(e["wall_s"]),
        forward_s=float(e["forward_s"]),
    )
