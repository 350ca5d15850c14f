"""`testbed generate`: greedy generation through stage servers started on this host."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from testbed.cli.common import run_async
from testbed.cli.main import app
from testbed.errors import ConfigError

DEFAULT_STAGES = 3


def default_cuts(num_blocks: int, stages: int = DEFAULT_STAGES) -> list[int]:
    """The split used when --split is omitted: an even split over `stages` stages.

    One function on purpose: replace it with a planner call when one is wired in.
    """
    from testbed.runtime.local import even_cuts

    return even_cuts(num_blocks, stages)


def parse_split(text: str | None) -> list[int] | None:
    if text is None:
        return None
    text = text.strip()
    if text in ("", "none"):
        return []
    try:
        return [int(c) for c in text.split(",")]
    except ValueError:
        raise ConfigError(
            f"{text!r} is not a list of cut points; write e.g. --split 2,3 "
            "(stages [0,2) [2,3) [3,N))",
            field="--split",
        ) from None


async def _run(
    model_dir: Path,
    cuts: list[int],
    prompt_ids: list[int],
    max_new_tokens: int,
    device: str | None,
    threads: int | None,
) -> tuple[Any, list[str], list[dict[str, Any]]]:
    from testbed.runtime.local import LocalStages
    from testbed.stage.pipeline import PipelineClient

    async with LocalStages(model_dir, cuts, device=device, threads=threads) as stages:
        async with PipelineClient(stages.urls) as pipe:
            infos = [await pipe.client(u).info() for u in stages.urls]
            result = await pipe.generate(prompt_ids, max_new_tokens)
        return result, stages.urls, infos


@app.command("generate")
def generate_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Hugging Face model folder.")],
    prompt: Annotated[str, typer.Option(help="Prompt text.")] = "The testbed runs",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate at most.")] = 16,
    split: Annotated[
        str | None,
        typer.Option(
            help="Interior cut points, e.g. 2,3 -> stages [0,2) [2,3) [3,N). "
            "Default: even split over 3 stages. '' = one stage."
        ),
    ] = None,
    runtime: Annotated[
        str, typer.Option(help="Where stages run: local (processes on loopback).")
    ] = "local",
    device: Annotated[
        str | None, typer.Option(help="cpu or cuda (default: cuda if present).")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="Torch threads per stage process.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON record.")] = False,
) -> None:
    """Start stage servers, generate greedily through them, print the text, stop them."""
    from testbed.model.info import read_model_info
    from testbed.runtime.interface import RUNTIMES
    from testbed.runtime.kinds.local import LocalRuntime

    if RUNTIMES.get(runtime) is not LocalRuntime:  # stages of its own, started here
        raise ConfigError(
            f"runtime {runtime!r} is not supported here; use --runtime local", field="--runtime"
        )
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    info = read_model_info(model_dir)
    cuts = parse_split(split)
    if cuts is None:
        cuts = default_cuts(info.num_blocks)
    from testbed.runtime.local import block_ranges

    ranges = block_ranges(info.num_blocks, cuts)  # validates before starting anything
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    if not prompt_ids:
        raise ConfigError("the prompt tokenizes to nothing; give some text", field="--prompt")
    result, urls, infos = run_async(
        _run(model_dir, cuts, prompt_ids, max_new_tokens, device, threads),
        what="interrupted: the stage processes were stopped",
    )
    text = str(tokenizer.decode(list(result.generated_ids), skip_special_tokens=True))
    if as_json:
        record = {
            "model": info.name,
            "prompt": prompt,
            "token_ids": result.token_ids,
            "prompt_ids": list(result.prompt_ids),
            "generated_ids": list(result.generated_ids),
            "text": text,
            "finish_reason": result.finish_reason,
            "stages": [
                {
                    "blocks": list(r),
                    "url": u,
                    "pid": i["pid"],
                    "device": i["device"],
                    "param_bytes": i["param_bytes"],
                }
                for r, u, i in zip(ranges, urls, infos, strict=True)
            ],
            "timings": result.timings(),
        }
        sys.stdout.write(json.dumps(record, indent=2) + "\n")
    else:
        sys.stdout.write(prompt + text + "\n")
