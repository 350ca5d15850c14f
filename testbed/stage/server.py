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
- ``POST /load``    -> JSON ``{"start", "end"}``: load that block range instead, warm it up and
  swap it in (409 ``in_use`` while caches or steps are held; see :mod:`testbed.stage.reload`).
- ``POST /speed``   -> JSON ``{"speed"}``: an emulated stage paces its steps at that fraction of
  its device's speed (a timeline slowdown; see :mod:`testbed.stage.speed`).
- ``GET /metrics``  -> Prometheus text.

The same /forward messages also travel over a plain TCP *tensor port* (announced in /info as
``tensor_port``; see :mod:`testbed.stage.tensor_port`): fewer copies for megabyte hidden
states. Both paths share admission, validation, metrics and the worker threads.

Errors are JSON ``{"error": message, "status": status, "code": code}`` (the tensor port puts
the same keys in its answer's meta), the code one of :class:`testbed.stage.errors.ErrorCode`:
400/413 ``bad_input`` (malformed or over the size limits), 404 ``unknown_request``, 409
``bad_position`` (wrong position, a prefill over an existing cache, past the context), 429
``busy`` (queue full), 503 ``cache_full`` or ``shutting_down``, 500 ``model_error``; one table
(:func:`testbed.stage.errors.status_and_code`) maps executor exceptions to them. The server
keeps serving the others in every case. Torch work runs on worker threads (``max_inflight`` of them,
default 1), never on the event loop; at most ``max_queue`` more steps may wait for a batch.

Steps are batched at the iteration level (:mod:`testbed.stage.batcher`): every waiting decode
and chunks of waiting prefills run as one ``executor.step_batch`` call, up to
``config.batch`` limits; each reply's meta carries the ``batch_size`` of its step, and a
/forward meta may carry the request's ``class``, ``priority`` and ``slack_s`` (batch order).
"""

from __future__ import annotations

import asyncio
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from aiohttp import web

from testbed.model.batch import BatchStep
from testbed.model.contract import CacheFullError, StageExecutor, StepOutput
from testbed.model.warmup import WarmUp
from testbed.stage.batcher import Pending, StepQueue
from testbed.stage.config import StageConfig
from testbed.stage.errors import ErrorCode, StageRejectedError, status_and_code
from testbed.stage.forward import ForwardReply, ForwardRequest, parse_forward
from testbed.stage.forwarder import Forwarder
from testbed.stage.info import emulation_response, info_body, load_executor
from testbed.stage.info import error_response as _error
from testbed.stage.intake import JSON_BODY_MAX_BYTES, READ_BUFSIZE_BYTES, Intake
from testbed.stage.limits import Reservation
from testbed.stage.listen import bind_errors
from testbed.stage.metrics import StageMetrics
from testbed.stage.payload import WirePayload
from testbed.stage.reload import handle_load, handle_unload
from testbed.stage.routes import metrics_text, release, sink
from testbed.stage.slots import RecentRequests
from testbed.stage.speed import handle_speed
from testbed.stage.steps import encode_reply, run_batch
from testbed.stage.tasks import cancel_and_wait
from testbed.stage.tensor_port import TensorPortServer, start_tensor_port
from testbed.stage.wire import WireMessage, encode_parts

__all__ = ["StageConfig", "StageServer"]  # StageConfig lives in testbed.stage.config


class StageServer:
    """Serve one block range over HTTP. `await start()`, then `url`; `await aclose()`.

    Threads: routes, admission and bookkeeping run on the event loop; ``executor.step`` runs on
    ``max_inflight`` worker threads, one step per request at a time (a per-request lock), as
    :mod:`testbed.model.contract` describes.
    """

    def __init__(self, config: StageConfig, executor: StageExecutor | None = None):
        self.config = config
        self._executor = executor  # a LayerRangeExecutor is loaded in start() when None
        self._pool = ThreadPoolExecutor(
            max_workers=config.max_inflight, thread_name_prefix=f"{config.label}-worker"
        )
        self._queue: StepQueue | None = None  # made in start() (needs the running loop)
        self._waiting = 0  # steps being read or checked (the step queue counts its own)
        self._req_locks: dict[str, asyncio.Lock] = {}
        self._recent = RecentRequests(config.evict_idle_s, 2 * config.max_requests)
        self._intake: Intake | None = None  # made in start(), once the executor is known
        self._metrics = StageMetrics()
        self._runner: web.AppRunner | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._closing = False
        self._tensor_server: TensorPortServer | None = None
        self.forwarder = Forwarder(config.label, config.limits)  # steps that carry a route
        self.port: int | None = None
        self.tensor_port: int | None = None
        self.warmup: WarmUp | None = None  # what the warm-up after loading ran (None: skipped)
        self.started_at = time.time()
        self.loaded_at = self.started_at  # when the blocks served now were swapped in
        self.loads = 0  # block ranges loaded by POST /load since start
        self.loading: tuple[int, int] | None = None  # a /load under way: its range
        self.loading_beside: tuple[int, int] | None = None  # a /load keep:true under way

    # ------------------------------------------------------------------ lifecycle
    @property
    def executor(self) -> StageExecutor:
        if self._executor is None:
            raise RuntimeError("server not started: the executor loads in start()")
        return self._executor

    @property
    def pool(self) -> ThreadPoolExecutor:
        """The worker threads (steps, and a /load's loading)."""
        return self._pool

    def swap(
        self,
        config: StageConfig,
        executor: StageExecutor,
        warmup: WarmUp | None,
        count: bool = True,
    ) -> None:
        """Serve ``executor`` (``config``'s block range) from now on; the caller checked that
        no request is held or in flight, or kept their blocks (:mod:`testbed.stage.reload`)."""
        self.config, self._executor, self.warmup = config, executor, warmup
        self.intake.caps = Intake.caps_for(executor, config.limits, config.inputs)
        if count:
            self.loaded_at = time.time()
            self.loads += 1

    @property
    def intake(self) -> Intake:
        if self._intake is None:
            raise RuntimeError("server not started")
        return self._intake

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
        self._executor, self.warmup = await load_executor(cfg, self._pool, self._executor)
        self._intake = Intake(
            self.config.label,
            cfg.limits,
            cfg.inputs,
            Intake.caps_for(self.executor, cfg.limits, cfg.inputs),
            refuse=self._refuse,
            refuse_exc=self._refuse_exc,
        )
        self._queue = StepQueue(self._run_batch, cfg.batch, cfg.max_inflight)
        self._queue.start()
        # client_max_size bounds the JSON routes; wire bodies stream through read_message
        app = web.Application(client_max_size=JSON_BODY_MAX_BYTES)
        app.router.add_get("/health", self._health)
        app.router.add_get("/info", self._info)
        app.router.add_get("/metrics", partial(metrics_text, self))
        app.router.add_post("/forward", self._forward)
        app.router.add_post("/release", partial(release, self))
        app.router.add_post("/sink", partial(sink, self))
        app.router.add_post("/load", partial(handle_load, self))
        app.router.add_post("/unload", partial(handle_unload, self))
        app.router.add_post("/speed", partial(handle_speed, self))
        app.router.add_get("/emulation", self._emulation)
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, read_bufsize=READ_BUFSIZE_BYTES
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, cfg.host, cfg.port)
        with bind_errors(cfg.host, cfg.port, "--port"):
            await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        if cfg.tensor_port is not None:
            with bind_errors(cfg.host, cfg.tensor_port, "--tensor-port"):
                self._tensor_server = await start_tensor_port(
                    self, cfg.host, cfg.tensor_port, cfg.limits, cfg.inputs
                )
            self.tensor_port = self._tensor_server.port
        self._sweeper = asyncio.create_task(self._sweep_idle(), name=f"{cfg.label}-sweeper")

    def stop_admitting(self) -> None:
        """Refuse new steps with ``shutting_down`` (503; /health too); running ones finish.
        The first part of :meth:`aclose`, callable alone to drain a stage."""
        self._closing = True

    async def aclose(self) -> None:
        self.stop_admitting()
        if self._sweeper is not None:
            sweeper, self._sweeper = self._sweeper, None
            await cancel_and_wait(sweeper)
        if self._tensor_server is not None:
            tensor_server, self._tensor_server = self._tensor_server, None
            await tensor_server.aclose()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        if self._queue is not None:
            await self._queue.aclose()
        await self.forwarder.aclose()
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
                self._evict(rid)

    def _evict(self, rid: str) -> bool:
        """Free an idle cache unless a step holds it; whether it was freed."""
        lock = self._req_locks.get(rid)
        if lock and lock.locked():
            return False
        self._recent.forget(rid)
        if not self.executor.release(rid):
            return False
        self._req_locks.pop(rid, None)
        self._metrics.evicted += 1
        return True

    # ------------------------------------------------------------------ the tensor port's view
    def note_bytes_in(self, nbytes: int) -> None:
        """A message of ``nbytes`` arrived (the tensor port's sink)."""
        self._metrics.bytes_in += nbytes

    def note_refused(self, status: int, code: ErrorCode | None) -> None:
        """An answer with an error went out (the tensor port's framing errors)."""
        self._metrics.count_refusal(status, code)

    # ------------------------------------------------------------------ routes
    async def _health(self, request: web.Request) -> web.Response:
        if self._closing:
            return _error(self._shutting_down())
        body: dict[str, object] = {"status": "ok", "name": self.config.label}
        if self.loading is not None:
            body["loading"] = list(self.loading)
        return web.json_response(body)

    async def _info(self, request: web.Request) -> web.Response:
        return web.json_response(info_body(self))

    async def _emulation(self, request: web.Request) -> web.Response:
        """Pacing numbers of an emulated stage (404 when the stage is not emulated)."""
        return emulation_response(self.executor, self.config.label, request)

    async def _forward(self, request: web.Request) -> web.Response:
        # A request counts as waiting only once its body is complete (admission in
        # forward_message): a stalled upload holds budget bytes, never a queue place.
        try:
            msg, held = await self.intake.read_body(request, "forward")
            try:
                reply = await self.forward_message(msg)
            finally:
                del msg
                held.release()
        except StageRejectedError as exc:
            return _error(exc)
        return web.Response(
            body=WirePayload(reply.parts),
            headers={
                "X-Service-Time-S": f"{reply.meta['service_s']:.9f}",
                "X-Queue-Time-S": f"{reply.meta['queue_s']:.9f}",
            },
        )

    # ------------------------------------------------------------------ the tensor port's intake
    def reserve_now(self, op: str, nbytes: int) -> Reservation | None:
        """Memory for a payload when it fits the budget now, else None (then await
        :meth:`reserve_payload`); raises :class:`StageRejectedError` (413) when too large."""
        if self._closing:
            raise self._shutting_down()
        return self.intake.reserve_now(op, nbytes)

    async def reserve_payload(self, op: str, nbytes: int) -> Reservation:
        """Memory for a payload, waiting for the budget (429 ``busy`` when it stays spent)."""
        if self._closing:
            raise self._shutting_down()
        return await self.intake.reserve(op, nbytes)

    # ------------------------------------------------------------------ cache slots
    def _check_input(self, req: ForwardRequest) -> None:
        """The executor's early check; a prefill that finds every cache slot taken first evicts
        one idle cache (:mod:`testbed.stage.slots`)."""
        ex = self.executor
        bind = getattr(ex, "bind", None)  # two block ranges held (testbed.stage.generations)
        if bind is not None:
            ex = bind(req.request_id, req.options.blocks)
        try:
            ex.check_input(req.kind, req.input, req.start_pos, req.request_id)
        except CacheFullError:
            if not self._evict_one_idle():
                raise
            ex.check_input(req.kind, req.input, req.start_pos, req.request_id)
        finally:
            if bind is not None and sys.exc_info()[0] is not None:
                self.executor.unbind(req.request_id)  # type: ignore[attr-defined]
        self._recent.touch(req.request_id, lambda: ex.request_ids)

    def _evict_one_idle(self) -> bool:
        return any(self._evict(rid) for rid in list(self._recent.victims()))

    # ------------------------------------------------------------------ refusals
    def _refuse(self, status: int, code: ErrorCode, message: str) -> StageRejectedError:
        """The error to answer with, counted in the metrics."""
        self._metrics.count_refusal(status, code)
        return StageRejectedError(self.config.label, status, code, message)

    def _refuse_exc(self, exc: BaseException) -> StageRejectedError:
        status, code = status_and_code(exc)
        message = str(exc)
        if code == ErrorCode.MODEL_ERROR:
            message = f"stage {self.config.label} failed: {exc!r}"
        return self._refuse(status, code, message)

    def _shutting_down(self) -> StageRejectedError:
        label = self.config.label
        return self._refuse(503, ErrorCode.SHUTTING_DOWN, f"stage {label} is shutting down")

    @property
    def _running(self) -> int:
        """Steps in batches being computed."""
        return 0 if self._queue is None else self._queue.running_rows

    @property
    def steps_in_flight(self) -> int:
        """Steps admitted and not answered yet (read, queued or computing)."""
        return self._running + self._waiting_steps

    @property
    def _waiting_steps(self) -> int:
        """Steps admitted and not computing: being read, checked, or queued for a batch."""
        return self._waiting + (0 if self._queue is None else self._queue.waiting)

    def _admit(self) -> None:
        """Raise the refusal when no step may be admitted now (stopping, or queue full)."""
        cfg = self.config
        if self._closing:
            raise self._shutting_down()
        if self.loading is not None:
            a, b = self.loading
            raise self._refuse(
                429, ErrorCode.BUSY, f"stage {cfg.label} is loading blocks {a}:{b}; retry later"
            )
        workers_busy = self._queue is not None and self._queue.running_batches >= cfg.max_inflight
        if workers_busy and self._waiting_steps >= cfg.max_queue:
            raise self._refuse(
                429,
                ErrorCode.BUSY,
                f"stage {cfg.label} is busy: {self._running} running, {self._waiting_steps} "
                "waiting "
                f"(max_inflight={cfg.max_inflight}, max_queue={cfg.max_queue}); retry later",
            )

    # ------------------------------------------------------------------ one step
    async def forward_message(self, msg: WireMessage, *, admitted: bool = False) -> ForwardReply:
        """Run one decoded /forward message; raises :class:`StageRejectedError` when refused.

        Shared by the HTTP route and the tensor port. `admitted`: capacity already checked.
        """
        received_at = time.monotonic()
        if not admitted:
            self._admit()
        self._metrics.bytes_in += msg.nbytes
        self._waiting += 1
        waiting = True
        ex = self.executor
        try:
            try:
                req = parse_forward(msg)
                self._check_input(req)
                lock = self._req_locks.setdefault(req.request_id, asyncio.Lock())
                async with lock:
                    assert self._queue is not None
                    self._waiting -= 1
                    waiting = False
                    done = await self._queue.submit(req)
                    out = done.future.result()
                    reply, compute_s = self._reply(req, out, done)
                    if req.options.release:  # the request's last step: no /release to wait for
                        ex.release(req.request_id)
                        self._recent.forget(req.request_id)
            except Exception as exc:  # a refusal or a model failure: report it, keep serving
                raise self._refuse_exc(exc) from None
            if not ex.has_request(req.request_id):
                self._req_locks.pop(req.request_id, None)
            self._metrics.count_step(
                req.kind,
                int(req.input.shape[1]),
                compute_s,
                sum(p.nbytes for p in reply.parts),
            )
            if req.route:  # the forward transport: on to the next stage, its token back
                reply = await self._pass_on(req, out, reply, received_at)
            return reply
        finally:
            if waiting:
                self._waiting -= 1

    async def _pass_on(
        self, req: ForwardRequest, out: StepOutput, reply: ForwardReply, received_at: float
    ) -> ForwardReply:
        """Send the step's hidden states along its route; this stage's answer carries the
        chain's token and every later hop's timings (:mod:`testbed.stage.route`)."""
        if out.hidden is None:
            raise self._refuse(
                400,
                ErrorCode.BAD_INPUT,
                f"stage {self.config.label} is the last stage; the step's route goes on to "
                f"{req.route[0].node}",
            )
        chain = await self.forwarder.pass_on(req, out.hidden, received_at)
        meta = reply.meta | chain
        return ForwardReply(meta, encode_parts(meta))

    async def _run_batch(self, steps: list[BatchStep]) -> list[StepOutput | Exception]:
        """One batch on a worker thread (the step queue's runner)."""
        return await run_batch(self._pool, self.executor, self._metrics, steps)

    def _reply(
        self, req: ForwardRequest, out: StepOutput, done: Pending
    ) -> tuple[ForwardReply, float]:
        """A finished step's answer, encoded for the wire."""
        return encode_reply(self.executor, req, out, done)
