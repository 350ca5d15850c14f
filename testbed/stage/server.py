"""aiohttp stage server: one contiguous block range of a model, a KV cache per request.

Routes
- ``GET /health``   -> ``{"status": "ok"}`` (503 while shutting down)
- ``GET /info``     -> model, block range, device, dtype, memory in use, pid, limits
- ``POST /forward`` -> a wire message (see :mod:`testbed.stage.wire`) with meta
  ``{"request_id", "kind": "prefill"|"decode", "start_pos", "want_logits"?}`` and one tensor
  ``input`` (token ids int64[1, q] on the first stage, hidden states float[1, q, H] elsewhere).
  Answers a wire message with meta ``{"request_id", "kind", "start_pos", "length",
  "service_s", "queue_s", "token_id"}`` and tensor ``hidden`` (not last stage) or, on the last
  stage, ``token_id`` set and tensor ``logits`` when asked. Headers ``X-Service-Time-S`` (compute
  seconds) and ``X-Queue-Time-S`` carry the timings too.
- ``POST /release`` -> JSON ``{"request_id"}``; frees the request's cache (idempotent).
- ``POST /sink``    -> reads and validates a wire message, discards it (transfer benchmarks and
  link checks measure the path without compute).
- ``GET /metrics``  -> Prometheus text.

The same /forward messages also travel over a plain TCP *tensor port* (announced in /info as
``tensor_port``; see :mod:`testbed.stage.tensor_port`): fewer copies for megabyte hidden
states. Both paths share admission, validation, metrics and the worker threads.

Errors are JSON ``{"error": message, "status": code}``: 400 malformed, 404 unknown request,
409 wrong position or a prefill over an existing cache, 413 over the size limits, 429 queue
full, 503 cache slots full or shutting down, 500 a failure inside the model. The server keeps
serving the others in every case. Torch work runs on worker threads (``max_inflight`` of them,
default 1), never on the event loop; at most ``max_queue`` more steps may wait for a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from testbed.errors import ConfigError
from testbed.stage.client import WirePayload
from testbed.stage.wire import WireFormatError, WireLimits, encode_parts, read_message

_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_MAX_REQUEST_ID = 128


@dataclass(frozen=True)
class StageConfig:
    """Everything a stage server needs; the CLI builds it from flags."""

    model_dir: str
    start: int  # first block (inclusive)
    end: int  # last block (exclusive)
    host: str = "127.0.0.1"
    port: int = 0  # 0 = any free port (the bound one is printed and in .port)
    name: str | None = None  # label in /info and /metrics; default "stage-<start>-<end>"
    device: str | None = None  # None = cuda when present, else cpu
    dtype: str | None = None  # None/"auto" = checkpoint dtype on cuda, float32 on cpu
    threads: int | None = None  # torch intra-op threads; None = torch's default
    max_inflight: int = 1  # steps computed at once (worker threads)
    max_queue: int = 32  # steps allowed to wait for a worker beyond those
    max_requests: int = 256  # request caches held at once
    request_ttl_s: float = 600.0  # caches idle longer than this are dropped
    tensor_port: int | None = 0  # the TCP tensor port (0 = any free port, None = off)
    limits: WireLimits = field(default_factory=WireLimits)
    emulation: str | None = None  # emulated device: an EmulationSpec's JSON (testbed.emulation)

    def __post_init__(self) -> None:
        if self.max_inflight < 1:
            raise ConfigError(f"max_inflight must be >= 1, got {self.max_inflight}")
        if self.emulation is not None and self.max_inflight != 1:  # a device runs one step
            raise ConfigError(
                f"an emulated stage runs one step at a time; max_inflight must be 1, "
                f"got {self.max_inflight}"
            )
        if self.max_queue < 0:
            raise ConfigError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.request_ttl_s <= 0:
            raise ConfigError(f"request_ttl_s must be > 0, got {self.request_ttl_s}")

    @property
    def label(self) -> str:
        return self.name or f"stage-{self.start}-{self.end}"


class _Histogram:
    def __init__(self) -> None:
        self.counts = [0] * len(_BUCKETS_S)
        self.total = 0
        self.sum_s = 0.0

    def observe(self, seconds: float) -> None:
        self.total += 1
        self.sum_s += seconds
        for i, edge in enumerate(_BUCKETS_S):
            if seconds <= edge:
                self.counts[i] += 1


@dataclass
class _Metrics:
    busy_s: float = 0.0
    tokens: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    steps: dict[str, _Histogram] = field(default_factory=lambda: defaultdict(_Histogram))
    rejected: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    errors: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    evicted: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message, "status": status}, status=status)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class StageServer:
    """Serve one block range over HTTP. `await start()`, then `url`; `await aclose()`."""

    def __init__(self, config: StageConfig, executor: Any = None):
        self.config = config
        self.executor = executor  # a LayerRangeExecutor; loaded in start() when None
        self._pool = ThreadPoolExecutor(
            max_workers=config.max_inflight, thread_name_prefix=f"{config.label}-worker"
        )
        self._slots = asyncio.Semaphore(config.max_inflight)
        self._waiting = 0
        self._running = 0
        self._req_locks: dict[str, asyncio.Lock] = {}
        self._metrics = _Metrics()
        self._runner: web.AppRunner | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._closing = False
        self._tensor_server: asyncio.Server | None = None
        self._tensor_conns: set[Any] = set()
        self.port: int | None = None
        self.tensor_port: int | None = None
        self.started_at = time.time()

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("server not started")
        host = self.config.host
        if ":" in host:
            host = f"[{host}]"
        if host in ("0.0.0.0", "[::]"):
            host = "127.0.0.1"
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        cfg = self.config
        if self.executor is None:
            from testbed.model.executor import LayerRangeExecutor

            self.executor = await asyncio.get_running_loop().run_in_executor(
                self._pool,
                lambda: LayerRangeExecutor(
                    cfg.model_dir,
                    cfg.start,
                    cfg.end,
                    device=cfg.device,
                    dtype=cfg.dtype,
                    max_requests=cfg.max_requests,
                ),
            )
            if cfg.emulation is not None:  # emulated device (testbed.emulation)
                from testbed.emulation.executor import EmulatedExecutor
                from testbed.emulation.timing import EmulationSpec, StageTiming

                spec = EmulationSpec.from_json(cfg.emulation)
                self.executor = EmulatedExecutor(
                    self.executor, StageTiming(spec, cfg.start, cfg.end)
                )
        app = web.Application(client_max_size=cfg.limits.max_body_bytes + (1 << 20))
        app.router.add_get("/health", self._health)
        app.router.add_get("/info", self._info)
        app.router.add_get("/metrics", self._metrics_text)
        app.router.add_post("/forward", self._forward)
        app.router.add_post("/release", self._release)
        app.router.add_post("/sink", self._sink)
        app.router.add_get("/emulation", self._emulation)
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, read_bufsize=1 << 22
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, cfg.host, cfg.port)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        if cfg.tensor_port is not None:
            from testbed.stage.tensor_port import start_server

            self._tensor_server = await start_server(self, cfg.host, cfg.tensor_port, cfg.limits)
            self.tensor_port = self._tensor_server.sockets[0].getsockname()[1]
        self._sweeper = asyncio.create_task(self._sweep_idle(), name=f"{cfg.label}-sweeper")

    async def aclose(self) -> None:
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self._tensor_server is not None:
            self._tensor_server.close()
            for conn in list(self._tensor_conns):
                if conn.transport is not None:
                    conn.transport.close()
            await self._tensor_server.wait_closed()
            self._tensor_server = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._pool.shutdown(wait=True, cancel_futures=True)

    async def __aenter__(self) -> StageServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _sweep_idle(self) -> None:
        ttl = self.config.request_ttl_s
        while True:
            await asyncio.sleep(min(max(ttl / 4, 0.05), 30.0))
            for rid in self.executor.idle_requests(ttl):
                lock = self._req_locks.get(rid)
                if not (lock and lock.locked()):
                    self.executor.release(rid)
                    self._req_locks.pop(rid, None)
                    self._metrics.evicted += 1

    # ------------------------------------------------------------------ routes
    async def _health(self, request: web.Request) -> web.Response:
        if self._closing:
            return _error(503, "shutting down")
        return web.json_response({"status": "ok", "name": self.config.label})

    async def _info(self, request: web.Request) -> web.Response:
        import torch

        ex = self.executor
        info = ex.info
        body = {
            "name": self.config.label,
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
            "rss_bytes": _rss_bytes(),
            "cuda_allocated_bytes": (
                torch.cuda.memory_allocated(ex.device) if ex.device.type == "cuda" else 0
            ),
            "requests": len(ex.request_ids),
            "max_requests": self.config.max_requests,
            "max_inflight": self.config.max_inflight,
            "max_queue": self.config.max_queue,
            "tensor_port": self.tensor_port,
            "pid": os.getpid(),
            "started_at": self.started_at,
        }
        return web.json_response(body)

    async def _emulation(self, request: web.Request) -> web.Response:
        """Pacing numbers of an emulated stage (404 when the stage is not emulated)."""
        report = getattr(self.executor, "pacing_report", None)
        if report is None:
            return _error(404, f"stage {self.config.label} is not an emulated device")
        try:
            since = max(0, int(request.query.get("since", "0")))
        except ValueError:
            return _error(400, "since must be an integer")
        return web.json_response(report(since))

    async def _release(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, 'release takes a JSON body {"request_id": "..."}')
        rid = body.get("request_id") if isinstance(body, dict) else None
        if not isinstance(rid, str) or not rid:
            return _error(400, 'release takes a JSON body {"request_id": "..."}')
        lock = self._req_locks.get(rid)
        if lock is not None:
            async with lock:
                released = self.executor.release(rid)
            self._req_locks.pop(rid, None)
        else:
            released = self.executor.release(rid)
        return web.json_response({"request_id": rid, "released": released})

    async def _sink(self, request: web.Request) -> web.Response:
        t0 = time.perf_counter()
        try:
            msg = await read_message(request.content, request.content_length, self.config.limits)
        except WireFormatError as exc:
            return self._reject_wire(exc)
        self._metrics.bytes_in += msg.nbytes
        return web.json_response(
            {"bytes": msg.nbytes, "tensors": len(msg.tensors), "read_s": time.perf_counter() - t0}
        )

    def _reject_wire(self, exc: WireFormatError) -> web.Response:
        status = 413 if exc.too_large else 400
        self._metrics.errors[status] += 1
        return _error(status, str(exc))

    def _admission_error(self) -> tuple[int, str] | None:
        cfg = self.config
        if self._closing:
            return 503, f"stage {cfg.label} is shutting down"
        if self._running >= cfg.max_inflight and self._waiting >= cfg.max_queue:
            self._metrics.rejected["queue_full"] += 1
            return 429, (
                f"stage {cfg.label} is busy: {self._running} running, {self._waiting} waiting "
                f"(max_inflight={cfg.max_inflight}, max_queue={cfg.max_queue}); retry later"
            )
        return None

    async def _forward(self, request: web.Request) -> web.Response:
        refused = self._admission_error()  # before reading the body
        if refused is not None:
            return _error(*refused)
        self._waiting += 1
        try:
            try:
                msg = await read_message(
                    request.content, request.content_length, self.config.limits
                )
            except WireFormatError as exc:
                return self._reject_wire(exc)
        finally:
            self._waiting -= 1
        status, error, result = await self.forward_message(msg, admitted=True)
        if error is not None:
            return _error(status, error)
        meta, parts = result
        return web.Response(
            body=WirePayload(parts),
            headers={
                "X-Service-Time-S": f"{meta['service_s']:.9f}",
                "X-Queue-Time-S": f"{meta['queue_s']:.9f}",
            },
        )

    async def forward_message(
        self, msg: Any, *, admitted: bool = False
    ) -> tuple[int, str | None, Any]:
        """Run one decoded /forward message: (status, error message or None, (meta, parts)).

        Shared by the HTTP route and the tensor port. `admitted`: capacity already checked.
        """
        from testbed.model.executor import (
            CacheFullError,
            CacheStateError,
            ExecutorInputError,
            UnknownRequestError,
        )

        cfg = self.config
        if not admitted:
            refused = self._admission_error()
            if refused is not None:
                return refused[0], refused[1], None
        self._metrics.bytes_in += msg.nbytes
        self._waiting += 1
        waiting = True
        try:
            try:
                rid, kind, start_pos, want_logits, x = self._parse_forward(msg)
                self.executor.check_input(kind, x, start_pos, rid)
                t_ready = time.perf_counter()
                lock = self._req_locks.setdefault(rid, asyncio.Lock())
                async with lock, self._slots:
                    self._waiting -= 1
                    waiting = False
                    self._running += 1
                    queue_s = time.perf_counter() - t_ready
                    try:
                        loop = asyncio.get_running_loop()
                        out, meta, parts = await loop.run_in_executor(
                            self._pool, self._compute, rid, kind, x, start_pos, want_logits, queue_s
                        )
                    finally:
                        self._running -= 1
            except UnknownRequestError as exc:
                return self._count(404, str(exc))
            except CacheStateError as exc:
                return self._count(409, str(exc))
            except (ExecutorInputError, ValueError) as exc:
                return self._count(400, str(exc))
            except CacheFullError as exc:
                self._metrics.rejected["cache_full"] += 1
                return 503, str(exc), None
            except Exception as exc:  # a model failure: report it, keep serving
                return self._count(500, f"stage {cfg.label} failed: {exc!r}")
            if not self.executor.has_request(rid):
                self._req_locks.pop(rid, None)
            m = self._metrics
            m.busy_s += out.compute_s
            m.tokens[kind] += int(x.shape[1])
            m.steps[kind].observe(out.compute_s)
            m.bytes_out += sum(p.nbytes for p in parts)
            return 200, None, (meta, parts)
        finally:
            if waiting:
                self._waiting -= 1

    def _count(self, status: int, message: str) -> tuple[int, str, None]:
        self._metrics.errors[status] += 1
        return status, message, None

    def _compute(
        self, rid: str, kind: str, x: Any, start_pos: int, want_logits: bool, queue_s: float
    ) -> tuple[Any, dict[str, Any], list[memoryview]]:
        out = self.executor.step(rid, kind, x, start_pos)
        tensors = {}
        if out.hidden is not None:
            tensors["hidden"] = out.hidden
        if want_logits and out.logits is not None:
            tensors["logits"] = out.logits
        meta = {
            "request_id": rid,
            "kind": kind,
            "start_pos": start_pos,
            "length": out.length,
            "token_id": out.token_id,
            "service_s": out.compute_s,
            "queue_s": queue_s,
            "stage": [self.executor.start, self.executor.end],
            "status": 200,
        }
        emulation = getattr(out, "emulation", None)  # an emulated device's pacing numbers
        if emulation:
            meta["emulation"] = emulation
        return out, meta, encode_parts(meta, tensors)

    def _parse_forward(self, msg: Any) -> tuple[str, str, int, bool, Any]:
        meta = msg.meta
        unknown = set(meta) - {"request_id", "kind", "start_pos", "want_logits", "op"}
        if unknown:
            raise ValueError(f"unknown meta keys {sorted(unknown)}")
        rid = meta.get("request_id")
        if not isinstance(rid, str) or not 0 < len(rid) <= _MAX_REQUEST_ID:
            raise ValueError(f"meta.request_id must be a string of 1..{_MAX_REQUEST_ID} chars")
        kind = meta.get("kind")
        if kind not in ("prefill", "decode"):
            raise ValueError(f"meta.kind must be 'prefill' or 'decode', got {kind!r}")
        start_pos = meta.get("start_pos")
        if not isinstance(start_pos, int) or isinstance(start_pos, bool) or start_pos < 0:
            raise ValueError(f"meta.start_pos must be an integer >= 0, got {start_pos!r}")
        want_logits = meta.get("want_logits", False)
        if not isinstance(want_logits, bool):
            raise ValueError("meta.want_logits must be true or false")
        if set(msg.tensors) != {"input"}:
            raise ValueError(
                f"expected exactly one tensor named 'input', got {sorted(msg.tensors)}"
            )
        return rid, kind, start_pos, want_logits, msg.tensors["input"]

    async def _metrics_text(self, request: web.Request) -> web.Response:
        m = self._metrics
        ex = self.executor
        lbl = f'stage="{self.config.label}"'
        lines = [
            "# HELP testbed_stage_queue_length Steps waiting for a worker.",
            "# TYPE testbed_stage_queue_length gauge",
            f"testbed_stage_queue_length{{{lbl}}} {self._waiting}",
            "# HELP testbed_stage_inflight Steps being computed.",
            "# TYPE testbed_stage_inflight gauge",
            f"testbed_stage_inflight{{{lbl}}} {self._running}",
            "# HELP testbed_stage_requests Request KV caches held.",
            "# TYPE testbed_stage_requests gauge",
            f"testbed_stage_requests{{{lbl}}} {len(ex.request_ids)}",
            "# HELP testbed_stage_kv_bytes Bytes held by KV caches.",
            "# TYPE testbed_stage_kv_bytes gauge",
            f"testbed_stage_kv_bytes{{{lbl}}} {ex.kv_bytes()}",
            "# HELP testbed_stage_param_bytes Bytes of weights held.",
            "# TYPE testbed_stage_param_bytes gauge",
            f"testbed_stage_param_bytes{{{lbl}}} {ex.param_bytes}",
            "# HELP testbed_stage_busy_seconds_total Seconds spent computing steps.",
            "# TYPE testbed_stage_busy_seconds_total counter",
            f"testbed_stage_busy_seconds_total{{{lbl}}} {m.busy_s:.9f}",
            "# HELP testbed_stage_tokens_total Tokens processed, by step kind.",
            "# TYPE testbed_stage_tokens_total counter",
        ]
        for kind in ("prefill", "decode"):
            lines.append(f'testbed_stage_tokens_total{{{lbl},kind="{kind}"}} {m.tokens[kind]}')
        lines += [
            "# HELP testbed_stage_step_seconds Compute time per step, by kind.",
            "# TYPE testbed_stage_step_seconds histogram",
        ]
        for kind in ("prefill", "decode"):
            h = m.steps[kind]
            for edge, count in zip(_BUCKETS_S, h.counts, strict=True):
                lines.append(
                    f'testbed_stage_step_seconds_bucket{{{lbl},kind="{kind}",le="{edge}"}} {count}'
                )
            lines.append(
                f'testbed_stage_step_seconds_bucket{{{lbl},kind="{kind}",le="+Inf"}} {h.total}'
            )
            lines.append(f'testbed_stage_step_seconds_sum{{{lbl},kind="{kind}"}} {h.sum_s:.9f}')
            lines.append(f'testbed_stage_step_seconds_count{{{lbl},kind="{kind}"}} {h.total}')
        lines += [
            "# HELP testbed_stage_rejected_total Steps refused for capacity, by reason.",
            "# TYPE testbed_stage_rejected_total counter",
        ]
        for reason in ("queue_full", "cache_full"):
            lines.append(
                f'testbed_stage_rejected_total{{{lbl},reason="{reason}"}} {m.rejected[reason]}'
            )
        lines += [
            "# HELP testbed_stage_errors_total Requests answered with an error, by status.",
            "# TYPE testbed_stage_errors_total counter",
        ]
        for status in sorted(m.errors):
            lines.append(
                f'testbed_stage_errors_total{{{lbl},status="{status}"}} {m.errors[status]}'
            )
        lines += [
            "# HELP testbed_stage_evicted_total Idle request caches dropped after the TTL.",
            "# TYPE testbed_stage_evicted_total counter",
            f"testbed_stage_evicted_total{{{lbl}}} {m.evicted}",
            "# HELP testbed_stage_bytes_total Wire bytes received and sent.",
            "# TYPE testbed_stage_bytes_total counter",
            f'testbed_stage_bytes_total{{{lbl},direction="in"}} {m.bytes_in}',
            f'testbed_stage_bytes_total{{{lbl},direction="out"}} {m.bytes_out}',
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


async def serve(
    config: StageConfig, *, announce: bool = True, exit_with_parent: bool = False
) -> None:
    """Run a stage server until SIGTERM/SIGINT (the `testbed stage serve` command).

    Once listening it prints one JSON line on stdout: {"event": "listening", "url", "port",
    "pid", ...}; launchers read it to learn the bound port (use port 0 for a free one).
    `exit_with_parent`: also stop when the process that started this one dies.
    """
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    server = StageServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    parent = os.getppid()

    async def watch_parent() -> None:
        while os.getppid() == parent:  # noqa: ASYNC110 - nothing to wait on but polling
            await asyncio.sleep(0.5)
        stop.set()

    watcher = asyncio.create_task(watch_parent()) if exit_with_parent else None
    await server.start()
    try:
        if announce:
            ex = server.executor
            line = {
                "event": "listening",
                "url": server.url,
                "host": config.host,
                "port": server.port,
                "tensor_port": server.tensor_port,
                "pid": os.getpid(),
                "name": config.label,
                "blocks": [ex.start, ex.end],
                "device": str(ex.device),
            }
            sys.stdout.write(json.dumps(line) + "\n")
            sys.stdout.flush()
        await stop.wait()
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await server.aclose()
