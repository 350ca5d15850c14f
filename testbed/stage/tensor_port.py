"""The tensor port: the same wire messages as ``POST /forward``, over a plain TCP connection.

Why: aiohttp copies a request body three times on the way in (socket -> bytes, parser slice,
our buffer); hidden states of a long prompt are megabytes per hop. Here an
``asyncio.BufferedProtocol`` receives each payload straight into the buffer the tensor will
use (one copy, as a raw socket copy does), and sends in slices paced by the transport's flow
control (Python 3.11's transport would otherwise copy and memmove a big unsent rest).

Protocol, per connection, strictly request -> response:

- request: a wire message (:mod:`testbed.stage.wire`) whose meta has ``op`` = ``"forward"``
  (then the /forward meta keys) or ``"sink"`` (read and discard, for transfer checks);
- response: a wire message whose meta has ``status`` (200, or the HTTP-like error status) and,
  for errors, ``error`` and ``code`` (:class:`testbed.stage.errors.ErrorCode`, as in the HTTP
  error body), and ``closing: true`` when the port closes the connection after it (a framing
  error, a refused payload, a connection over the cap); a forward's response meta and tensors
  are those of ``/forward``.

A malformed frame gets an error response and the connection is closed (its framing is lost);
a well-framed bad request gets a 4xx response and the connection stays usable. The HTTP API
stays the reference path; clients use this port when the stage's /info announces it.

The port knows the stage server only through :class:`TensorPortHandler` (this module does not
import the server; the server starts the port with :func:`start_tensor_port`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, Protocol

from testbed.stage.errors import ErrorCode, StageRejectedError, status_and_code
from testbed.stage.forward import ForwardReply
from testbed.stage.limits import InputLimits, Reservation
from testbed.stage.tensor_frames import _DISCARD, _WAIT, SEND_SLICE, _FrameProtocol
from testbed.stage.wire import WireFormatError, WireLimits, WireMessage, encode_parts

__all__ = [
    "SEND_SLICE",
    "TensorClientConnection",
    "TensorPortHandler",
    "TensorPortServer",
    "TensorServerProtocol",
    "open_connection",
    "start_tensor_port",
]

_LINGER_S = 2.0  # after a framing error: read and drop input this long, then close


class TensorPortHandler(Protocol):
    """What the tensor port needs from a stage server."""

    async def forward_message(self, msg: WireMessage) -> ForwardReply:
        """Run a /forward message; raise :class:`StageRejectedError` to refuse it."""
        ...

    def note_bytes_in(self, nbytes: int) -> None:
        """A sink message of ``nbytes`` arrived."""
        ...

    def reserve_now(self, op: str, nbytes: int) -> Reservation | None:
        """Memory for a payload of ``op`` when it fits now, else None; raise
        :class:`StageRejectedError` to refuse it (too large, shutting down)."""
        ...

    async def reserve_payload(self, op: str, nbytes: int) -> Reservation:
        """Memory for a payload, waiting for it; raise :class:`StageRejectedError` to refuse."""
        ...

    def note_refused(self, status: int, code: ErrorCode | None) -> None:
        """A framing error was answered (the connection closes after it)."""
        ...


class TensorServerProtocol(_FrameProtocol):
    """Server side: one request at a time per connection, answered by a handler."""

    def __init__(
        self,
        handler: TensorPortHandler,
        limits: WireLimits,
        conns: set[Any],
        max_connections: int = 64,
    ):
        super().__init__(limits)
        self.handler = handler
        self._conns = conns  # the port's open connections (closed with it)
        self._max_connections = max_connections
        self._task: asyncio.Task[None] | None = None
        self._held: Reservation | None = None  # the memory the payload being read holds

    @property
    def busy(self) -> bool:
        """A message is being handled or waits for memory (not a stalled sender)."""
        return self._task is not None and not self._task.done()

    def _op(self) -> str:
        op = self._meta.get("op", "forward")
        return op if isinstance(op, str) else repr(op)

    def _begin_payload(self, payload_len: int) -> bool:
        try:
            held = self.handler.reserve_now(self._op(), payload_len)
        except StageRejectedError as exc:
            self._answer_and_close(exc.body())
            return False
        if held is None:  # wait for memory without reading on (the sender's bytes stay queued)
            assert self.transport is not None
            self.transport.pause_reading()
            self._state = _WAIT
            self._task = asyncio.get_running_loop().create_task(self._wait_memory(payload_len))
            return False
        self._held = held
        return super()._begin_payload(payload_len)

    async def _wait_memory(self, payload_len: int) -> None:
        try:
            held = await self.handler.reserve_payload(self._op(), payload_len)
        except StageRejectedError as exc:
            self._answer_and_close(exc.body())
            return
        if self._closed:
            held.release()
            return
        self._held = held
        super()._begin_payload(payload_len)
        self._task = None
        if payload_len:
            assert self.transport is not None
            self.last_rx = time.monotonic()
            self.transport.resume_reading()
        else:
            self._finish()

    def _release_held(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.release()

    def _on_message(self, msg: WireMessage) -> None:
        assert self.transport is not None
        self.transport.pause_reading()
        self._task = asyncio.get_running_loop().create_task(self._handle(msg))

    async def _handle(self, msg: WireMessage) -> None:
        op = msg.meta.get("op", "forward")
        try:
            if op == "sink":
                self.handler.note_bytes_in(msg.nbytes)
                parts = encode_parts({"status": 200, "bytes": msg.nbytes})
            elif op == "forward":
                try:
                    parts = (await self.handler.forward_message(msg)).parts
                except StageRejectedError as exc:
                    parts = encode_parts(exc.body())
            else:
                error = {"status": 400, "error": f"unknown op {op!r}", "code": ErrorCode.BAD_INPUT}
                parts = encode_parts(error)
            await self.send(parts)
        except ConnectionError:
            return
        finally:
            del msg
            self._release_held()
        self._reset()
        self.last_rx = time.monotonic()
        if self.transport is not None and not self._closed:
            self.transport.resume_reading()

    def _frame_error(self, exc: WireFormatError) -> None:
        # The framing is lost: answer, half-close, drop whatever else arrives, then close.
        # (Closing with unread input would reset the connection before the answer is read.)
        status, code = status_and_code(exc)
        self.handler.note_refused(status, code)
        self._answer_and_close({"status": status, "error": str(exc), "code": code})

    def _answer_and_close(self, body: dict[str, Any]) -> None:
        """Send an error answer, half-close, drop whatever else arrives, then close."""
        self._state = _DISCARD
        self._buf, self._pos = bytearray(0), 0
        self._release_held()
        tr = self.transport
        if tr is None or self._closed:
            return
        for part in encode_parts({**body, "closing": True}):  # the client must not reuse it
            tr.write(part)
        if tr.can_write_eof():
            tr.write_eof()
        tr.resume_reading()  # to drain (and drop) the rest
        asyncio.get_running_loop().call_later(_LINGER_S, tr.close)

    def eof_received(self) -> bool | None:
        return False  # the peer is done: close our side too

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if len(self._conns) >= self._max_connections:
            self.handler.note_refused(429, ErrorCode.BUSY)
            self._answer_and_close(
                {
                    "status": 429,
                    "code": ErrorCode.BUSY,
                    "error": f"the tensor port holds {len(self._conns)} connections "
                    f"(max {self._max_connections}); retry later",
                }
            )
            return
        self._conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._conns.discard(self)
        self._buf = bytearray(0)  # a half-read payload goes with the connection
        self._release_held()
        if self._task is not None and not self._task.done():
            self._task.cancel()


class TensorClientConnection(_FrameProtocol):
    """Client side: send a request, await the response message."""

    def __init__(self, limits: WireLimits):
        super().__init__(limits)
        self._waiter: asyncio.Future[WireMessage] | None = None
        # an answer before any request: the port refused the connection (its cap, 429 busy)
        # and closes it; the next request gets that answer instead of a reset connection
        self._early: WireMessage | None = None

    def _on_message(self, msg: WireMessage) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(msg)
        elif self._waiter is None:
            self._early = msg
        self._reset()

    def _frame_error(self, exc: WireFormatError) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(
                ConnectionResetError(f"connection closed by the stage ({exc or 'EOF'})")
            )

    @property
    def usable(self) -> bool:
        return not self._closed and self._waiter is None

    async def request(self, parts: Sequence[memoryview]) -> WireMessage:
        if self._early is not None:  # refused before it was asked: that is the answer
            msg, self._early = self._early, None
            self.close()
            return msg
        if not self.usable:
            raise ConnectionResetError("connection not usable")
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self.send(parts)
            msg = await self._waiter
            if msg.meta.get("closing"):  # refused and half-closed by the port: not reusable
                self.close()
            return msg
        except BaseException:
            self.close()  # state unknown after a failure or a cancel
            raise
        finally:
            self._waiter = None

    def close(self) -> None:
        self._closed = True
        if self.transport is not None:
            self.transport.close()


async def open_connection(host: str, port: int, limits: WireLimits) -> TensorClientConnection:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(lambda: TensorClientConnection(limits), host, port)
    return proto


class TensorPortServer:
    """A listening tensor port and its open connections."""

    def __init__(
        self,
        server: asyncio.Server,
        conns: set[TensorServerProtocol],
        inputs: InputLimits | None = None,
    ):
        self._server = server
        self._conns = conns
        self.inputs = inputs or InputLimits()
        self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        """Abort connections whose sender stalled mid-message (their buffers and memory go
        with them) and close connections idle between messages."""
        lim = self.inputs
        period_s = min(max(min(lim.read_timeout_s, lim.idle_timeout_s) / 4, 0.05), 5.0)
        while True:
            await asyncio.sleep(period_s)
            now = time.monotonic()
            for conn in list(self._conns):
                quiet_s = now - conn.last_rx
                if conn.transport is None or conn.busy:
                    continue
                if conn.mid_message and quiet_s > lim.read_timeout_s:
                    conn.transport.abort()
                elif not conn.mid_message and quiet_s > lim.idle_timeout_s:
                    conn.transport.close()

    @property
    def port(self) -> int:
        return int(self._server.sockets[0].getsockname()[1])

    def close(self) -> None:
        """Stop listening (open connections stay; :meth:`aclose` ends them too)."""
        self._server.close()

    async def wait_closed(self) -> None:
        await self._server.wait_closed()

    async def aclose(self) -> None:
        from testbed.stage.tasks import cancel_and_wait

        await cancel_and_wait(self._reaper)
        self._server.close()
        for conn in list(self._conns):
            if conn.transport is not None:
                conn.transport.close()
        await self._server.wait_closed()


async def start_tensor_port(
    handler: TensorPortHandler,
    host: str,
    port: int,
    limits: WireLimits,
    inputs: InputLimits | None = None,
) -> TensorPortServer:
    """Listen on ``host:port`` (0 = any free port) and answer with ``handler``, under
    ``inputs``' connection cap and timeouts."""
    loop = asyncio.get_running_loop()
    inputs = inputs or InputLimits()
    conns: set[TensorServerProtocol] = set()
    server = await loop.create_server(
        lambda: TensorServerProtocol(handler, limits, conns, inputs.max_connections), host, port
    )
    return TensorPortServer(server, conns, inputs)
