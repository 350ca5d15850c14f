"""Wire format for tensors between the driver and stage servers (never pickle).

One message is::

    b"TBW1" | header_len: uint32 little-endian | header: UTF-8 JSON | payload

The header is a JSON object ``{"meta": {...}, "tensors": [{"name", "dtype", "shape"}, ...]}``;
the payload is the tensors' raw bytes (C order, little-endian) one after another, in the order
the header lists them. Decoding checks everything before trusting it: the magic, the header size
limit, JSON shape, the dtype whitelist, the shape ranks and sizes, and that the byte lengths add
up exactly to the payload. :func:`read_message` does the same on an aiohttp stream, rejecting an
oversized header or body before reading it.
"""

from __future__ import annotations

import array
import json
import math
import struct
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from testbed.errors import TestbedError

MAGIC = b"TBW1"
_PREFIX = struct.Struct("<4sI")
PREFIX_BYTES = _PREFIX.size
CONTENT_TYPE = "application/x-testbed-tensors"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class WireFormatError(TestbedError, ValueError):
    """A message is malformed (HTTP 400), or too large (`too_large`, HTTP 413)."""

    exit_code = 2

    def __init__(self, message: str, *, too_large: bool = False):
        super().__init__(message)
        self.too_large = too_large


@dataclass(frozen=True)
class WireLimits:
    """Upper bounds a reader enforces before allocating anything."""

    max_header_bytes: int = 64 * 1024
    max_body_bytes: int = 1 << 30  # 1 GiB
    max_tensors: int = 8
    max_rank: int = 4


@dataclass(frozen=True)
class WireMessage:
    """Decoded message: JSON metadata and named tensors (CPU, owning their memory)."""

    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    nbytes: int = 0  # size on the wire


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise WireFormatError(
            f"dtype {dtype} cannot travel; allowed: {', '.join(DTYPES)}"
        ) from None


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if sys.byteorder != "little":  # pragma: no cover - all supported hosts are little-endian
        raise WireFormatError("big-endian hosts are not supported")
    if not t.numel():
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]


def encode_parts(
    meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None
) -> list[memoryview]:
    """The message as buffers to send in order (no joining copy); keeps the tensors alive."""
    specs = []
    chunks: list[memoryview] = []
    for name, t in (tensors or {}).items():
        specs.append({"name": name, "dtype": dtype_name(t.dtype), "shape": list(t.shape)})
        chunks.append(_tensor_bytes(t))
    header = json.dumps(
        {"meta": dict(meta), "tensors": specs}, separators=(",", ":"), allow_nan=False
    ).encode()
    return [memoryview(_PREFIX.pack(MAGIC, len(header)) + header), *chunks]


def encode_token_parts(meta: Mapping[str, Any], name: str, ids: Sequence[int]) -> list[memoryview]:
    """``encode_parts(meta, {name: torch.tensor([ids])})`` - one row of int64 token ids - byte
    for byte, without making a tensor (the broker sends one per step)."""
    if sys.byteorder != "little":  # pragma: no cover - all supported hosts are little-endian
        raise WireFormatError("big-endian hosts are not supported")
    body = array.array("q", ids)  # C long long: int64
    specs = [{"name": name, "dtype": "int64", "shape": [1, len(body)]}]
    header = json.dumps(
        {"meta": dict(meta), "tensors": specs}, separators=(",", ":"), allow_nan=False
    ).encode()
    return [memoryview(_PREFIX.pack(MAGIC, len(header)) + header), memoryview(body).cast("B")]


def encode(meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor] | None = None) -> bytes:
    """Serialise metadata (JSON-able) and tensors into one message."""
    return b"".join(encode_parts(meta, tensors))


def parse_prefix(prefix: bytes, limits: WireLimits) -> int:
    if len(prefix) < PREFIX_BYTES:
        raise WireFormatError(
            f"truncated message: {len(prefix)} bytes, need at least {PREFIX_BYTES}"
        )
    magic, header_len = _PREFIX.unpack(prefix[:PREFIX_BYTES])
    if magic != MAGIC:
        raise WireFormatError(f"bad magic {magic!r}: not a testbed tensor message (want {MAGIC!r})")
    if header_len > limits.max_header_bytes:
        raise WireFormatError(
            f"header of {header_len} bytes exceeds the limit of {limits.max_header_bytes}",
            too_large=True,
        )
    return header_len


@dataclass(frozen=True)
class _Spec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


def parse_header(raw: bytes, limits: WireLimits) -> tuple[dict[str, Any], list[_Spec], int]:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireFormatError(f"header is not UTF-8 JSON: {exc}") from None
    except RecursionError:
        raise WireFormatError("header JSON is nested too deeply") from None
    if not isinstance(header, dict) or set(header) - {"meta", "tensors"}:
        raise WireFormatError('header must be a JSON object with keys "meta" and "tensors"')
    meta = header.get("meta", {})
    tensors = header.get("tensors", [])
    if not isinstance(meta, dict):
        raise WireFormatError('header "meta" must be a JSON object')
    if not isinstance(tensors, list):
        raise WireFormatError('header "tensors" must be a list')
    if len(tensors) > limits.max_tensors:
        raise WireFormatError(f"{len(tensors)} tensors exceed the limit of {limits.max_tensors}")
    specs: list[_Spec] = []
    total = 0
    for i, spec in enumerate(tensors):
        where = f"tensors[{i}]"
        if not isinstance(spec, dict) or set(spec) != {"name", "dtype", "shape"}:
            raise WireFormatError(f'{where} must be an object with "name", "dtype", "shape"')
        name, dtype, shape = spec["name"], spec["dtype"], spec["shape"]
        if not isinstance(name, str) or not name or len(name) > 64:
            raise WireFormatError(f"{where}.name must be a non-empty string of <= 64 chars")
        if any(s.name == name for s in specs):
            raise WireFormatError(f"{where}.name {name!r} appears twice")
        if dtype not in DTYPES:
            raise WireFormatError(f"{where}.dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        if (
            not isinstance(shape, list)
            or len(shape) > limits.max_rank
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        ):
            raise WireFormatError(
                f"{where}.shape must be a list of <= {limits.max_rank} non-negative integers, "
                f"got {shape!r}"
            )
        itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
        nbytes = math.prod(shape) * itemsize
        total += nbytes
        if total > limits.max_body_bytes:
            raise WireFormatError(
                f"tensors need {total} bytes, over the limit of {limits.max_body_bytes}",
                too_large=True,
            )
        specs.append(_Spec(name, DTYPES[dtype], tuple(shape), nbytes))
    return meta, specs, total


def build_tensors(specs: list[_Spec], payload: bytearray | memoryview) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for spec in specs:
        if spec.nbytes == 0:
            out[spec.name] = torch.empty(spec.shape, dtype=spec.dtype)
            continue
        itemsize = torch.empty((), dtype=spec.dtype).element_size()
        flat = torch.frombuffer(
            payload, dtype=spec.dtype, count=spec.nbytes // itemsize, offset=offset
        )
        out[spec.name] = flat.view(spec.shape)
        offset += spec.nbytes
    return out


def decode(data: bytes | bytearray | memoryview, limits: WireLimits | None = None) -> WireMessage:
    """Parse and validate a whole message held in memory (copies the payload once)."""
    limits = limits or WireLimits()
    view = memoryview(data)
    if len(view) > PREFIX_BYTES + limits.max_header_bytes + limits.max_body_bytes:
        raise WireFormatError(f"message of {len(view)} bytes is over the limits", too_large=True)
    header_len = parse_prefix(bytes(view[:PREFIX_BYTES]), limits)
    end = PREFIX_BYTES + header_len
    if len(view) < end:
        raise WireFormatError(
            f"truncated message: header says {header_len} header bytes, "
            f"only {len(view) - PREFIX_BYTES} present"
        )
    meta, specs, payload_len = parse_header(bytes(view[PREFIX_BYTES:end]), limits)
    got = len(view) - end
    if got != payload_len:
        raise WireFormatError(
            f"payload is {got} bytes but the tensors' shapes and dtypes need {payload_len}"
            + (" (truncated body)" if got < payload_len else "")
        )
    payload = bytearray(view[end:])
    return WireMessage(meta=meta, tensors=build_tensors(specs, payload), nbytes=len(view))


class _Stream(Protocol):
    async def readexactly(self, n: int) -> bytes: ...
    async def readany(self) -> bytes: ...


async def read_message(
    stream: _Stream,
    content_length: int | None = None,
    limits: WireLimits | None = None,
    *,
    admit: Callable[[dict[str, Any], int], Awaitable[None]] | None = None,
    read_timeout_s: float | None = None,
) -> WireMessage:
    """Read one message from an aiohttp stream, checking limits before reading the body.

    `content_length` (when the sender gave one) must match what the header announces.
    `admit(meta, payload_len)` is awaited after the header is validated and before the payload
    buffer is allocated (the stage reserves memory there, or raises to refuse the message).
    `read_timeout_s`: each read must bring bytes within this many seconds (``TimeoutError``).
    """
    import asyncio

    limits = limits or WireLimits()

    async def within(read: Awaitable[bytes]) -> bytes:
        async with asyncio.timeout(read_timeout_s):
            return await read

    if content_length is not None and content_length > (
        PREFIX_BYTES + limits.max_header_bytes + limits.max_body_bytes
    ):
        raise WireFormatError(f"body of {content_length} bytes is over the limits", too_large=True)
    try:
        prefix = await within(stream.readexactly(PREFIX_BYTES))
    except asyncio.IncompleteReadError as exc:
        raise WireFormatError(
            f"truncated message: {len(exc.partial)} bytes, need at least {PREFIX_BYTES}"
        ) from None
    header_len = parse_prefix(prefix, limits)
    try:
        raw_header = await within(stream.readexactly(header_len))
    except asyncio.IncompleteReadError as exc:
        raise WireFormatError(
            f"truncated message: header says {header_len} header bytes, "
            f"only {len(exc.partial)} present"
        ) from None
    meta, specs, payload_len = parse_header(raw_header, limits)
    total = PREFIX_BYTES + header_len + payload_len
    if content_length is not None and content_length != total:
        raise WireFormatError(
            f"body is {content_length} bytes but the header announces {total}"
            + (" (truncated body)" if content_length < total else "")
        )
    if admit is not None:
        await admit(meta, payload_len)
    payload = bytearray(payload_len)
    view = memoryview(payload)
    try:
        pos = 0
        while pos < payload_len:
            chunk = await within(stream.readany())  # the stream's own buffers: no joining copy
            if not chunk:
                raise WireFormatError(
                    f"truncated body: {pos} of {payload_len} payload bytes arrived"
                )
            take = min(len(chunk), payload_len - pos)
            view[pos : pos + take] = memoryview(chunk)[:take]
            pos += take
            if take < len(chunk):
                raise WireFormatError(f"body is longer than the {total} bytes the header announces")
        if await within(stream.readany()):
            raise WireFormatError(f"body is longer than the {total} bytes the header announces")
    except BaseException:
        # the traceback keeps this frame alive: drop the buffer before the error travels
        view.release()
        del view, payload
        raise
    return WireMessage(meta=meta, tensors=build_tensors(specs, payload), nbytes=total)
