"""Small routes of the stage server (:mod:`testbed.stage.server`): ``/release``, ``/sink`` and
``/metrics``; each takes the server first (bound with ``functools.partial``)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from aiohttp import web

from testbed.stage.errors import ErrorCode, StageRejectedError
from testbed.stage.info import error_response
from testbed.stage.metrics import Gauges

if TYPE_CHECKING:
    from testbed.stage.server import StageServer


async def release(server: StageServer, request: web.Request) -> web.Response:
    """``POST /release {"request_id"}``: free the request's cache (idempotent)."""
    usage = 'release takes a JSON body {"request_id": "..."}'
    try:
        body = await server.intake.read_json(request)
    except StageRejectedError as exc:
        return error_response(exc)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError; nesting
        return error_response(server._refuse(400, ErrorCode.BAD_INPUT, usage))
    rid = body.get("request_id") if isinstance(body, dict) else None
    if not isinstance(rid, str) or not rid:
        return error_response(server._refuse(400, ErrorCode.BAD_INPUT, usage))
    lock = server._req_locks.get(rid)
    if lock is not None:
        async with lock:
            released = server.executor.release(rid)
        server._req_locks.pop(rid, None)
    else:
        released = server.executor.release(rid)
    server._recent.forget(rid)
    return web.json_response({"request_id": rid, "released": released})


async def sink(server: StageServer, request: web.Request) -> web.Response:
    """``POST /sink``: read and validate a wire message, discard it."""
    t0 = time.perf_counter()
    try:
        msg, held = await server.intake.read_body(request, "sink")
    except StageRejectedError as exc:
        return error_response(exc)
    held.release()
    server.note_bytes_in(msg.nbytes)
    return web.json_response(
        {"bytes": msg.nbytes, "tensors": len(msg.tensors), "read_s": time.perf_counter() - t0}
    )


async def metrics_text(server: StageServer, request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text."""
    ex = server.executor
    gauges = Gauges(
        waiting=server._waiting_steps,
        running=server._running,
        requests=len(ex.request_ids),
        kv_bytes=ex.kv_bytes(),
        param_bytes=ex.param_bytes,
    )
    text = server._metrics.render(server.config.label, gauges)
    return web.Response(text=text, content_type="text/plain")
