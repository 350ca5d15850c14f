"""A stage's sending side in the ``forward`` transport: pass a computed step on to the next stage.

One :class:`~testbed.stage.client.StageClient` per next node (its tensor port when it announces
one, else HTTP; connections kept), and per next node an
:class:`~testbed.net.appshaper.AppShaper` with the hop shape the step's route gives: the same
app-level link emulation the broker's hook applies in the relay, applied here by the sender of
the hop (its pipe, jitter and loss draws are this stage's). A shape that changes while running
(a scenario timeline) is taken over with ``set_shape``. The route's format and the way a
failure downstream is answered: :mod:`testbed.stage.route`.
"""

from __future__ import annotations

import time
import zlib
from typing import Any

import aiohttp
import torch

from testbed.net.appshaper import AppShaper
from testbed.stage.client import StageClient, new_session
from testbed.stage.errors import StageError, StageTimeoutError
from testbed.stage.forward import ForwardRequest
from testbed.stage.retry import forward_until_taken
from testbed.stage.route import CHAIN_MARGIN_S, ChainError, RouteHop
from testbed.stage.wire import WireLimits


class Forwarder:
    """Sends steps on along their routes; ``aclose()`` closes its connections."""

    def __init__(self, name: str, limits: WireLimits, *, timeout_s: float = 60.0) -> None:
        self.name = name  # this stage's node name (seeds its shapers)
        self.limits = limits
        self.timeout_s = timeout_s  # when a step carries no timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._clients: dict[tuple[str, str], StageClient] = {}
        self._shapers: dict[str, AppShaper] = {}
        self.busy_retries = 0

    async def aclose(self) -> None:
        clients, self._clients = self._clients, {}
        for c in clients.values():
            await c.aclose()
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _shaper(self, hop: RouteHop) -> AppShaper | None:
        if hop.hop is None:
            self._shapers.pop(hop.node, None)
            return None
        shaper = self._shapers.get(hop.node)
        if shaper is None:
            seed = hop.seed ^ zlib.crc32(self.name.encode())  # each sender its own draws
            shaper = self._shapers[hop.node] = AppShaper(hop.hop, seed=seed, name=hop.node)
        elif shaper.shape != hop.hop:
            shaper.set_shape(hop.hop)
        return shaper

    def _client(self, hop: RouteHop) -> StageClient:
        key = (hop.node, hop.url)
        client = self._clients.get(key)
        if client is None:
            if self._session is None:
                self._session = new_session()

            async def before_send(nbytes: int, node: str = hop.node) -> None:
                shaper = self._shapers.get(node)
                if shaper is not None:
                    await shaper.before_send(nbytes)

            client = StageClient(
                hop.url,
                session=self._session,
                hook=before_send,
                limits=self.limits,
                name=hop.node,
                timeout_s=self.timeout_s,
            )
            self._clients[key] = client
        return client

    async def pass_on(
        self, req: ForwardRequest, hidden: torch.Tensor, received_at: float
    ) -> dict[str, Any]:
        """Send ``hidden`` to the route's next stage and wait for the chain's answer; returns
        the meta to add to this stage's answer (token, ``hops``, ``forward_s``). A failure
        downstream raises :class:`ChainError` naming the node that failed.

        ``received_at``: ``time.monotonic()`` when the step arrived here (the timeout runs
        from there)."""
        nxt, rest = req.route[0], req.route[1:]
        budget = req.timeout_s if req.timeout_s is not None else self.timeout_s
        left = budget - (time.monotonic() - received_at) - CHAIN_MARGIN_S
        self._shaper(nxt)
        client = self._client(nxt)
        t0 = time.perf_counter()
        if left <= 0:  # this stage used up the call's time: a timeout here, as in the relay
            raise ChainError(
                StageTimeoutError(
                    f"stage {self.name}: no time left of {budget:g}s to pass the step on to "
                    f"{nxt.node}",
                    stage=self.name,
                )
            )
        try:
            res = await forward_until_taken(
                client,
                req.request_id,
                req.kind,
                req.start_pos,
                hidden,
                timeout_s=left,
                options=req.options.passed_on(),
                route=rest,
                on_busy=self._count_busy,
            )
        except StageError as exc:
            raise ChainError(exc) from None
        entry = {
            "node": nxt.node,
            "link_s": res.link_s,
            "wall_s": res.wall_s,
            "service_s": res.service_s,
            "queue_s": res.queue_s,
            "forward_s": res.forward_s,
            "nbytes": res.bytes_sent,
            "batch_size": res.batch_size,
        }
        return {
            "token_id": res.token_id,
            "hops": [entry, *res.hops],
            "forward_s": time.perf_counter() - t0,
        }

    def _count_busy(self) -> None:
        self.busy_retries += 1
