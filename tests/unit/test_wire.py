"""Wire format: round trips, and strict rejection of malformed or oversized messages."""

from __future__ import annotations

import asyncio
import json
import struct

import pytest
import torch

from testbed.stage.wire import (
    MAGIC,
    WireFormatError,
    WireLimits,
    decode,
    encode,
    encode_parts,
    encode_token_parts,
    read_message,
)


def _frame(header: object, payload: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<4sI", MAGIC, len(raw)) + raw + payload


@pytest.mark.parametrize(
    "tensor",
    [
        torch.randn(1, 5, 8),
        torch.randn(3, 4).to(torch.bfloat16),
        torch.randn(2, 2).to(torch.float16),
        torch.tensor([[1, 2, 3]], dtype=torch.int64),
        torch.tensor([7], dtype=torch.int32),
        torch.empty(1, 0, 8),
        torch.randn(4, 6)[:, ::2],  # not contiguous
    ],
)
def test_round_trip_keeps_dtype_shape_and_bits(tensor):
    msg = decode(encode({"request_id": "r", "n": 1}, {"x": tensor}))
    out = msg.tensors["x"]
    assert msg.meta == {"request_id": "r", "n": 1}
    assert out.dtype == tensor.dtype and out.shape == tensor.shape
    assert torch.equal(out, tensor)
    out.add_(0)  # decoded tensors own writable memory


def test_several_tensors_keep_order_and_meta_only_messages_work():
    a, b = torch.randn(2, 3), torch.arange(5)
    msg = decode(encode({}, {"a": a, "b": b}))
    assert list(msg.tensors) == ["a", "b"]
    assert torch.equal(msg.tensors["a"], a) and torch.equal(msg.tensors["b"], b)
    assert decode(encode({"k": [1, 2]})).tensors == {}


def test_unsupported_dtype_is_refused_on_encode():
    with pytest.raises(WireFormatError, match="cannot travel"):
        encode({}, {"x": torch.zeros(2, dtype=torch.float64)})


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"", "truncated"),
        (b"XXXX\x00\x00\x00\x00", "bad magic"),
        (struct.pack("<4sI", MAGIC, 100) + b"{}", "truncated message: header says 100"),
        (struct.pack("<4sI", MAGIC, 3) + b"\xff\xfe{", "not UTF-8 JSON"),
        (_frame([1, 2]), "JSON object"),
        (_frame({"meta": {}, "tensors": [], "x": 1}), "JSON object"),
        (_frame({"meta": [], "tensors": []}), '"meta" must be'),
        (_frame({"meta": {}, "tensors": {}}), '"tensors" must be a list'),
        (_frame({"tensors": [{"name": "x", "dtype": "float64", "shape": [1]}]}), "not one of"),
        (_frame({"tensors": [{"name": "x", "dtype": "float32", "shape": [-1]}]}), "non-negative"),
        (_frame({"tensors": [{"name": "x", "dtype": "float32", "shape": [1.5]}]}), "non-negative"),
        (_frame({"tensors": [{"name": "x", "dtype": "float32", "shape": [True]}]}), "non-negative"),
        (_frame({"tensors": [{"name": "x", "dtype": "float32", "shape": [1] * 5}]}), "<= 4"),
        (_frame({"tensors": [{"name": "x", "dtype": "float32"}]}), "must be an object"),
        (_frame({"tensors": [{"name": "", "dtype": "float32", "shape": [1]}]}), "name"),
        (
            _frame(
                {
                    "tensors": [
                        {"name": "x", "dtype": "int32", "shape": [1]},
                        {"name": "x", "dtype": "int32", "shape": [1]},
                    ]
                },
                b"\0" * 8,
            ),
            "appears twice",
        ),
        # shape says 4 floats = 16 bytes; 12 present / 20 present
        (
            _frame({"tensors": [{"name": "x", "dtype": "float32", "shape": [4]}]}, b"\0" * 12),
            "truncated body",
        ),
        (
            _frame({"tensors": [{"name": "x", "dtype": "float32", "shape": [4]}]}, b"\0" * 20),
            "need 16",
        ),
    ],
)
def test_malformed_messages_are_rejected_with_a_reason(data, match):
    with pytest.raises(WireFormatError, match=match) as info:
        decode(data)
    assert not info.value.too_large


def test_size_limits_are_enforced_before_allocating():
    limits = WireLimits(max_header_bytes=1024, max_body_bytes=1024, max_tensors=2)
    huge_header = struct.pack("<4sI", MAGIC, 1 << 30)
    with pytest.raises(WireFormatError, match="exceeds the limit") as info:
        decode(huge_header, limits)
    assert info.value.too_large
    big = _frame({"tensors": [{"name": "x", "dtype": "float32", "shape": [1 << 20, 1 << 20]}]})
    with pytest.raises(WireFormatError, match="over the limit") as info:
        decode(big)  # 4 TiB announced: refused without allocating
    assert info.value.too_large
    many = [{"name": f"t{i}", "dtype": "int32", "shape": [0]} for i in range(3)]
    with pytest.raises(WireFormatError, match="exceed the limit of 2"):
        decode(_frame({"tensors": many}), limits)


class _Stream:
    """The two StreamReader calls read_message uses, over bytes delivered in small chunks."""

    def __init__(self, data: bytes, chunk: int = 7):
        self.data, self.pos, self.chunk = data, 0, chunk
        self.reads = 0

    async def readexactly(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            part = self.data[self.pos :]
            self.pos = len(self.data)
            raise asyncio.IncompleteReadError(part, n)
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    async def readany(self) -> bytes:
        self.reads += 1
        out = self.data[self.pos : self.pos + self.chunk]
        self.pos += len(out)
        return out


async def test_read_message_from_a_stream_matches_decode():
    t = torch.randn(1, 9, 16)
    data = encode({"request_id": "a"}, {"hidden": t})
    msg = await read_message(_Stream(data), len(data))
    assert torch.equal(msg.tensors["hidden"], t) and msg.nbytes == len(data)


async def test_read_message_rejects_truncation_length_mismatch_and_trailing_bytes():
    data = encode({}, {"x": torch.randn(10)})
    with pytest.raises(WireFormatError, match="truncated body"):
        await read_message(_Stream(data[:-5]))
    with pytest.raises(WireFormatError, match="truncated"):
        await read_message(_Stream(data[:6]))
    with pytest.raises(WireFormatError, match="announces"):
        await read_message(_Stream(data), len(data) - 5)
    with pytest.raises(WireFormatError, match="longer than"):
        await read_message(_Stream(data + b"xx"))


async def test_read_message_refuses_a_huge_header_without_reading_it():
    stream = _Stream(struct.pack("<4sI", MAGIC, 10 << 20) + b"x" * 1000)
    with pytest.raises(WireFormatError, match="exceeds the limit") as info:
        await read_message(stream)
    assert info.value.too_large and stream.pos == 8


def test_token_ids_encode_byte_for_byte_as_their_tensor() -> None:
    meta = {"request_id": "r", "kind": "prefill", "start_pos": 0}
    for ids in ([5, 0, 2**40, -3], [7], []):
        fast = b"".join(encode_token_parts(meta, "input", ids))
        ref = b"".join(encode_parts(meta, {"input": torch.tensor([ids], dtype=torch.int64)}))
        assert fast == ref
        assert decode(fast).tensors["input"].tolist() == [ids]
