"""The tensor port's framing, shared by its server and client halves
(:mod:`testbed.stage.tensor_port`): an ``asyncio.BufferedProtocol`` that receives each wire
message's payload straight into the buffer its tensors will use, and sends in slices paced by
the transport's flow control."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any, cast

from testbed.stage.wire import (
    PREFIX_BYTES,
    WireFormatError,
    WireLimits,
    WireMessage,
    build_tensors,
    parse_header,
    parse_prefix,
)

SEND_SLICE = 1 << 20
_PREFIX, _HEADER, _PAYLOAD, _IDLE, _DISCARD, _WAIT = range(6)  # _WAIT: for memory budget


class _FrameProtocol(asyncio.BufferedProtocol):
    """Reads wire messages into their final buffers; subclasses handle whole messages."""

    def __init__(self, limits: WireLimits):
        self.limits = limits
        self.transport: asyncio.Transport | None = None
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._closed = False
        self.last_rx = time.monotonic()  # when bytes last arrived (or an answer went out)
        self._reset()

    # -- reading ------------------------------------------------------------------------------
    def _reset(self) -> None:
        self._state = _PREFIX
        self._buf: bytearray = bytearray(PREFIX_BYTES)
        self._pos = 0
        self._header_len = 0
        self._meta: dict[str, Any] = {}
        self._specs: list[Any] = []

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._state in (_IDLE, _DISCARD, _WAIT):  # not expecting data: into a scratch
            self._buf, self._pos = bytearray(65536), 0
        return memoryview(self._buf)[self._pos :]

    @property
    def mid_message(self) -> bool:
        """Part of a message has arrived and the rest is awaited from the peer."""
        return self._state in (_HEADER, _PAYLOAD) or (self._state == _PREFIX and self._pos > 0)

    def buffer_updated(self, nbytes: int) -> None:
        self.last_rx = time.monotonic()
        if self._state == _DISCARD:
            return
        if self._state in (_IDLE, _WAIT):
            self._frame_error(WireFormatError("data arrived before the previous answer"))
            return
        self._pos += nbytes
        if self._pos < len(self._buf):
            return
        try:
            if self._state == _PREFIX:
                self._header_len = parse_prefix(bytes(self._buf), self.limits)
                self._state, self._buf, self._pos = _HEADER, bytearray(self._header_len), 0
                if self._header_len:
                    return
            if self._state == _HEADER:
                self._meta, self._specs, payload_len = parse_header(bytes(self._buf), self.limits)
                self._total = PREFIX_BYTES + self._header_len + payload_len
                self._buf = bytearray(0)  # the header is parsed: drop it
                if not self._begin_payload(payload_len) or payload_len:
                    return  # waiting for memory or refused, or the payload is to come
        except WireFormatError as exc:
            self._frame_error(exc)
            return
        self._finish()

    def _begin_payload(self, payload_len: int) -> bool:
        """Make the payload's buffer; False when the message must wait or was refused (the
        server side reserves memory first)."""
        self._state, self._buf, self._pos = _PAYLOAD, bytearray(payload_len), 0
        return True

    def _finish(self) -> None:
        """The whole message is in: hand it on."""
        try:
            tensors = build_tensors(self._specs, self._buf)
        except WireFormatError as exc:
            self._frame_error(exc)
            return
        self._state = _IDLE
        self._on_message(WireMessage(meta=self._meta, tensors=tensors, nbytes=self._total))

    def _frame_error(self, exc: WireFormatError) -> None:
        raise NotImplementedError

    def _on_message(self, msg: WireMessage) -> None:
        raise NotImplementedError

    # -- connection ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's implements the interface without subclassing it)
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=4 * SEND_SLICE)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            import socket

            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._can_write.set()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    async def send(self, parts: Sequence[memoryview]) -> None:
        """Write buffers in slices, waiting for the transport to drain (flow control)."""
        for part in parts:
            for off in range(0, part.nbytes, SEND_SLICE):
                if self._closed or self.transport is None:
                    raise ConnectionResetError("connection closed while sending")
                await self._can_write.wait()
                self.transport.write(part[off : off + SEND_SLICE])
        await self._can_write.wait()
        if self._closed:
            raise ConnectionResetError("connection closed while sending")
