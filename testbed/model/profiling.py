"""Per-part timing of a loaded stage (embed, each block, head) for `testbed profile`."""

from __future__ import annotations

import statistics
import time
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from testbed.model.executor import LayerRangeExecutor


@torch.inference_mode()
def time_parts(
    ex: LayerRangeExecutor, prompt_tokens: int, context_tokens: int, repeats: int = 3
) -> dict[str, dict[str, float]]:
    """Median seconds for embed, each block and head: a P-token prefill, a decode at context C.

    Keys: "embed" (first stage), "block<i>", "head" (last stage); values {"prefill_s",
    "decode_s"}. Runs on throwaway caches with random inputs (never the executor's requests).
    """
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(0)
    samples: dict[str, dict[str, list[float]]] = {}
    h = ex.info.hidden_size
    for kind, q, past in (("prefill", prompt_tokens, 0), ("decode", 1, context_tokens)):
        ids = torch.randint(0, ex.info.vocab_size, (1, q), generator=gen).to(ex.device)
        hidden = (torch.randn(1, q, h, generator=gen) * 0.1).to(ex.device, ex.dtype)
        cache = DynamicCache()
        if past:
            pre = (torch.randn(1, past, h, generator=gen) * 0.1).to(ex.device, ex.dtype)
            ex.run_layers(pre, cache, 0, past)
        for round_ in range(repeats + 1):  # the first round warms up and is dropped
            times: dict[str, float] = {}
            if ex.embed is not None:
                times["embed"] = _timed(ex.device, ex.embed, ids)
            for k, layer in enumerate(ex.layers):
                one = _OneLayer(ex, layer, k)
                times[f"block{ex.start + k}"] = _timed(ex.device, one, hidden, cache, past, q)
            if ex.norm is not None and ex.lm_head is not None:
                times["head"] = _timed(ex.device, _Head(ex.norm, ex.lm_head), hidden)
            if round_ == 0:
                continue
            for part, sec in times.items():
                samples.setdefault(part, {}).setdefault(f"{kind}_s", []).append(sec)
    return {
        part: {key: statistics.median(vals) for key, vals in kinds.items()}
        for part, kinds in samples.items()
    }


def _timed(device: torch.device, fn: Any, *args: Any) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


class _Head:
    """Final norm + LM head on the last position."""

    def __init__(self, norm: nn.Module, head: nn.Module):
        self.norm, self.head = norm, head

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(hidden)[:, -1:, :])


class _OneLayer:
    """Run the k-th block of an executor's range on a cache."""

    def __init__(self, ex: LayerRangeExecutor, layer: nn.Module, k: int):
        self.ex, self.layer, self.k = ex, layer, k
        self.idx = ex.start + k  # the block's index in the model (and in the cache)

    def __call__(self, hidden: torch.Tensor, cache: Any, start_pos: int, q: int) -> torch.Tensor:
        ex = self.ex
        position_ids = torch.arange(start_pos, start_pos + q, device=ex.device).unsqueeze(0)
        pos = ex.rotary(hidden, position_ids)
        out = self.layer(
            hidden,
            attention_mask=ex.mask(ex.layer_types[self.k], start_pos, q),
            position_ids=position_ids,
            use_cache=True,
            **{ex.cache_kw: cache},
            position_embeddings=pos,
        )
        cache.layers[self.idx].crop(-q)  # every block and repeat is timed at the same context
        return out
