"""`testbed stage serve`: run one stage server (a block range of a model) until stopped."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from testbed.cli.main import app
from testbed.errors import ConfigError

stage_app = typer.Typer(help="Stage servers: one block range of a model behind HTTP.")
app.add_typer(stage_app, name="stage")


def parse_blocks(text: str) -> tuple[int, int]:
    """'START:END' -> (start, end), end exclusive."""
    start, sep, end = text.partition(":")
    try:
        if not sep:
            raise ValueError
        a, b = int(start), int(end)
    except ValueError:
        raise ConfigError(
            f"{text!r} is not START:END; write e.g. --blocks 0:4 (end exclusive)", field="--blocks"
        ) from None
    if not 0 <= a < b:
        raise ConfigError(f"{text!r}: need 0 <= START < END", field="--blocks")
    return a, b


@stage_app.command("serve")
def serve_cmd(
    model_dir: Annotated[str, typer.Option("--model-dir", help="Hugging Face model folder.")],
    blocks: Annotated[str, typer.Option("--blocks", help="Block range START:END (end exclusive).")],
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0 = any free port; printed on stdout).")] = 0,
    name: Annotated[str | None, typer.Option(help="Label in /info and /metrics.")] = None,
    device: Annotated[
        str | None, typer.Option(help="cpu, cuda, cuda:N (default: cuda if present).")
    ] = None,
    dtype: Annotated[str | None, typer.Option(help="auto, float32, float16, bfloat16.")] = None,
    threads: Annotated[
        int | None, typer.Option(help="Torch CPU threads (default: torch's).")
    ] = None,
    max_inflight: Annotated[
        int, typer.Option(help="Batches computed at once (worker threads).")
    ] = 1,
    max_batch: Annotated[
        int, typer.Option(help="Requests per batched step (continuous batching; 1 = off).")
    ] = 16,
    max_batch_tokens: Annotated[
        int, typer.Option(help="Tokens per batched step (decodes and prefill chunks).")
    ] = 2048,
    chunk_tokens: Annotated[
        int, typer.Option(help="Prompt tokens of one request per step (0 = whole prompt).")
    ] = 512,
    max_queue: Annotated[
        int, typer.Option(help="Steps allowed to wait beyond those (then 429).")
    ] = 32,
    max_requests: Annotated[
        int, typer.Option(help="Request KV caches held at once (then 503).")
    ] = 256,
    request_ttl: Annotated[
        float, typer.Option("--request-ttl-s", help="Drop caches idle this long.")
    ] = 600.0,
    tensor_port: Annotated[
        int, typer.Option(help="TCP tensor port (0 = any free port, -1 = off; see /info).")
    ] = 0,
    exit_with_parent: Annotated[
        bool, typer.Option(help="Exit when the launching process dies.")
    ] = False,
) -> None:
    """Serve blocks START:END of MODEL_DIR: /health /info /forward /release /sink /metrics.

    Steps also travel over a plain TCP tensor port (announced in /info), which clients prefer.
    """
    from testbed.model.info import DTYPE_CHOICES, read_model_info

    # check what can be checked before the slow torch import, so bad flags fail fast
    if port < 0 or port > 65535:
        raise ConfigError(f"port {port} is out of range 0..65535", field="--port")
    if tensor_port < -1 or tensor_port > 65535:
        raise ConfigError(f"{tensor_port} is not -1 (off) or 0..65535", field="--tensor-port")
    if dtype is not None and dtype not in DTYPE_CHOICES:
        raise ConfigError(f"{dtype!r} is not one of {', '.join(DTYPE_CHOICES)}", field="--dtype")
    start, end = parse_blocks(blocks)
    info = read_model_info(model_dir)
    if end > info.num_blocks:
        raise ConfigError(
            f"blocks {start}:{end} run past the model's {info.num_blocks} blocks", field="--blocks"
        )
    from testbed.stage.batcher import BatchLimits
    from testbed.stage.serve import serve
    from testbed.stage.server import StageConfig

    config = StageConfig(
        model_dir=model_dir,
        start=start,
        end=end,
        host=host,
        port=port,
        name=name,
        device=device,
        dtype=dtype,
        threads=threads,
        max_inflight=max_inflight,
        max_queue=max_queue,
        batch=BatchLimits(max_batch, max_batch_tokens, chunk_tokens),
        max_requests=max_requests,
        request_ttl_s=request_ttl,
        tensor_port=None if tensor_port < 0 else tensor_port,
    )
    try:
        asyncio.run(serve(config, exit_with_parent=exit_with_parent))
    except KeyboardInterrupt:
        pass
