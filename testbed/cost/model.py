"""Roofline cost model, optionally calibrated by a measured profile.

A kernel's time on a device is max(FLOPs / effective FLOP/s, bytes / effective bandwidth) plus a
fixed per-block step overhead: prefill over a long prompt is compute-bound, a decode step is
bound by reading the weights and the KV cache, as on real hardware.

With a :class:`MeasuredProfile`, each block's measured prefill and decode times on the measuring
device are kept as the truth there and scaled to other devices and token counts by the ratio of
their roofline estimates (ours: one calibration factor per block and phase).

The decode phase of a request with P prompt and O output tokens is O - 1 steps (prefill yields
the first token), estimated at their mean context P + (O - 2) / 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from testbed.spec.devices import CATALOG, DeviceProfile
from testbed.spec.model_profile import MeasuredProfile, ModelProfile
from testbed.spec.plan import RequestShape
from testbed.spec.topology import LinkSpec


def decode_steps(shape: RequestShape) -> tuple[int, float]:
    """(number of decode steps, their mean context): prefill yields the first output token,
    then one step per further token at contexts P .. P+O-2."""
    steps = max(shape.output_tokens - 1, 0)
    return steps, shape.prompt_tokens + max(steps - 1, 0) / 2


def roofline_s(flops: float, nbytes: float, device: DeviceProfile) -> float:
    return max(flops / device.effective_flops, nbytes / device.effective_bandwidth)


def measuring_device(measured: MeasuredProfile) -> DeviceProfile:
    """The device a measured profile ran on, as a DeviceProfile (for scaling to other devices)."""
    if measured.device.kind == "cpu":
        base = dict(CATALOG["cpu-core"])
        t = measured.device.threads
        base.update(
            peak_flops=base["peak_flops"] * t,
            cores=t,
            cpus=float(t),
            mem_bandwidth=base["mem_bandwidth"] * min(t, 4),
            label=measured.device.name,
        )
        return DeviceProfile(**base)
    name = measured.device.name.lower()
    for key in ("h100", "a100-80gb", "a100-40gb", "a10", "l4", "rtx-4090", "rtx-3090"):
        if key.replace("-", " ").split(" ")[-1] in name.replace("-", " "):
            return DeviceProfile(**CATALOG[key])
    return DeviceProfile(**CATALOG["a10"])


@dataclass(frozen=True)
class CostModel:
    profile: ModelProfile
    measured: MeasuredProfile | None = None
    _ref: DeviceProfile | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.measured is not None:
            if self.measured.num_blocks != self.profile.num_blocks:
                from testbed.errors import ConfigError

                raise ConfigError(
                    f"measured profile has {self.measured.num_blocks} blocks but the model has "
                    f"{self.profile.num_blocks}; profile the same model",
                    field="profile",
                )
            object.__setattr__(self, "_ref", measuring_device(self.measured))

    @property
    def source(self) -> str:
        return (
            "roofline"
            if self.measured is None
            else f"measured:{self.measured.model}@{self.measured.device.name}"
        )

    # -- single steps ------------------------------------------------------------------------
    def _calibrated(self, est: float, measured_s: float | None, ref_est: float) -> float:
        if measured_s is None or ref_est <= 0:
            return est
        return measured_s * est / ref_est

    def block_prefill_s(self, device: DeviceProfile, prompt_tokens: int) -> float:
        p = self.profile
        est = roofline_s(
            p.block_prefill_flops(prompt_tokens), p.block_prefill_bytes(prompt_tokens), device
        )
        return est + device.step_overhead

    def block_decode_s(self, device: DeviceProfile, context_tokens: float) -> float:
        p = self.profile
        c = round(context_tokens)
        est = roofline_s(p.block_decode_flops(c), p.block_decode_bytes(c), device)
        return est + device.step_overhead

    def block_batch_s(
        self, device: DeviceProfile, prompts: Sequence[int] = (), contexts: Sequence[int] = ()
    ) -> float:
        """One block, one batched forward (continuous batching): the prefills of ``prompts`` and
        one decode step at each context in ``contexts``, run together. Roofline of the batch:
        the weights are read once, FLOPs, KV-cache traffic and activations are summed; one
        step overhead. A batch of one decode step is :meth:`block_decode_s` (at an int context),
        of one prefill :meth:`block_prefill_s`."""
        p = self.profile
        w = p.block_weight_bytes()
        flops, nbytes = 0.0, float(w)
        for n in prompts:
            flops += p.block_prefill_flops(n)
            nbytes += p.block_prefill_bytes(n) - w
        for c in contexts:
            flops += p.block_decode_flops(c)
            nbytes += p.block_decode_bytes(c) - w
        return roofline_s(flops, nbytes, device) + device.step_overhead

    def block_request_times(self, device: DeviceProfile, shape: RequestShape) -> np.ndarray:
        """Seconds each block spends on one reference request (prefill + all decode steps)."""
        n = self.profile.num_blocks
        pre = self.block_prefill_s(device, shape.prompt_tokens)
        steps, mean_ctx = decode_steps(shape)
        dec = self.block_decode_s(device, mean_ctx) * steps
        times = np.full(n, pre + dec)
        if self.measured is not None and self._ref is not None:
            ref, m = self._ref, self.measured
            ref_pre = self.block_prefill_s(ref, m.prompt_tokens)
            ref_dec = self.block_decode_s(ref, m.context_tokens)
            for i, b in enumerate(m.blocks):
                times[i] = (
                    self._calibrated(pre, b.prefill_s, ref_pre)
                    + self._calibrated(self.block_decode_s(device, mean_ctx), b.decode_s, ref_dec)
                    * steps
                )
        return times

    def embed_request_s(self, device: DeviceProfile, shape: RequestShape) -> float:
        p = self.profile
        t = roofline_s(0.0, p.embed_bytes(shape.prompt_tokens + shape.output_tokens), device)
        if self.measured is not None and self._ref is not None:
            m = self.measured
            t = (
                m.embed.prefill_s * shape.prompt_tokens / m.prompt_tokens
                + m.embed.decode_s * decode_steps(shape)[0]
            )
            t *= self._device_ratio(device)
        return t

    def head_request_s(self, device: DeviceProfile, shape: RequestShape) -> float:
        p = self.profile
        steps = 1 + decode_steps(shape)[0]  # one logits row after prefill, one per decode step
        per = roofline_s(p.head_flops(1), p.head_bytes(1), device)
        t = per * steps
        if self.measured is not None and self._ref is not None:
            m = self.measured
            t = (m.head.prefill_s + m.head.decode_s * decode_steps(shape)[0]) * self._device_ratio(
                device
            )
        return t

    def _device_ratio(self, device: DeviceProfile) -> float:
        """How much slower ``device`` is than the measuring device for a decode-like step."""
        assert self._ref is not None
        p = self.profile
        a = roofline_s(p.block_decode_flops(512), p.block_decode_bytes(512), device)
        b = roofline_s(p.block_decode_flops(512), p.block_decode_bytes(512), self._ref)
        return a / b if b > 0 else 1.0

    # -- memory ------------------------------------------------------------------------------
    def block_mem_bytes(self, shape: RequestShape) -> np.ndarray:
        """Weights + KV reservation for ``concurrency`` requests of the reference shape."""
        p = self.profile
        kv = (
            p.kv_bytes_per_token() * (shape.prompt_tokens + shape.output_tokens) * shape.concurrency
        )
        return np.full(p.num_blocks, float(p.block_weight_bytes() + kv))

    def request_kv_bytes(self, num_blocks: int, prompt_tokens: int, output_tokens: int) -> int:
        return num_blocks * self.profile.kv_bytes_per_token() * (prompt_tokens + output_tokens)

    # -- network -----------------------------------------------------------------------------
    def hop_request_s(self, link: LinkSpec, shape: RequestShape) -> tuple[float, float]:
        """Per request over one link: (occupancy_s, delay_s).

        occupancy = the hidden states' bytes / bandwidth (the prompt's once, then one token per
        decode step): the time the link is busy, which limits the pipeline's rate.
        delay = one-way delay x number of crossings (prefill + each decode step): latency that
        every request pays but that does not occupy the link, and that is the same for every cut
        as long as the tier holds blocks, so it drops out of the cut choice (as in Hyperion).
        """
        act = self.profile.activation_bytes_per_token()
        steps = decode_steps(shape)[0]
        nbytes = act * (shape.prompt_tokens + steps)
        return nbytes * 8 / link.bandwidth_bps, (1 + steps) * link.delay_s


# -- batched steps ---------------------------------------------------------------------------
def batch_step_s(
    profile: ModelProfile,
    device: DeviceProfile,
    decode_contexts: Sequence[int] = (),
    prefill_tokens: Sequence[int] = (),
    blocks: int = 1,
) -> float:
    """Predicted time of one batched step over ``blocks`` blocks: the roofline of the batch.

    One row per decode (its context length) and per prefill chunk (its token count). The
    weights are read once for the whole batch; FLOPs, KV-cache reads/writes and activations are
    summed over the rows; the per-step overhead is paid once. A batch of one row is exactly
    :meth:`CostModel.block_decode_s` / :meth:`CostModel.block_prefill_s` (times ``blocks``).
    """
    if not decode_contexts and not prefill_tokens:
        return 0.0
    batch = CostModel(profile).block_batch_s(device, prefill_tokens, decode_contexts)
    return blocks * batch


def batch_speedup(
    profile: ModelProfile, device: DeviceProfile, rows: int, context_tokens: int
) -> float:
    """How many times faster ``rows`` decodes run as one batch than one after another (>= 1):
    the factor by which a batching node's service rate exceeds its batch-of-one rate."""
    if rows <= 1:
        return 1.0
    one = batch_step_s(profile, device, [context_tokens])
    many = batch_step_s(profile, device, [context_tokens] * rows)
    return max(1.0, rows * one / many) if many > 0 else 1.0
