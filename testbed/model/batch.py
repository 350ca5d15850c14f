"""Attention masks, and iteration-level batching of decode steps: many requests, each with its own KV cache.

A batched decode step runs the B waiting requests' single new tokens as one ``[B, 1, H]``
forward through the blocks. Each request keeps its own transformers ``DynamicCache`` (so
requests join and leave the batch at any step, and a batch of one is the plain per-request
path); :class:`BatchCacheView` is what the decoder layers see as their cache for the step.
Its ``update`` is the public Cache entry point the attention modules call
(``cache.update(key_states, value_states, layer_idx, ...)``): it appends each row's new keys
and values to that row's own cache layer and hands back all rows' keys and values,
right-padded to the longest and stacked. :func:`batch_mask` hides the padding (and applies
causality and a sliding window) per row from the rows' lengths.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class BatchStep:
    """One request's part of a batched step (what :meth:`step_batch` of an executor takes).

    A prefill may come in chunks: the first at ``start_pos`` 0 opens the request's cache, the
    next ones continue at the cache's length, and ``last_chunk`` marks the one that completes
    the prompt (the request's cache becomes a normal, decodable one then).
    """

    request_id: str
    kind: str  # "prefill" | "decode"
    x: torch.Tensor  # this step's tokens: ids int64[1, q] (first stage) or float[1, q, H]
    start_pos: int
    last_chunk: bool = True  # a prefill chunk that ends the prompt (always True for decode)


class BatchCacheView:
    """The cache a batched decode step hands to the decoder layers.

    ``caches[i]`` is row i's own cache; every row adds one token per layer. Public Cache API
    only: each row's cache is updated with its own ``update`` call.
    """

    def __init__(self, caches: Sequence[Any]):
        self.caches = list(caches)

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append row i of ``key_states``/``value_states`` ([B, heads, q, d]) to cache i; return
        every row's full keys and values right-padded to the longest: [B, heads, Lmax, d]."""
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for i, cache in enumerate(self.caches):
            k, v = cache.update(key_states[i : i + 1], value_states[i : i + 1], layer_idx)
            keys.append(k)
            values.append(v)
        longest = max(k.shape[2] for k in keys)
        return _pad_stack(keys, longest), _pad_stack(values, longest)


def _pad_stack(parts: list[torch.Tensor], length: int) -> torch.Tensor:
    if all(p.shape[2] == length for p in parts):
        return torch.cat(parts, dim=0)
    b, heads, _, d = len(parts), parts[0].shape[1], parts[0].shape[2], parts[0].shape[3]
    out = parts[0].new_zeros((b, heads, length, d))
    for i, p in enumerate(parts):
        out[i, :, : p.shape[2]] = p[0]
    return out


def batch_mask(
    lengths: Sequence[int],
    *,
    window: int | None,
    additive: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """The [B, 1, 1, max(lengths)] mask of one new token per row, row i holding ``lengths[i]``
    tokens after the step (its new token at position lengths[i] - 1).

    Row i sees keys 0..lengths[i]-1 (the padding past them is hidden); with a sliding window
    only the last ``window`` of them (HF's convention, as :func:`causal_mask`). Boolean for
    SDPA (True = attend), additive (0 / dtype min) for eager attention.
    """
    n = torch.tensor(list(lengths), device=device)[:, None]  # [B, 1]
    kv = torch.arange(int(n.max()), device=device)[None, :]  # [1, Lmax]
    allowed = kv < n
    if window is not None:
        allowed &= kv > (n - 1) - window
    allowed = allowed[:, None, None, :]
    if not additive:
        return allowed
    zeros = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return zeros.masked_fill(~allowed, torch.finfo(dtype).min)


def causal_mask(
    start_pos: int,
    q: int,
    *,
    window: int | None,
    additive: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """The [1, 1, q, start_pos + q] attention mask of q new tokens over a full KV cache.

    Query i (absolute position start_pos + i) sees keys 0..start_pos + i, and with a sliding
    window only the last ``window`` of them (HF's convention: kv > q - window). Boolean (True =
    attend) for SDPA, additive (0 / dtype min) for eager attention. Built here rather than with
    transformers' internal mask helpers, whose signatures change between releases; the caches
    are full (not sliding) layers, so the window lives in the mask alone.
    """
    q_pos = torch.arange(start_pos, start_pos + q, device=device)[:, None]
    kv_pos = torch.arange(start_pos + q, device=device)[None, :]
    allowed = kv_pos <= q_pos
    if window is not None:
        allowed &= kv_pos > q_pos - window
    allowed = allowed[None, None]
    if not additive:
        return allowed
    zeros = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return zeros.masked_fill(~allowed, torch.finfo(dtype).min)


def cache_kwarg(layer: Any) -> str:
    """The keyword a decoder layer takes its KV cache under, from its public signature:
    ``cache`` in transformers >= 5.2x (``past_key_values`` is deprecated there and goes in
    5.40), ``past_key_values`` before, ``past_key_value`` in 4.x's older layers."""
    import inspect

    params = inspect.signature(layer.forward).parameters
    for name in ("cache", "past_key_values", "past_key_value"):
        if name in params:
            return name
    raise TypeError(f"{type(layer).__name__}.forward takes no KV cache argument we know")
