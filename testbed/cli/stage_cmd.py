"""`testbed stage serve`: run one stage server (a block range of a model) until stopped."""

from __future__ import annotations

from typing import Annotated

import typer

from testbed.cli.common import run_async
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
        int, typer.Option(min=1, help="Request KV caches held at once (then 503).")
    ] = 256,
    request_ttl: Annotated[
        float, typer.Option("--request-ttl-s", help="Drop caches idle this long.")
    ] = 600.0,
    tensor_port: Annotated[
        int, typer.Option(help="TCP tensor port (0 = any free port, -1 = off; see /info).")
    ] = 0,
    evict_idle: Annotated[
        float,
        typer.Option(
            "--evict-idle-s",
            help="When every cache slot is taken, a prefill evicts the least recently used "
            "cache idle this long.",
        ),
    ] = 5.0,
    mem_budget: Annotated[
        str,
        typer.Option(help="Payload bytes in flight, all connections together (then wait/429)."),
    ] = "100MiB",
    read_timeout: Annotated[
        float,
        typer.Option("--read-timeout-s", help="Drop an upload that sends nothing this long."),
    ] = 30.0,
    max_connections: Annotated[
        int, typer.Option(help="Tensor-port connections at once (more get busy).")
    ] = 64,
    exit_with_parent: Annotated[
        bool, typer.Option(help="Exit when the launching process dies.")
    ] = False,
    emulate: Annotated[
        str | None,
        typer.Option(
            help="Emulated device: an EmulationSpec as JSON (written by the runtimes for "
            "`execution: emulated`); MODEL_DIR is then the studied model's stand-in."
        ),
    ] = None,
    warmup: Annotated[
        bool,
        typer.Option(
            help="Run throwaway steps after loading, before /health answers (first-call "
            "kernel and allocator set-up stays out of measured requests)."
        ),
    ] = True,
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
    from testbed.stage.listen import check_bindable

    check_bindable(host, port, "--port")  # a busy port or a foreign address: now, not after loading
    if tensor_port > 0:
        check_bindable(host, tensor_port, "--tensor-port")
    from testbed.stage.limits import InputLimits
    from testbed.units import parse_size_bytes

    try:
        budget_bytes = parse_size_bytes(mem_budget)
    except ValueError as exc:
        raise ConfigError(str(exc), field="--mem-budget") from None
    inputs = InputLimits(
        mem_budget_bytes=budget_bytes, read_timeout_s=read_timeout, max_connections=max_connections
    )
    info = read_model_info(model_dir)
    if end > info.num_blocks:
        raise ConfigError(
            f"blocks {start}:{end} run past the model's {info.num_blocks} blocks", field="--blocks"
        )
    if emulate is not None:  # emulated device (testbed.emulation): check it before torch
        from testbed.emulation.timing import EmulationSpec, StageTiming

        espec = EmulationSpec.from_json(emulate)
        if espec.profile.num_blocks != info.num_blocks:
            raise ConfigError(
                f"the stand-in {model_dir!r} has {info.num_blocks} blocks, the studied model "
                f"{espec.profile.num_blocks}",
                field="--emulate",
            )
        StageTiming(espec, start, end).kv_capacity_tokens()
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
        evict_idle_s=evict_idle,
        inputs=inputs,
        tensor_port=None if tensor_port < 0 else tensor_port,
        emulation=emulate,
        warmup=warmup,
    )
    # the server stops cleanly on SIGTERM/SIGINT by itself (exit 0); run_async covers the
    # time before it installs its handlers
    run_async(serve(config, exit_with_parent=exit_with_parent), what="stage server stopped")
