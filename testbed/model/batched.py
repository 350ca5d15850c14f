"""The batched decode forward of :class:`testbed.model.executor.LayerRangeExecutor`: B
decode rows, each one token on its own KV cache and position, as one ``[B, 1]`` pass through
the range's blocks (the masks and the cache view are :mod:`testbed.model.batch`'s)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from testbed.model.batch import BatchCacheView, BatchStep, batch_mask

if TYPE_CHECKING:
    from testbed.model.executor import LayerRangeExecutor


def decode_batch(
    ex: LayerRangeExecutor, steps: list[BatchStep], indices: list[int], caches: list[Any]
) -> dict[int, tuple[torch.Tensor | None, torch.Tensor | None, int | None]]:
    """Decode `steps` (row k on ``caches[k]``) as one forward of `ex`'s blocks; the answers
    (hidden, logits, token) keyed by ``indices[k]``."""
    x = torch.cat([s.x.to(ex.device) for s in steps], dim=0)
    hidden = ex.embed(x.to(torch.long)) if ex.embed is not None else x.to(ex.dtype)
    positions = [s.start_pos for s in steps]
    position_ids = torch.tensor(positions, device=ex.device)[:, None]
    lengths = [p + 1 for p in positions]
    additive = ex.config._attn_implementation == "eager"
    masks = {
        t: batch_mask(
            lengths,
            window=ex._sliding_window if t == "sliding_attention" else None,
            additive=additive,
            dtype=ex.dtype,
            device=ex.device,
        )
        for t in set(ex.layer_types)
    }
    view = BatchCacheView(caches)
    position_embeddings = ex.rotary(hidden, position_ids)
    for layer, layer_type in zip(ex.layers, ex.layer_types, strict=True):
        hidden = layer(
            hidden,
            attention_mask=masks[layer_type],
            position_ids=position_ids,
            use_cache=True,
            **{ex.cache_kw: view},
            position_embeddings=position_embeddings,
        )
    out, logits, tokens = ex._head(hidden)
    return {
        i: (
            None if out is None else out[k : k + 1],
            None if logits is None else logits[k : k + 1],
            None if tokens is None else tokens[k],
        )
        for k, i in enumerate(indices)
    }
