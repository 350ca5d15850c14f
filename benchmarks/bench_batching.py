"""Continuous batching vs batch-of-one: output tokens/s of concurrent requests on real layers.

Run: ``.venv/bin/python benchmarks/bench_batching.py [--concurrency 8 32] [--new-tokens 16]``

Two stage servers (an even split of the generated ``small`` model, 8 blocks) run in this
process on loopback, driven by :class:`testbed.stage.pipeline.PipelineClient`; ``N``
requests (different prompts and lengths) generate at once. Each concurrency runs twice,
alternating: with continuous batching (``max_batch`` 16, the default) and with a batch of one
(``max_batch`` 1: steps served one at a time, the stage server before batching). Prints output
tokens/s of each, their ratio (target >= 2x at 8 requests), and checks that every request's
tokens are identical in both modes and equal to the whole model's ``generate`` for one of them.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import time
from pathlib import Path

import torch


def small_model(arch: str) -> Path:
    from testbed.model.tiny import make_tiny_model

    dest = Path.home() / ".cache" / "testbed" / "models" / f"bench-small-{arch}-seed0"
    if not (dest / "config.json").exists():
        make_tiny_model(dest, arch, size="small")
    return dest


async def run(
    model_dir: Path, prompts: list[list[int]], new_tokens: int, max_batch: int, device: str
) -> tuple[float, list[list[int]]]:
    """(output tokens/s, tokens per request) of all prompts generated at once."""
    from testbed.model.executor import LayerRangeExecutor, read_model_info
    from testbed.stage.batcher import BatchLimits
    from testbed.stage.pipeline import PipelineClient
    from testbed.stage.server import StageConfig, StageServer

    n = read_model_info(model_dir).num_blocks
    servers = []
    for a, b in itertools.pairwise([0, n // 2, n]):
        cfg = StageConfig(
            str(model_dir), a, b, max_queue=256, batch=BatchLimits(max_batch=max_batch)
        )
        ex = LayerRangeExecutor(model_dir, a, b, device=device, dtype="float32")
        servers.append(StageServer(cfg, ex))
    for s in servers:
        await s.start()
    try:
        async with PipelineClient([s.url for s in servers]) as pipe:
            await pipe.generate(prompts[0], 2, eos_token_ids=[])  # warm up
            t0 = time.perf_counter()
            results = await asyncio.gather(
                *(pipe.generate(p, new_tokens, eos_token_ids=[]) for p in prompts)
            )
            wall_s = time.perf_counter() - t0
    finally:
        for s in servers:
            await s.aclose()
    outs = [list(r.token_ids[len(p) :]) for r, p in zip(results, prompts, strict=True)]
    return sum(len(o) for o in outs) / wall_s, outs


def reference(model_dir: Path, prompt: list[int], new_tokens: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
            do_sample=False, eos_token_id=None,
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--arch", default="llama")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    model_dir = small_model(a.arch)
    gen = torch.Generator().manual_seed(0)
    print(f"model {model_dir.name}, 2 stages, {a.new_tokens} new tokens, device {a.device}")
    print(f"{'requests':>8} {'batch-of-one tok/s':>19} {'batched tok/s':>14} {'speedup':>8}")
    for n in a.concurrency:
        lengths = torch.randint(4, 48, (n,), generator=gen).tolist()
        prompts = [torch.randint(4, 2000, (k,), generator=gen).tolist() for k in lengths]
        one_tps, one = asyncio.run(run(model_dir, prompts, a.new_tokens, 1, a.device))
        bat_tps, bat = asyncio.run(run(model_dir, prompts, a.new_tokens, 16, a.device))
        assert bat == one, "batched tokens differ from batch-of-one tokens"
        assert one[0] == reference(model_dir, prompts[0], a.new_tokens), "differs from generate"
        print(f"{n:>8} {one_tps:>19.1f} {bat_tps:>14.1f} {bat_tps / one_tps:>7.2f}x")
    print("tokens: identical in both modes and equal to generate (checked)")


if __name__ == "__main__":
    main()
