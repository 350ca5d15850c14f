"""How long one stage step takes on an emulated device, and how much KV cache it holds (pure).

A node *is* the device of its profile (e.g. an RTX 3090) holding blocks ``[start, end)`` of the
*studied* model (e.g. Phi-3-medium). One step's time is the sum over its blocks of the cost
model's time for that step (:class:`testbed.cost.model.CostModel`: roofline, or a measured
profile scaled to the device), plus the embedding on the first stage and the LM head (one
position) on the last:

* prefill of ``q`` prompt tokens: each block's ``block_prefill_s(device, q)``;
* decode at context ``c`` (tokens already cached): each block's ``block_decode_s(device, c)``.

With a measured profile each block keeps its measured time as the truth on the measuring device
and is scaled by the ratio of roofline estimates (the cost model's calibration, per step here).

Time dilation ``k`` (DieCast): every emulated time is multiplied by ``k``.

KV capacity: the device's memory after the weights of its blocks (and embedding / head where
held), divided by the studied model's KV bytes per token over those blocks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from testbed.cost.model import CostModel, roofline_s
from testbed.errors import ConfigError
from testbed.spec.devices import DeviceProfile
from testbed.spec.model_profile import MeasuredProfile, ModelProfile

StepKind = Literal["prefill", "decode"]


class EmulationSpec(BaseModel):
    """What one emulated stage server needs; travels as JSON on `stage serve --emulate`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    node: str = ""  # the node's name (messages only)
    profile: ModelProfile  # the studied model at its dtype (drives time, bytes and memory)
    device: DeviceProfile  # the emulated device
    measured: MeasuredProfile | None = None  # a measured profile of the studied model
    dilation: float = Field(default=1.0, ge=1.0)  # time dilation k: emulated times x k
    # a timeline slowdown (`speed:` events, POST /speed): every step window / speed
    speed: float = Field(default=1.0, gt=0.0, le=64.0)

    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=True)

    @classmethod
    def from_json(cls, text: str, source: str = "--emulate") -> EmulationSpec:
        from pydantic import ValidationError

        try:
            return cls.model_validate(json.loads(text))
        except (json.JSONDecodeError, ValidationError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else repr(exc)
            raise ConfigError(
                f"not an emulation spec ({first}); it is written by the runtimes from the "
                "scenario's `execution: emulated`",
                field=source,
            ) from None


@dataclass(frozen=True)
class StageTiming:
    """Predicted step times and KV capacity of blocks [start, end) of the studied model on
    the emulated device."""

    spec: EmulationSpec
    start: int
    end: int

    def __post_init__(self) -> None:
        n = self.spec.profile.num_blocks
        if not 0 <= self.start < self.end <= n:
            raise ConfigError(
                f"blocks {self.start}:{self.end} are not inside the studied model's 0:{n}",
                field="--blocks",
            )
        object.__setattr__(self, "_cost", CostModel(self.spec.profile, self.spec.measured))

    @property
    def cost(self) -> CostModel:
        return self._cost  # type: ignore[attr-defined]

    @property
    def num_blocks(self) -> int:
        return self.end - self.start

    @property
    def is_first(self) -> bool:
        return self.start == 0

    @property
    def is_last(self) -> bool:
        return self.end == self.spec.profile.num_blocks

    # -- time ------------------------------------------------------------------------------------
    def step_s(self, kind: StepKind, tokens: int, context: int) -> float:
        """Emulated seconds of one step: ``tokens`` new tokens over ``context`` cached ones."""
        if tokens < 1 or context < 0:
            raise ValueError(f"a step needs tokens >= 1 and context >= 0, got {tokens}, {context}")
        dev, cost, prof = self.spec.device, self.cost, self.spec.profile
        m = self.spec.measured
        ref = cost._ref
        total = 0.0
        if kind == "prefill":
            per = cost.block_prefill_s(dev, tokens)
            if m is not None and ref is not None:
                ref_est = cost.block_prefill_s(ref, m.prompt_tokens)
                for b in m.blocks[self.start : self.end]:
                    total += cost._calibrated(per, b.prefill_s, ref_est)
            else:
                total += per * self.num_blocks
        elif kind == "decode":
            per = cost.block_decode_s(dev, context)
            if m is not None and ref is not None:
                ref_est = cost.block_decode_s(ref, m.context_tokens)
                for b in m.blocks[self.start : self.end]:
                    total += cost._calibrated(per, b.decode_s, ref_est)
            else:
                total += per * self.num_blocks
        else:
            raise ValueError(f"step kind {kind!r} is not prefill or decode")
        if self.is_first:
            if m is not None and ref is not None:
                t = (
                    (m.embed.prefill_s * tokens / m.prompt_tokens)
                    if kind == "prefill"
                    else (m.embed.decode_s)
                )
                total += t * cost._device_ratio(dev)
            else:
                total += roofline_s(0.0, prof.embed_bytes(tokens), dev)
        if self.is_last:
            if m is not None and ref is not None:
                t = m.head.prefill_s if kind == "prefill" else m.head.decode_s
                total += t * cost._device_ratio(dev)
            else:
                total += roofline_s(prof.head_flops(1), prof.head_bytes(1), dev)
        return total * self.spec.dilation

    def batch_s(self, rows: Sequence[tuple[StepKind, int, int]]) -> float:
        """Emulated seconds of one batched step over ``rows`` (kind, new tokens, context): the
        rows' single-step times scaled by the roofline of the batch over the sum of the rows'
        own rooflines (weights read once, FLOPs and KV traffic summed), so a batch of one is
        exactly :meth:`step_s` and a measured profile keeps its per-block factors."""
        singles = [self.step_s(kind, tokens, context) for kind, tokens, context in rows]
        if len(rows) <= 1:
            return sum(singles)
        dev, cost = self.spec.device, self.cost
        prompts = [t for kind, t, _ in rows if kind == "prefill"]
        contexts = [c for kind, _, c in rows if kind == "decode"]
        together = cost.block_batch_s(dev, prompts, contexts)
        apart = sum(
            cost.block_batch_s(dev, [t], [])
            if kind == "prefill"
            else cost.block_batch_s(dev, [], [c])
            for kind, t, c in rows
        )
        return sum(singles) * together / apart if apart > 0 else sum(singles)

    # -- memory and bytes ------------------------------------------------------------------------
    def weight_bytes(self) -> int:
        p = self.spec.profile
        total = self.num_blocks * p.block_weight_bytes()
        if self.is_first:
            total += p.embed_weight_bytes()
        if self.is_last:
            total += p.head_weight_bytes()
        return total

    def kv_bytes_per_token(self) -> int:
        """KV bytes one token takes over this stage's blocks."""
        return self.num_blocks * self.spec.profile.kv_bytes_per_token()

    def kv_capacity_tokens(self) -> int:
        """Tokens of KV cache the device holds after its weights (>= 1, else ConfigError)."""
        free = self.spec.device.mem - self.weight_bytes()
        cap = free // self.kv_bytes_per_token()
        if cap < 1:
            gib = 2**30
            raise ConfigError(
                f"{self.spec.node or 'node'}: blocks {self.start}:{self.end} of "
                f"{self.spec.profile.arch.name} need {self.weight_bytes() / gib:.1f} GiB of "
                f"weights but the device has {self.spec.device.mem / gib:.1f} GiB; the plan "
                "does not fit this device",
                field="--blocks",
            )
        return int(cap)

    def activation_bytes_per_token(self) -> int:
        """Bytes of one token's hidden state on the wire (studied hidden size x dtype)."""
        return self.spec.profile.activation_bytes_per_token()
