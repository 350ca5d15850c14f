"""Warm a freshly loaded stage up before it reports healthy.

The first steps of a new process pay one-off costs that are not the model's: PyTorch picks
and initialises its kernels, the allocator grows its pools, a GPU creates its context. Left in,
they land on the first measured requests (and on an emulated device they show as *overruns*:
the stand-in's real work did not fit in the device's window). A throwaway prefill, a decode and
a batched decode of the same shapes the stage will see take them before ``/health`` says 200.
Nothing of them is kept: their request ids are released, so the cache is empty afterwards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from testbed.model.batch import BatchStep
from testbed.model.contract import CacheFullError, StageExecutor

WARMUP_ID = "__warmup__"
PROMPT_TOKENS = 8


@dataclass(frozen=True)
class WarmUp:
    steps: int  # steps run (prefill, decode, batched decodes)
    seconds: float  # wall time they took

    def to_json(self) -> dict[str, float | int]:
        return {"steps": self.steps, "seconds": round(self.seconds, 4)}


def _input(ex: StageExecutor, q: int, gen: torch.Generator) -> torch.Tensor:
    if ex.is_first:
        ids = torch.randint(0, max(1, ex.info.vocab_size), (1, q), generator=gen)
        return ids.to(ex.device)
    x = torch.randn((1, q, ex.info.hidden_size), generator=gen) * 0.02
    return x.to(device=ex.device, dtype=ex.dtype)


def warm_up(ex: StageExecutor, *, batch: int = 2, prompt_tokens: int = PROMPT_TOKENS) -> WarmUp:
    """Run ``batch`` throwaway requests through ``ex`` (prefill, one decode each alone, then
    one batched decode when ``batch`` > 1) and release them. A cache too small for them all
    warms what fits."""
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    steps = 0
    ids = [f"{WARMUP_ID}{i}" for i in range(max(1, batch))]
    held: list[str] = []
    try:
        for rid in ids:
            try:
                ex.step(rid, "prefill", _input(ex, prompt_tokens, gen), 0)
            except CacheFullError:
                break
            held.append(rid)
            steps += 1
        for rid in held[:1]:
            ex.step(rid, "decode", _input(ex, 1, gen), prompt_tokens)
            steps += 1
        if len(held) > 1:
            batch_steps = [
                BatchStep(rid, "decode", _input(ex, 1, gen), prompt_tokens + (i == 0))
                for i, rid in enumerate(held)
            ]
            for out in ex.step_batch(batch_steps):
                if isinstance(out, Exception):
                    raise out
            steps += 1
    finally:
        for rid in held:
            ex.release(rid)
    return WarmUp(steps, time.perf_counter() - t0)
