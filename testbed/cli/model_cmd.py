"""`testbed model make-tiny` and `testbed profile`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from testbed.cli.main import app
from testbed.errors import ConfigError

model_app = typer.Typer(help="Model folders: generate small real models for tests and benchmarks.")
app.add_typer(model_app, name="model")


@model_app.command("make-tiny")
def make_tiny_cmd(
    directory: Annotated[Path, typer.Argument(help="Folder to write (created if missing).")],
    arch: Annotated[str, typer.Option(help="phi3, llama, qwen2 or mistral.")] = "phi3",
    size: Annotated[
        str, typer.Option(help="tiny (~1 MB), small (~30 MB), medium (~450 MB).")
    ] = "tiny",
    hidden_size: Annotated[
        int | None, typer.Option(help="Override the preset's hidden size.")
    ] = None,
    layers: Annotated[int | None, typer.Option(help="Decoder blocks.")] = None,
    heads: Annotated[int | None, typer.Option(help="Attention heads.")] = None,
    kv_heads: Annotated[int | None, typer.Option(help="Key/value heads (GQA).")] = None,
    intermediate_size: Annotated[int | None, typer.Option(help="MLP width.")] = None,
    vocab_size: Annotated[int | None, typer.Option(help="Vocabulary (>= 300).")] = None,
    seed: Annotated[int, typer.Option(help="Weights come from this seed.")] = 0,
) -> None:
    """Write a real Hugging Face model folder with random weights (loads with from_pretrained)."""
    from testbed.model.info import read_model_info
    from testbed.model.tiny import make_tiny_model

    out = make_tiny_model(
        directory,
        arch,
        size=size,
        hidden_size=hidden_size,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        intermediate_size=intermediate_size,
        vocab_size=vocab_size,
        seed=seed,
    )
    info = read_model_info(out)
    nbytes = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    sys.stdout.write(
        f"wrote {out} ({info.architecture}, {info.num_blocks} blocks, hidden {info.hidden_size}, "
        f"vocab {info.vocab_size}, {nbytes / 1e6:.1f} MB)\n"
    )


def measure_profile(
    model_dir: Path, *, device: str | None, prompt_tokens: int, context_tokens: int, repeats: int
) -> dict[str, Any]:
    """Per-block prefill/decode seconds on one device, as a MeasuredProfile-shaped dict."""
    import datetime
    import platform

    import torch
    import transformers

    from testbed.model.executor import LayerRangeExecutor, read_model_info

    info = read_model_info(model_dir)
    if context_tokens + 1 > info.max_position_embeddings:
        raise ConfigError(
            f"--context-tokens {context_tokens} exceeds the model's context "
            f"{info.max_position_embeddings}"
        )
    if prompt_tokens > info.max_position_embeddings:
        raise ConfigError(
            f"--prompt-tokens {prompt_tokens} exceeds the model's context "
            f"{info.max_position_embeddings}"
        )
    ex = LayerRangeExecutor(model_dir, 0, info.num_blocks, device=device)
    parts = ex.time_parts(prompt_tokens, context_tokens, repeats)
    dev = ex.device
    record = {
        "kind": "testbed.measured-profile",
        "version": 1,
        "model": info.name,
        "architecture": info.architecture,
        "num_blocks": info.num_blocks,
        "dtype": str(ex.dtype).removeprefix("torch."),
        "device": {
            "kind": "gpu" if dev.type == "cuda" else "cpu",
            "name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
            "threads": torch.get_num_threads(),
        },
        "prompt_tokens": prompt_tokens,
        "context_tokens": context_tokens,
        "blocks": [parts[f"block{i}"] for i in range(info.num_blocks)],
        "embed": parts["embed"],
        "head": parts["head"],
        "host": platform.node(),
        "measured_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    try:  # validate through the spec's model when present
        from testbed.spec.model_profile import MeasuredProfile

        record = MeasuredProfile.model_validate(record).model_dump(mode="json")
    except ImportError:  # pragma: no cover - the spec module ships with the package
        pass
    return record


def _cpu_name() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


@app.command("profile")
def profile_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Hugging Face model folder.")],
    prompt_tokens: Annotated[
        int, typer.Option(help="Prompt length P for the prefill times.")
    ] = 128,
    context_tokens: Annotated[int, typer.Option(help="Context C for the decode times.")] = 128,
    repeats: Annotated[int, typer.Option(help="Runs per measurement (median kept).")] = 5,
    device: Annotated[
        str, typer.Option(help="auto (cuda if present, else cpu), cpu, cuda, or all.")
    ] = "auto",
    threads: Annotated[int | None, typer.Option(help="Torch CPU threads.")] = None,
    out: Annotated[Path | None, typer.Option(help="JSON file to write (default: stdout).")] = None,
) -> None:
    """Measure per-block prefill and decode time on this host; write a measured profile."""
    import torch

    if prompt_tokens < 1 or context_tokens < 0 or repeats < 1:
        raise ConfigError("need --prompt-tokens >= 1, --context-tokens >= 0, --repeats >= 1")
    if threads:
        torch.set_num_threads(threads)
    if device == "auto":
        devices: list[str | None] = [None]
    elif device == "all":
        devices = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    else:
        devices = [device]
    for dev in devices:
        record = measure_profile(
            model_dir,
            device=dev,
            prompt_tokens=prompt_tokens,
            context_tokens=context_tokens,
            repeats=repeats,
        )
        text = json.dumps(record, indent=2) + "\n"
        if out is None:
            sys.stdout.write(text)
            continue
        target = out
        if len(devices) > 1:
            target = out.with_name(f"{out.stem}.{record['device']['kind']}{out.suffix}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        sys.stderr.write(
            f"wrote {target} ({record['device']['kind']} {record['device']['name']}, "
            f"{record['num_blocks']} blocks)\n"
        )
