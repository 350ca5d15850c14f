"""Drive one request's steps through a chain of stage servers.

Design choice: hidden states travel stage -> driver -> next stage (hop by hop through the
driver, i.e. the broker). It costs one extra loopback/LAN copy per hop, and buys a driver that
sees, times and can shape every hop: hop ``j`` is the link *into* stage ``j`` and its hook is
awaited before the bytes go. The stages stay simple servers that never call each other.

Per step and stage the driver records the stage's own compute time (``service_s``), its queue
wait (``queue_s``), the rest of the round trip (``transfer_s``: serialisation, HTTP, network)
and the time spent in the hop hook (``link_s``), so a broker can refine capacity estimates.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
import torch

from testbed.errors import StageError
from testbed.stage.client import ForwardResult, HopHook, SendHook, StageClient, new_session


@dataclass(frozen=True)
class StageTiming:
    """One stage's part of one step."""

    url: str
    service_s: float
    queue_s: float
    transfer_s: float
    link_s: float
    wall_s: float
    bytes_sent: int
    bytes_received: int

    @classmethod
    def of(cls, r: ForwardResult) -> StageTiming:
        return cls(
            url=r.url,
            service_s=r.service_s,
            queue_s=r.queue_s,
            transfer_s=r.transfer_s,
            link_s=r.link_s,
            wall_s=r.wall_s,
            bytes_sent=r.bytes_sent,
            bytes_received=r.bytes_received,
        )


@dataclass(frozen=True)
class PipelineStep:
    """One prefill or decode step through every stage of the route."""

    request_id: str
    kind: str
    start_pos: int
    num_tokens: int
    token_id: int
    stages: tuple[StageTiming, ...]
    wall_s: float
    logits: torch.Tensor | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("logits")
        return d


@dataclass(frozen=True)
class GenerationResult:
    """A whole greedy generation."""

    request_id: str
    prompt_ids: tuple[int, ...]
    generated_ids: tuple[int, ...]
    finish_reason: str  # "eos" or "length"
    ttft_s: float  # start -> first token (prefill)
    e2e_s: float  # start -> last token
    steps: tuple[PipelineStep, ...] = field(repr=False)

    @property
    def token_ids(self) -> list[int]:
        """Prompt ids followed by the generated ids (as `model.generate` returns them)."""
        return [*self.prompt_ids, *self.generated_ids]

    def timings(self) -> dict[str, Any]:
        """Totals per stage (service, queue, transfer, link seconds) and per-step latencies."""
        n = len(self.steps[0].stages) if self.steps else 0
        per_stage = []
        for j in range(n):
            rows = [s.stages[j] for s in self.steps]
            per_stage.append(
                {
                    "url": rows[0].url,
                    "service_s": sum(r.service_s for r in rows),
                    "queue_s": sum(r.queue_s for r in rows),
                    "transfer_s": sum(r.transfer_s for r in rows),
                    "link_s": sum(r.link_s for r in rows),
                    "bytes_sent": sum(r.bytes_sent for r in rows),
                    "bytes_received": sum(r.bytes_received for r in rows),
                }
            )
        decode = [s.wall_s for s in self.steps if s.kind == "decode"]
        return {
            "ttft_s": self.ttft_s,
            "e2e_s": self.e2e_s,
            "tpot_s": (sum(decode) / len(decode)) if decode else None,
            "prefill_s": self.steps[0].wall_s if self.steps else None,
            "decode_step_s": decode,
            "per_stage": per_stage,
        }


class PipelineClient:
    """Runs requests through ordered stage servers (one URL per stage).

    `stage_urls` is the default route; every call may pass its own `route` (a broker picks a
    replica per stage). `transport`: "auto" sends steps over each stage's tensor port when it
    announces one (fewer copies), else HTTP; "http" or "tcp" force one. `hooks[j]` shapes the hop into stage j of the default route;
    `hooks_by_url` maps a stage URL to its hop hook for any route. Clients per URL share one
    aiohttp session.
    """

    def __init__(
        self,
        stage_urls: Sequence[str] | None = None,
        *,
        hooks: Sequence[HopHook | SendHook | None] | None = None,
        hooks_by_url: dict[str, HopHook | SendHook | None] | None = None,
        timeout_s: float = 60.0,
        transport: str = "auto",
    ):
        self.route = [u.rstrip("/") for u in (stage_urls or [])]
        self.transport = transport  # auto (tensor port when announced), http or tcp
        if hooks is not None and len(hooks) != len(self.route):
            raise ValueError(f"{len(hooks)} hooks for {len(self.route)} stages")
        self._hooks: dict[str, Any] = {}
        for url, hook in zip(self.route, hooks or [None] * len(self.route), strict=True):
            self._hooks[url] = hook
        for url, hook in (hooks_by_url or {}).items():
            self._hooks[url.rstrip("/")] = hook
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._clients: dict[str, StageClient] = {}
        self._eos_cache: dict[str, tuple[int, ...]] = {}

    async def start(self) -> None:
        if self._session is None:
            self._session = new_session()

    async def aclose(self) -> None:
        for c in self._clients.values():
            await c.aclose()
        self._clients.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> PipelineClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def client(self, url: str) -> StageClient:
        """The (cached) client for a stage URL."""
        if self._session is None:
            raise RuntimeError("PipelineClient not started: use `async with` or await start()")
        url = url.rstrip("/")
        c = self._clients.get(url)
        if c is None:
            c = StageClient(
                url,
                session=self._session,
                timeout_s=self.timeout_s,
                hook=self._hooks.get(url),
                transport=self.transport,
            )
            self._clients[url] = c
        return c

    def _route(self, route: Sequence[str] | None) -> list[str]:
        r = [u.rstrip("/") for u in route] if route is not None else self.route
        if not r:
            raise ValueError("no route: give stage URLs to PipelineClient or to the call")
        return r

    async def step(
        self,
        request_id: str,
        kind: str,
        start_pos: int,
        token_ids: Sequence[int],
        *,
        route: Sequence[str] | None = None,
        want_logits: bool = False,
        timeout_s: float | None = None,
    ) -> PipelineStep:
        """One prefill (whole prompt at position 0) or decode (one token) through the route."""
        stages = self._route(route)
        t0 = time.perf_counter()
        data: Sequence[int] | torch.Tensor = list(token_ids)
        results: list[ForwardResult] = []
        for j, url in enumerate(stages):
            last = j == len(stages) - 1
            r = await self.client(url).forward(
                request_id,
                kind,
                start_pos,
                data,
                want_logits=want_logits and last,
                timeout_s=timeout_s,
            )
            results.append(r)
            if last:
                if r.token_id is None:
                    raise StageError(
                        f"stage {url} is last on the route but returned no token: "
                        "the route does not end at the model's last block"
                    )
            else:
                if r.hidden is None:
                    raise StageError(
                        f"stage {url} returned no hidden states but is not last on the route"
                    )
                data = r.hidden
        last_r = results[-1]
        assert last_r.token_id is not None
        return PipelineStep(
            request_id=request_id,
            kind=kind,
            start_pos=start_pos,
            num_tokens=len(token_ids),
            token_id=last_r.token_id,
            stages=tuple(StageTiming.of(r) for r in results),
            wall_s=time.perf_counter() - t0,
            logits=last_r.logits,
        )

    async def prefill(self, request_id: str, prompt_ids: Sequence[int], **kw: Any) -> PipelineStep:
        return await self.step(request_id, "prefill", 0, prompt_ids, **kw)

    async def decode(
        self, request_id: str, token_id: int, position: int, **kw: Any
    ) -> PipelineStep:
        return await self.step(request_id, "decode", position, [token_id], **kw)

    async def release(
        self, request_id: str, *, route: Sequence[str] | None = None, timeout_s: float = 5.0
    ) -> list[str]:
        """Free the request's caches on every stage (best effort); returns the failures."""
        stages = self._route(route)
        outcomes = await asyncio.gather(
            *(self.client(u).release(request_id, timeout_s=timeout_s) for u in stages),
            return_exceptions=True,
        )
        failures = []
        for url, out in zip(stages, outcomes, strict=True):
            if isinstance(out, asyncio.CancelledError):
                raise out
            if isinstance(out, BaseException):
                failures.append(f"{url}: {out}")
        return failures

    async def eos_token_ids(self, route: Sequence[str] | None = None) -> tuple[int, ...]:
        """The model's EOS ids, as the last stage reports them."""
        last = self._route(route)[-1]
        if last not in self._eos_cache:
            info = await self.client(last).info()
            self._eos_cache[last] = tuple(int(t) for t in info.get("eos_token_ids", []))
        return self._eos_cache[last]

    async def generate(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        *,
        request_id: str | None = None,
        eos_token_ids: Sequence[int] | None = None,
        route: Sequence[str] | None = None,
        timeout_s: float | None = None,
    ) -> GenerationResult:
        """Greedy generation: prefill, then decode until EOS or `max_new_tokens`.

        The request's caches are released on every stage at the end, also on failure.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        rid = request_id or uuid.uuid4().hex
        stages = self._route(route)
        eos = set(eos_token_ids if eos_token_ids is not None else await self.eos_token_ids(stages))
        t0 = time.perf_counter()
        steps: list[PipelineStep] = []
        generated: list[int] = []
        finish = "length"
        try:
            step = await self.prefill(rid, prompt_ids, route=stages, timeout_s=timeout_s)
            ttft = time.perf_counter() - t0
            steps.append(step)
            generated.append(step.token_id)
            pos = len(prompt_ids)
            while True:
                if generated[-1] in eos:
                    finish = "eos"
                    break
                if len(generated) >= max_new_tokens:
                    break
                step = await self.decode(rid, generated[-1], pos, route=stages, timeout_s=timeout_s)
                steps.append(step)
                generated.append(step.token_id)
                pos += 1
            e2e = time.perf_counter() - t0
        finally:
            await asyncio.shield(self._release_quietly(rid, stages))
        return GenerationResult(
            request_id=rid,
            prompt_ids=tuple(int(t) for t in prompt_ids),
            generated_ids=tuple(generated),
            finish_reason=finish,
            ttft_s=ttft,
            e2e_s=e2e,
            steps=tuple(steps),
        )

    async def _release_quietly(self, rid: str, stages: list[str]) -> None:
        await self.release(rid, route=stages, timeout_s=2.0)
