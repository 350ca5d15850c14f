"""Async client for one stage server, and `generate_through` for a quick end-to-end run.

Errors say which stage and why, in the kinds of :mod:`testbed.stage.errors`: unreachable,
timeout, rejected (with the HTTP ``status`` and the server's :class:`ErrorCode` ``code``), or a
malformed answer. They name the stage by its URL, or by the ``name`` the client was given.

A *hop hook* shapes the link into a stage at application level: before the client sends
``nbytes`` to the stage it awaits ``hook.before_send(nbytes)`` (or ``hook(nbytes)`` for a plain
async callable) - the place for another component's delay / jitter / loss emulation.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import torch

from testbed.stage.errors import (
    ErrorCode,
    StageError,
    StageProtocolError,
    StageRejectedError,
    StageTimeoutError,
    StageUnreachableError,
    parse_code,
)
from testbed.stage.forward import NO_OPTIONS, StepOptions
from testbed.stage.hooks import HopHook, SendHook, as_send_hook
from testbed.stage.payload import WirePayload
from testbed.stage.route import RouteHop, chain_error, route_to_meta
from testbed.stage.wire import (
    WireFormatError,
    WireLimits,
    encode_parts,
    encode_token_parts,
    read_message,
)

__all__ = [
    "ErrorCode",
    "ForwardResult",
    "HopHook",
    "SendHook",
    "StageClient",
    "StageError",
    "StageProtocolError",
    "StageRejectedError",
    "StageTimeoutError",
    "StageUnreachableError",
    "WirePayload",
    "as_send_hook",
    "generate_through",
]


class _TensorPortRefused(StageUnreachableError):
    """Connecting to the tensor port failed (nothing was sent)."""


@dataclass(frozen=True)
class ForwardResult:
    """One stage's answer to one step."""

    url: str
    request_id: str
    kind: str
    start_pos: int
    length: int  # tokens in the stage's cache for the request after the step
    hidden: torch.Tensor | None  # output hidden states (not on the last stage)
    token_id: int | None  # greedy next token (last stage only)
    logits: torch.Tensor | None  # last-position logits, when asked (last stage only)
    service_s: float  # compute time measured by the stage
    queue_s: float  # time the step waited for a worker on the stage
    wall_s: float  # send start -> response read, on this side (hook time excluded)
    link_s: float  # time spent awaiting the hop hook before sending
    bytes_sent: int
    bytes_received: int
    batch_size: int = 1  # requests in the stage's batched step that computed this one
    hops: tuple[dict[str, Any], ...] = ()  # a chain: each later hop's timings (stage.route)
    forward_s: float = 0.0  # a chain: seconds the stage spent passing the step on

    @property
    def transfer_s(self) -> float:
        """Wall time not spent computing or queueing: serialisation, HTTP, network."""
        return max(0.0, self.wall_s - self.service_s - self.queue_s)

    @property
    def output(self) -> torch.Tensor | int | None:
        """What the next stage takes (hidden states), or the next token on the last stage."""
        return self.hidden if self.hidden is not None else self.token_id


def _input_tensor(data: Sequence[int] | torch.Tensor) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        t = data
        if t.dim() == 1 and not t.is_floating_point():
            t = t.unsqueeze(0)
        return t
    return torch.tensor([list(data)], dtype=torch.int64)


class StageClient:
    """HTTP client for one stage server (reuses one aiohttp session).

    `session`: share one across clients (the caller closes it); otherwise this client makes
    and closes its own. `timeout_s` bounds each call (override per call).
    """

    def __init__(
        self,
        base_url: str,
        *,
        session: aiohttp.ClientSession | None = None,
        timeout_s: float = 60.0,
        hook: HopHook | SendHook | None = None,
        limits: WireLimits | None = None,
        transport: str = "auto",
        name: str | None = None,
    ):
        if transport not in ("auto", "http", "tcp"):
            raise ValueError(f"transport must be auto, http or tcp, got {transport!r}")
        self.url = base_url.rstrip("/")
        self.name = name or self.url  # how errors name the stage (a node name, or the URL)
        self.transport = transport  # auto: the tensor port when the stage announces one
        self._tcp_port: int | None = None
        self._tcp_resolved = transport == "http"
        self._tcp_ok = False  # a tensor-port exchange has succeeded
        self._tcp_pool: list[Any] = []
        self.timeout_s = timeout_s
        self._hook = as_send_hook(hook)
        self._session = session
        self._own_session = session is None
        self.limits = limits or WireLimits()

    async def start(self) -> None:
        if self._session is None:
            self._session = new_session()

    async def aclose(self) -> None:
        for conn in self._tcp_pool:
            conn.close()
        self._tcp_pool.clear()
        if self._own_session and self._session is not None:
            await self._session.close()
        self._session = None

    async def __aenter__(self) -> StageClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("StageClient not started: use `async with` or await start()")
        return self._session

    def _timeout(self, timeout_s: float | None) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=timeout_s if timeout_s is not None else self.timeout_s)

    async def _call(
        self, what: str, coro_fn: Callable[[], Awaitable[Any]], timeout_s: float
    ) -> Any:
        try:
            async with asyncio.timeout(timeout_s):  # no extra task, unlike wait_for
                return await coro_fn()
        except StageError:  # already one of ours (they are also TimeoutError / OSError)
            raise
        except TimeoutError:
            raise StageTimeoutError(
                f"stage {self.name}: no answer to {what} within {timeout_s:g}s", stage=self.name
            ) from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError) as exc:
            reason = str(exc) or type(exc).__name__
            raise StageUnreachableError(self.name, f"{what}: {reason}") from None

    async def _json(self, method: str, path: str, timeout_s: float | None, **kw: Any) -> Any:
        t = timeout_s if timeout_s is not None else self.timeout_s

        async def go() -> Any:
            async with self.session.request(method, self.url + path, **kw) as resp:
                await _raise_for_status(self.name, resp)
                return await resp.json()

        return await self._call(f"{method} {path}", go, t)

    async def health(self, *, timeout_s: float | None = None) -> dict[str, Any]:
        return await self._json("GET", "/health", timeout_s)

    async def info(self, *, timeout_s: float | None = None) -> dict[str, Any]:
        return await self._json("GET", "/info", timeout_s)

    async def metrics(self, *, timeout_s: float | None = None) -> str:
        t = timeout_s if timeout_s is not None else self.timeout_s

        async def go() -> str:
            async with self.session.get(self.url + "/metrics") as resp:
                await _raise_for_status(self.name, resp)
                return await resp.text()

        return await self._call("GET /metrics", go, t)

    async def release(self, request_id: str, *, timeout_s: float | None = None) -> bool:
        """Free the request's cache on the stage; False when it held none."""
        body = await self._json("POST", "/release", timeout_s, json={"request_id": request_id})
        return bool(body.get("released"))

    async def post_raw(
        self, path: str, body: bytes | WirePayload, *, timeout_s: float | None = None
    ) -> tuple[int, bytes]:
        """POST bytes or a wire payload (tests, benchmarks); returns (status, body), no raising."""
        t = timeout_s if timeout_s is not None else self.timeout_s
        data = WirePayload([memoryview(body)]) if isinstance(body, bytes | bytearray) else body

        async def go() -> tuple[int, bytes]:
            async with self.session.post(self.url + path, data=data) as resp:
                return resp.status, await resp.read()

        return await self._call(f"POST {path}", go, t)

    # -- the tensor port ------------------------------------------------------------------------
    async def _use_tcp(self) -> bool:
        if not self._tcp_resolved:
            info = await self.info()
            port = info.get("tensor_port")
            if port is None and self.transport == "tcp":
                raise StageProtocolError(self.name, "announces no tensor port")
            self._tcp_port = int(port) if port is not None else None
            self._tcp_resolved = True
        return self._tcp_port is not None

    async def _tcp_request(self, parts: Sequence[memoryview]) -> Any:
        from yarl import URL

        from testbed.stage.tensor_port import open_connection

        conn = None
        while self._tcp_pool and conn is None:
            c = self._tcp_pool.pop()
            conn = c if c.usable else None
        if conn is None:
            assert self._tcp_port is not None
            host = URL(self.url).host or "127.0.0.1"
            try:
                conn = await open_connection(host, self._tcp_port, self.limits)
            except OSError as exc:
                raise _TensorPortRefused(
                    self.name, f"tensor port {host}:{self._tcp_port}: {exc}"
                ) from None
        try:
            msg = await conn.request(parts)
        except WireFormatError as exc:
            raise StageProtocolError(self.name, f"malformed response: {exc}") from None
        if len(self._tcp_pool) < MAX_IDLE_CONNECTIONS:
            self._tcp_pool.append(conn)
        else:  # idle connections count against the stage port's cap for every sender
            conn.close()
        status = msg.meta.get("status", 200)
        if status != 200:
            downstream = chain_error(msg.meta)  # a stage further down the route failed
            if downstream is not None:
                raise downstream
            code = parse_code(msg.meta.get("code"))
            raise StageRejectedError(
                self.name, int(status), code, str(msg.meta.get("error", "error"))
            )
        return msg

    async def sink(
        self, tensors: Mapping[str, torch.Tensor], *, timeout_s: float | None = None
    ) -> int:
        """Send tensors to be read, validated and discarded (transfer checks); returns bytes.

        Goes the way `forward` goes: the tensor port when there is one, else HTTP.
        """
        parts = encode_parts({"op": "sink"}, tensors)
        t = timeout_s if timeout_s is not None else self.timeout_s
        if await self._use_tcp():
            msg = await self._call("sink", lambda: self._tcp_request(parts), t)
            return int(msg.meta.get("bytes", 0))

        async def go() -> int:
            async with self.session.post(self.url + "/sink", data=WirePayload(parts)) as resp:
                await _raise_for_status(self.name, resp)
                return int((await resp.json())["bytes"])

        return await self._call("sink", go, t)

    async def forward(
        self,
        request_id: str,
        kind: str,
        start_pos: int,
        data: Sequence[int] | torch.Tensor,
        *,
        want_logits: bool = False,
        timeout_s: float | None = None,
        options: StepOptions = NO_OPTIONS,
        route: Sequence[RouteHop] = (),
        chain_timeout_s: float | None = None,
    ) -> ForwardResult:
        """Send one prefill/decode step: token ids (first stage) or hidden states.

        ``options``: the request's class, its priority (higher is batched first) and the
        seconds this step may wait and still meet its SLO (least slack is batched first among
        equal priorities). ``route``: the stages after this one; the stage forwards its output
        along them and answers with the last one's token (:mod:`testbed.stage.route`), within
        ``chain_timeout_s``."""
        meta: dict[str, Any] = {"request_id": request_id, "kind": kind, "start_pos": start_pos}
        if want_logits:
            meta["want_logits"] = True
        meta.update(options.to_meta())
        if route:
            meta["route"] = route_to_meta(route)
            meta["timeout_s"] = chain_timeout_s if chain_timeout_s is not None else self.timeout_s
        if isinstance(data, torch.Tensor):
            parts = encode_parts(meta, {"input": _input_tensor(data)})
        else:  # token ids: the same bytes, without a tensor
            parts = encode_token_parts(meta, "input", data)
        nbytes = sum(p.nbytes for p in parts)
        use_tcp = await self._use_tcp()
        link_s = 0.0
        if self._hook is not None:
            t_hook = time.perf_counter()
            await self._hook(nbytes)
            link_s = time.perf_counter() - t_hook
        t = timeout_s if timeout_s is not None else self.timeout_s
        what = f"{kind} step of {request_id!r}"
        t0 = time.perf_counter()
        msg = None
        if use_tcp:
            try:
                msg = await self._call(what, lambda: self._tcp_request(parts), t)
                self._tcp_ok = True
            except _TensorPortRefused:
                if self.transport == "tcp" or self._tcp_ok:
                    raise
                # auto, and the tensor port never took a connection (a firewall): use HTTP
                self._tcp_port = None
                t0 = time.perf_counter()
        if msg is None:

            async def go() -> Any:
                async with self.session.post(
                    self.url + "/forward", data=WirePayload(parts)
                ) as resp:
                    await _raise_for_status(self.name, resp)
                    try:
                        return await read_message(resp.content, resp.content_length, self.limits)
                    except WireFormatError as exc:
                        raise StageProtocolError(self.name, f"malformed response: {exc}") from None

            msg = await self._call(what, go, t)
        wall_s = time.perf_counter() - t0
        meta_out = msg.meta
        try:
            token = meta_out.get("token_id")
            return ForwardResult(
                url=self.url,
                request_id=request_id,
                kind=kind,
                start_pos=start_pos,
                length=int(meta_out["length"]),
                hidden=msg.tensors.get("hidden"),
                token_id=None if token is None else int(token),
                logits=msg.tensors.get("logits"),
                service_s=float(meta_out["service_s"]),
                queue_s=float(meta_out.get("queue_s", 0.0)),
                wall_s=wall_s,
                link_s=link_s,
                bytes_sent=nbytes,
                bytes_received=msg.nbytes,
                batch_size=int(meta_out.get("batch_size", 1)),
                hops=tuple(meta_out.get("hops", ())),
                forward_s=float(meta_out.get("forward_s", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StageProtocolError(self.name, f"response meta lacks {exc}") from None


# tensor-port connections a client keeps open between steps (more are opened when more steps
# are in flight, and closed when they end): a stage's port takes 64 connections from all its
# senders together, and hoarded idle ones would leave none for the others
MAX_IDLE_CONNECTIONS = 16
READ_BUFSIZE = 1 << 22  # aiohttp's default (64 KiB) pauses the socket every few reads


def new_session() -> aiohttp.ClientSession:
    """A client session tuned for large bodies on fast links (no connection limit)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), read_bufsize=READ_BUFSIZE)


async def _raise_for_status(stage: str, resp: aiohttp.ClientResponse) -> None:
    """Raise :class:`StageRejectedError` for an error answer, with the code from its body."""
    if resp.status < 400:
        return
    text = await resp.text(errors="replace")
    reason, code = text, None
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    downstream = chain_error(body) if isinstance(body, dict) else None
    if downstream is not None:  # a stage further down the route failed
        raise downstream
    if isinstance(body, dict) and "error" in body:
        reason = str(body["error"])
        code = parse_code(body.get("code"))
    raise StageRejectedError(stage, resp.status, code, reason[:2000] or resp.reason or "error")


async def generate_through(
    stage_urls: Sequence[str],
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    hooks: Sequence[HopHook | SendHook | None] | None = None,
    eos_token_ids: Sequence[int] | None = None,
    timeout_s: float = 60.0,
) -> list[int]:
    """Greedy-generate through the stages in order; returns prompt ids + generated ids.

    Stops at `max_new_tokens` or an EOS token (default: the last stage's EOS ids), as
    `model.generate(do_sample=False)` does.
    """
    from testbed.stage.pipeline import PipelineClient

    async with PipelineClient(stage_urls, hooks=hooks, timeout_s=timeout_s) as pipe:
        result = await pipe.generate(prompt_ids, max_new_tokens, eos_token_ids=eos_token_ids)
    return list(result.token_ids)
