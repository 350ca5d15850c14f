"""Pipelined generation through k local stage processes vs the whole model in one process.

Run: ``.venv/bin/python benchmarks/bench_pipeline.py [--stages 3] [--new-tokens 24]``

Side by side in one run, alternating (so background load hits both alike):

1. **whole model**: ``AutoModelForCausalLM.generate(do_sample=False)`` in this process.
2. **pipelined**: the same greedy generation through ``--stages`` stage servers started by
   :class:`testbed.runtime.local.LocalStages` on loopback (an even split), driven by
   :class:`testbed.stage.pipeline.PipelineClient` (hidden states go stage -> driver -> stage).

Both use the same torch thread count. The model is the generated ``medium`` size (about
450 MB, so compute, not HTTP, dominates on a CPU) unless ``--model-dir`` names another.
Prints medians of end-to-end latency and time per output token, their ratio (target <= 1.15),
and checks the token ids are identical.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import torch


def medium_model(arch: str) -> Path:
    from testbed.model.tiny import make_tiny_model

    dest = Path.home() / ".cache" / "testbed" / "models" / f"bench-medium-{arch}-seed0"
    if not (dest / "config.json").exists():
        print(f"generating the medium {arch} model in {dest} ...", flush=True)
        make_tiny_model(dest, arch, size="medium")
    return dest


async def main_async(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM

    from testbed.model.info import read_model_info
    from testbed.runtime.local import LocalStages, even_cuts
    from testbed.stage.pipeline import PipelineClient

    model_dir = Path(args.model_dir) if args.model_dir else medium_model(args.arch)
    info = read_model_info(model_dir)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, info.vocab_size, (args.prompt_tokens,), generator=gen).tolist()
    cuts = even_cuts(info.num_blocks, args.stages)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # both sides generate exactly new_tokens
    nbytes = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    print(
        f"model {info.name}: {info.architecture}, {info.num_blocks} blocks, hidden "
        f"{info.hidden_size}, {nbytes / 1e6:.0f} MB; prompt {args.prompt_tokens} tokens, "
        f"{args.new_tokens} new tokens; {args.stages} stages at cuts {cuts}; "
        f"{args.threads} torch threads each"
    )

    def whole() -> tuple[list[int], float, float]:
        ids = torch.tensor([prompt])
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.new_tokens,
                do_sample=False,
            )
        e2e = time.perf_counter() - t0
        # time to first token measured separately (a 1-token generate is the prefill)
        t1 = time.perf_counter()
        with torch.no_grad():
            model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False
            )
        ttft = time.perf_counter() - t1
        return out[0].tolist(), e2e, (e2e - ttft) / max(1, args.new_tokens - 1)

    async with LocalStages(model_dir, cuts, threads=args.threads) as stages:
        async with PipelineClient(stages.urls, transport=args.transport) as pipe:
            rows: dict[str, list[float]] = {"whole_e2e": [], "whole_tpot": [], "pipe_e2e": [],
                                            "pipe_tpot": [], "pipe_transfer": []}  # fmt: skip
            same = True
            await pipe.generate(prompt, 2, eos_token_ids=[])  # warm-up
            whole()
            for _ in range(args.rounds):
                ids, e2e, tpot = await asyncio.to_thread(whole)
                rows["whole_e2e"].append(e2e)
                rows["whole_tpot"].append(tpot)
                res = await pipe.generate(prompt, args.new_tokens, eos_token_ids=[])
                t = res.timings()
                rows["pipe_e2e"].append(res.e2e_s)
                rows["pipe_tpot"].append(t["tpot_s"])
                rows["pipe_transfer"].append(
                    sum(s["transfer_s"] for s in t["per_stage"]) / len(res.steps)
                )
                same = same and res.token_ids == ids
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(
        f"whole model, one process : e2e {med['whole_e2e']:.3f} s, per token {med['whole_tpot'] * 1e3:.1f} ms"
    )
    print(f"pipelined, {args.stages} processes  : e2e {med['pipe_e2e']:.3f} s, per token {med['pipe_tpot'] * 1e3:.1f} ms "
          f"(of which HTTP/serialisation per step, all hops: {med['pipe_transfer'] * 1e3:.1f} ms)")  # fmt: skip
    print(
        f"latency ratio pipelined/whole: e2e {med['pipe_e2e'] / med['whole_e2e']:.3f}, per token "
        f"{med['pipe_tpot'] / med['whole_tpot']:.3f} (target <= 1.15); medians of {args.rounds} "
        f"alternating rounds; identical tokens: {same}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", default=None)
    p.add_argument("--arch", default="phi3")
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=max(1, torch.get_num_threads()))
    p.add_argument("--transport", default="auto", choices=["auto", "http", "tcp"])
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
