"""What a stage tells about itself: the /info body, the /emulation report, and the helpers of
its loading (the executor, wrapped in an emulated device when the config asks for one)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from aiohttp import web

from testbed.errors import ConfigError, TestbedError
from testbed.model.contract import StageExecutor
from testbed.stage.config import StageConfig
from testbed.stage.errors import ErrorCode, StageRejectedError

if TYPE_CHECKING:
    from testbed.model.warmup import WarmUp
    from testbed.stage.server import StageServer


def error_response(exc: StageRejectedError) -> web.Response:
    """A refusal as its JSON answer."""
    return web.json_response(exc.body(), status=exc.status)


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


async def load_executor(
    cfg: StageConfig, pool: ThreadPoolExecutor, executor: StageExecutor | None
) -> tuple[StageExecutor, WarmUp | None]:
    """`executor`, or a LayerRangeExecutor loaded on `pool` when None (and warmed up when
    ``cfg.warmup``: what that ran is the second value); wrapped in an emulated device when
    ``cfg.emulation`` asks for one. Raises :class:`ConfigError` on a bad model."""
    warmed: WarmUp | None = None
    if executor is None:
        from testbed.model.executor import LayerRangeExecutor

        try:
            executor = await asyncio.get_running_loop().run_in_executor(
                pool,
                lambda: LayerRangeExecutor(
                    cfg.model_dir,
                    cfg.start,
                    cfg.end,
                    device=cfg.device,
                    dtype=cfg.dtype,
                    max_requests=cfg.max_requests,
                ),
            )
        except (ValueError, TypeError, KeyError, OSError) as exc:
            if isinstance(exc, TestbedError):
                raise
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise ConfigError(
                f"cannot load blocks {cfg.start}:{cfg.end}: {reason}; check its config.json "
                "and weights",
                source=cfg.model_dir,
            ) from None
        if cfg.warmup:  # one-off kernel/allocator set-up, before pacing or /health count
            from testbed.model.warmup import warm_up

            loaded = executor
            warmed = await asyncio.get_running_loop().run_in_executor(
                pool, lambda: warm_up(loaded, batch=min(2, cfg.batch.max_batch))
            )
    if cfg.emulation is not None and not _is_emulated(executor):
        from testbed.emulation.executor import EmulatedExecutor
        from testbed.emulation.timing import EmulationSpec, StageTiming

        spec = EmulationSpec.from_json(cfg.emulation)
        executor = EmulatedExecutor(executor, StageTiming(spec, cfg.start, cfg.end))
    return executor, warmed


def info_body(server: StageServer) -> dict[str, Any]:
    """The /info answer of a started `server`."""
    import torch

    ex = server.executor
    info = ex.info
    cfg = server.config
    return {
        "name": cfg.label,
        "model": info.name,
        "model_path": info.path,
        "model_type": info.model_type,
        "architecture": info.architecture,
        "num_blocks": info.num_blocks,
        "blocks": [ex.start, ex.end],
        "is_first": ex.is_first,
        "is_last": ex.is_last,
        "hidden_size": info.hidden_size,
        "vocab_size": info.vocab_size,
        "eos_token_ids": list(info.eos_token_ids),
        "device": str(ex.device),
        "device_name": (
            torch.cuda.get_device_name(ex.device) if ex.device.type == "cuda" else "cpu"
        ),
        "dtype": str(ex.dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "param_bytes": ex.param_bytes,
        "kv_bytes": ex.kv_bytes(),
        "rss_bytes": rss_bytes(),
        "cuda_allocated_bytes": (
            torch.cuda.memory_allocated(ex.device) if ex.device.type == "cuda" else 0
        ),
        "requests": len(ex.request_ids),
        "max_requests": cfg.max_requests,
        "max_inflight": cfg.max_inflight,
        "max_batch": cfg.batch.max_batch,
        "max_batch_tokens": cfg.batch.max_batch_tokens,
        "chunk_tokens": cfg.batch.chunk_tokens,
        "max_queue": cfg.max_queue,
        "tensor_port": server.tensor_port,
        "warmup": server.warmup.to_json() if server.warmup is not None else None,
        "pid": os.getpid(),
        "started_at": server.started_at,
        "loaded_at": server.loaded_at,
        "loads": server.loads,
        # two block ranges held during a migration (testbed.stage.generations): each one's
        # blocks, caches and weights; param_bytes above adds them up
        "generations": getattr(ex, "describe", lambda: None)(),
    }


def refuser(server: StageServer) -> Callable[[int, ErrorCode, str], web.Response]:
    """A route's refusal: counted in the stage's metrics, answered as a JSON error."""
    label = server.config.label

    def refuse(status: int, code: ErrorCode, message: str) -> web.Response:
        server.note_refused(status, code)
        return error_response(StageRejectedError(label, status, code, message))

    return refuse


def emulation_response(executor: StageExecutor, label: str, request: web.Request) -> web.Response:
    """Pacing numbers of an emulated stage (404 when the stage is not emulated). A stage
    holding two ranges (a migration's overlap) reports its newest's log, which the older
    ranges' steps went on in (:func:`testbed.stage.reload.continue_pacing_log`)."""
    from testbed.stage.generations import Generations

    if isinstance(executor, Generations):
        executor = executor.newest
    report = getattr(executor, "pacing_report", None)
    if report is None:
        return error_response(
            StageRejectedError(label, 404, None, "this stage is not an emulated device")
        )
    try:
        since = max(0, int(request.query.get("since", "0")))
    except ValueError:
        return error_response(
            StageRejectedError(label, 400, ErrorCode.BAD_INPUT, "since must be an integer")
        )
    return web.json_response(report(since))


def _is_emulated(executor: object) -> bool:
    from testbed.emulation.executor import EmulatedExecutor

    return isinstance(executor, EmulatedExecutor)
