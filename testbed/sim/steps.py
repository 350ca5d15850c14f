"""Step times per node: one prefill over P tokens, one decode step at context c (pure).

From the cost model (roofline, or a measured profile scaled to the node's device), per stage
segment: the node's blocks, plus the embedding and the head where the stage holds them. A
decode step at context c is the difference between a request of (c, 2) and one of (c, 1)
tokens, so the measured-profile calibration applies exactly as the planner sees it.

A :class:`CalibratedProfile` (``testbed calibrate``) overrides the nodes it names with a fitted
line: ``fixed_s + per_token_s * new_tokens + per_context_s * context_tokens`` (prefill: P new
tokens, context 0; decode step: 1 new token at context c; a batch: the sums over its steps),
scaled by the number of blocks the node serves now over the number it served when measured
(when that is known).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from testbed.broker.layout import Layout, StageInfo
from testbed.cost.model import CostModel, roofline_s
from testbed.cost.planner import NodeBlockFn
from testbed.spec.devices import DeviceProfile
from testbed.spec.plan import RequestShape

CALIBRATED_KIND: Literal["testbed.calibrated-profile"] = "testbed.calibrated-profile"


class StepFit(BaseModel):
    """Fitted step time of one node (seconds)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fixed_s: float
    per_token_s: float
    per_context_s: float
    samples: int = 0
    rmse_s: float = 0.0
    blocks: int | None = None  # blocks the node served when measured (None: unknown)

    def step_s(self, new_tokens: int, context_tokens: int) -> float:
        return max(
            0.0,
            self.fixed_s + self.per_token_s * new_tokens + self.per_context_s * context_tokens,
        )


def per_block_request_s(fit: StepFit, prompt_tokens: int, output_tokens: int) -> float | None:
    """One request's time (prefill + every decode step) per block, for the planner: the fitted
    segment time spread evenly over the blocks it covered (None if their number is unknown)."""
    if not fit.blocks:
        return None
    p, steps = prompt_tokens, max(output_tokens - 1, 0)
    total = fit.step_s(p, 0) + sum(fit.step_s(1, p + i) for i in range(steps))
    return total / fit.blocks


class HopFit(BaseModel):
    """Fitted transfer time of one hop "sender->receiver": fixed_s + per_byte_s * bytes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fixed_s: float
    per_byte_s: float
    samples: int = 0


class CalibratedProfile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["testbed.calibrated-profile"] = CALIBRATED_KIND
    version: Literal[1] = 1
    source: str = ""  # the run folder it was fitted from
    nodes: dict[str, StepFit] = Field(default_factory=dict)
    hops: dict[str, HopFit] = Field(default_factory=dict)
    hop_overhead_s: float = 0.0  # per hop, on top of the link model (median fitted excess)


def is_calibrated_profile(path: Path) -> bool:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("kind") == CALIBRATED_KIND


def load_calibrated_profile(path: str | Path) -> CalibratedProfile:
    from testbed.spec.loading import read_mapping, validate

    return validate(CalibratedProfile, read_mapping(Path(path), "calibrated profile"), str(path))


def planner_times(calibrated: CalibratedProfile | None) -> NodeBlockFn | None:
    """The calibrated nodes' per-block times for the planner (None: plan from the cost model)."""
    if calibrated is None or not calibrated.nodes:
        return None
    fits = calibrated.nodes

    def per_block(node: str, shape: RequestShape) -> float | None:
        fit = fits.get(node)
        return (
            None
            if fit is None
            else per_block_request_s(fit, shape.prompt_tokens, shape.output_tokens)
        )

    return per_block


@dataclass
class StepTimes:
    """Per node: ``prefill_s(node, P)`` and ``decode_s(node, context)``, cached."""

    layout: Layout
    cost: CostModel
    calibrated: CalibratedProfile | None = None
    _group: dict[str, int] = field(init=False, default_factory=dict)  # node -> (stage, device) id
    _keys: list[tuple[int, DeviceProfile]] = field(init=False, default_factory=list)
    _pre: list[dict[int, float]] = field(init=False, default_factory=list)  # per group: P -> s
    _dec: list[dict[int, float]] = field(init=False, default_factory=list)  # per group: ctx -> s
    # per (group, prompt or -1 - context): one block's step FLOPs, bytes less the weights, and
    # single-step roofline (for batch times)
    _one: dict[tuple[int, int], tuple[float, float, float]] = field(
        init=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        ids: dict[tuple[int, DeviceProfile], int] = {}
        for name, info in self.layout.nodes.items():
            key = (info.stage, info.device)
            if key not in ids:
                ids[key] = len(self._keys)
                self._keys.append(key)
                self._pre.append({})
                self._dec.append({})
            self._group[name] = ids[key]

    def _segment_s(self, stage: StageInfo, device: DeviceProfile, p: int, o: int) -> float:
        shape = RequestShape(prompt_tokens=max(p, 1), output_tokens=o, concurrency=1)
        c = self.cost
        t = float(c.block_request_times(device, shape)[stage.start : stage.end].sum())
        if stage.holds_embedding:
            t += c.embed_request_s(device, shape)
        if stage.holds_head:
            t += c.head_request_s(device, shape)
        return t

    def _scale(self, node: str, fit: StepFit) -> float:
        """A fit measured over k blocks, applied to a node that now serves m: x m / k."""
        if not fit.blocks:
            return 1.0
        return self.layout.stages[self.layout.nodes[node].stage].num_blocks / fit.blocks

    def group(self, node: str) -> int:
        return self._group[node]

    def decode_tables(self) -> list[dict[int, float]]:
        """Per group: the cached decode times (context -> s), for the engine's fast path; empty
        (always a miss) for calibrated nodes' groups, so they go through :meth:`decode_s`."""
        if self.calibrated is not None and self.calibrated.nodes:
            return [{} for _ in self._keys]
        return self._dec

    def prefill_s(self, node: str, prompt_tokens: int) -> float:
        fit = self.calibrated.nodes.get(node) if self.calibrated else None
        if fit is not None:
            return fit.step_s(prompt_tokens, 0) * self._scale(node, fit)
        g = self._group[node]
        t = self._pre[g].get(prompt_tokens)
        if t is None:
            s, dev = self._keys[g]
            t = self._segment_s(self.layout.stages[s], dev, prompt_tokens, 1)
            self._pre[g][prompt_tokens] = t
        return t

    def decode_s(self, node: str, context_tokens: int) -> float:
        fit = self.calibrated.nodes.get(node) if self.calibrated else None
        if fit is not None:
            return fit.step_s(1, context_tokens) * self._scale(node, fit)
        g = self._group[node]
        t = self._dec[g].get(context_tokens)
        if t is None:
            s, dev = self._keys[g]
            st = self.layout.stages[s]
            t = max(
                0.0,
                self._segment_s(st, dev, context_tokens, 2)
                - self._segment_s(st, dev, context_tokens, 1),
            )
            self._dec[g][context_tokens] = t
        return t

    def batch_s(self, node: str, prompts: Sequence[int], contexts: Sequence[int]) -> float:
        """One batched forward of ``node``'s segment (continuous batching): the prefills of
        ``prompts`` and one decode step at each of ``contexts``. It is the sum of the single
        steps' times (as :meth:`prefill_s` / :meth:`decode_s` give them, calibrated or not)
        scaled by what batching saves on the node's device: the roofline of the batch (weights
        read once, FLOPs and KV reads summed; :meth:`CostModel.block_batch_s`) over the sum of
        the single steps' rooflines. A batch of one is exactly the single step. A calibrated
        node's fit is per forward (:func:`testbed.sim.calibrate.batch_rows`): its line over the
        batch's summed new and context tokens, one fixed part per forward."""
        if len(prompts) + len(contexts) == 1:
            return self.prefill_s(node, prompts[0]) if prompts else self.decode_s(node, contexts[0])
        fit = self.calibrated.nodes.get(node) if self.calibrated else None
        if fit is not None:  # fitted per forward (calibrate.batch_rows): the line over the sums
            new = sum(prompts) + len(contexts)
            return fit.step_s(new, sum(contexts)) * self._scale(node, fit)
        single = sum(self.prefill_s(node, p) for p in prompts) + sum(
            self.decode_s(node, c) for c in contexts
        )
        g = self._group[node]
        dev = self._keys[g][1]
        # CostModel.block_batch_s written out over cached per-step (FLOPs, bytes less weights,
        # single roofline) terms: the same sums in the same order, so the same time
        prof, one = self.cost.profile, self._one
        w = prof.block_weight_bytes()
        flops, nbytes, parts = 0.0, float(w), 0.0
        for key in [*prompts, *(-1 - c for c in contexts)]:
            term = one.get((g, key))
            if term is None:
                if key >= 0:
                    f, b = prof.block_prefill_flops(key), prof.block_prefill_bytes(key) - w
                    r = self.cost.block_batch_s(dev, prompts=(key,))
                else:
                    c = -1 - key
                    f, b = prof.block_decode_flops(c), prof.block_decode_bytes(c) - w
                    r = self.cost.block_batch_s(dev, contexts=(c,))
                term = one[(g, key)] = (f, b, r)
            flops += term[0]
            nbytes += term[1]
            parts += term[2]
        if parts <= 0.0:
            return single
        return single * (roofline_s(flops, nbytes, dev) + dev.step_overhead) / parts
