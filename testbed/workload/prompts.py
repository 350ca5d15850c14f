"""Synthetic prompts: deterministic token ids with exactly the trace's prompt length.

The broker sends token ids straight to the first stage, so the count is exact (no tokenizer
round trip). Ids are uniform over the vocabulary minus ``avoid_ids`` (BOS/EOS/PAD and other
special tokens). With Mooncake ``prefix_hash_ids``, block i of the prompt (``block_tokens``
tokens) depends only on ``(seed, hash_ids[i])``, so requests that share a prefix in the trace
share the same prefix tokens; the rest depends on ``(seed, request_id)``.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from testbed.errors import WorkloadError

_MASK = (1 << 64) - 1


def _draw(rng: np.random.Generator, n: int, allowed: int, shift: np.ndarray) -> np.ndarray:
    r = rng.integers(0, allowed, size=n, dtype=np.int64)
    # the k-th avoided id a_k has a_k - k allowed ids below it: skip each one at or below r
    return r + np.searchsorted(shift, r, side="right")


def synthesize_prompt_ids(
    n_tokens: int,
    vocab_size: int,
    seed: int,
    request_id: int,
    avoid_ids: Iterable[int] = (),
    *,
    prefix_hash_ids: Iterable[int] = (),
    block_tokens: int = 512,
) -> list[int]:
    """Exactly ``n_tokens`` ids in ``[0, vocab_size)``, none in ``avoid_ids``; deterministic."""
    if n_tokens < 1:
        raise WorkloadError(f"a prompt needs at least 1 token, got n_tokens={n_tokens}")
    if block_tokens < 1:
        raise WorkloadError(f"block_tokens={block_tokens} must be >= 1")
    avoid = np.unique(np.fromiter((a for a in avoid_ids if 0 <= a < vocab_size), dtype=np.int64))
    allowed = vocab_size - len(avoid)
    if allowed < 1:
        raise WorkloadError(
            f"no token id left to draw from: vocab_size={vocab_size}, {len(avoid)} ids avoided"
        )
    shift = avoid - np.arange(len(avoid), dtype=np.int64)
    parts = []
    remaining = n_tokens
    for h in prefix_hash_ids:
        if remaining == 0:
            break
        k = min(block_tokens, remaining)
        block = _draw(
            np.random.default_rng([seed & _MASK, 1, h & _MASK]), block_tokens, allowed, shift
        )
        parts.append(block[:k])
        remaining -= k
    if remaining:
        parts.append(
            _draw(
                np.random.default_rng([seed & _MASK, 0, request_id & _MASK]),
                remaining,
                allowed,
                shift,
            )
        )
    return np.concatenate(parts).tolist()
