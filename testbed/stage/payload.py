"""The HTTP body of a wire message (:mod:`testbed.stage.wire`): its buffers written one after
another, in slices, with no joining copy. Used by the stage client's requests and the stage
server's /forward answers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import aiohttp

from testbed.stage.wire import CONTENT_TYPE

_WRITE_SLICE = 1 << 20


class WirePayload(aiohttp.payload.Payload):
    """An aiohttp body made of wire buffers, written one after another (no joining copy)."""

    def __init__(self, parts: Sequence[memoryview]):
        super().__init__(parts, content_type=CONTENT_TYPE)
        self._parts = list(parts)
        self._nbytes = sum(p.nbytes for p in self._parts)
        self._size = self._nbytes

    @property
    def nbytes(self) -> int:
        return self._nbytes

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        raise TypeError("a tensor message is binary")

    async def as_bytes(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return b"".join(self._parts)

    async def write(self, writer: Any) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: Any, content_length: int | None) -> None:
        # Slices with a drain in between: one huge transport.write() makes asyncio copy the
        # unsent rest into its buffer and memmove it on every partial send (quadratic).
        left = self._nbytes if content_length is None else content_length
        for part in self._parts:
            for off in range(0, part.nbytes, _WRITE_SLICE):
                if left <= 0:
                    return
                chunk = part[off : off + min(_WRITE_SLICE, left)]
                await writer.write(chunk)
                await writer.drain()
                left -= chunk.nbytes
