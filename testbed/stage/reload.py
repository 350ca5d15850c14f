"""``POST /load``: a running stage server takes another block range of the same model.

A plan change on the same nodes (``testbed compare`` going from one partitioner's plan to the
next) then costs one load and warm-up per node instead of a new testbed: no container start, no
torch import, no stand-in load from scratch. The body is JSON ``{"start": s, "end": e}``; the
server loads blocks ``[s, e)`` from its model folder into a new executor on its worker thread
(an emulated stage with the timing, KV capacity and wire size of the new blocks), warms it up
as at start-up, swaps it in and answers what ``/info`` now says. Like every other route it has
no authentication: a stage listens on the testbed's own networks only.

Refusals (JSON errors as for every route): 400 ``bad_input`` for a range that is not inside
the model (or whose weights do not fit an emulated device), 409 ``in_use`` while the stage
holds request caches or has steps in flight or another load under way (a swap under a request
would break its cache; release them or wait for the run to end). While a load runs, ``/forward``
answers 429 ``busy`` (retry later) and ``/health`` still answers 200 with ``"loading"``.

The swap is all-or-nothing: a load that fails leaves the old blocks serving. Later adaptive
re-partitioning (new requests on a new layout while old ones finish) would keep the old
executor for its requests; this call does not do that yet.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from testbed.errors import ConfigError
from testbed.stage.errors import ErrorCode, StageRejectedError
from testbed.stage.info import error_response, info_body, load_executor

if TYPE_CHECKING:
    from testbed.stage.server import StageServer

USAGE = 'load takes a JSON body {"start": FIRST_BLOCK, "end": ONE_PAST_LAST_BLOCK}'


def parse_range(body: object, num_blocks: int) -> tuple[int, int]:
    """(start, end) of a /load body; ValueError with the bad value and the rule otherwise."""
    if not isinstance(body, dict) or set(body) != {"start", "end"}:
        raise ValueError(f"{USAGE}, got {body!r}"[:300])
    start, end = body["start"], body["end"]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end)):
        raise ValueError(f"start and end must be integers, got {start!r} and {end!r}")
    if not 0 <= start < end <= num_blocks:
        raise ValueError(
            f"blocks {start}:{end} are not a range inside the model's 0:{num_blocks} "
            "(0 <= start < end <= number of blocks)"
        )
    return start, end


def busy_reason(server: StageServer) -> str | None:
    """Why the stage cannot swap its blocks now (None: it can)."""
    ex = server.executor
    held = len(ex.request_ids)
    steps = server.steps_in_flight
    if server.loading is not None:
        a, b = server.loading
        return f"it is already loading blocks {a}:{b}"
    if held or steps:
        return (
            f"it holds {held} request cache(s) and has {steps} step(s) in flight; release them "
            "(or let the run finish) before loading other blocks"
        )
    return None


async def handle_load(server: StageServer, request: web.Request) -> web.Response:
    """The /load route (see the module docstring)."""
    label = server.config.label

    def refuse(status: int, code: ErrorCode, message: str) -> web.Response:
        server.note_refused(status, code)
        return error_response(StageRejectedError(label, status, code, message))

    try:
        body: Any = await server.intake.read_json(request)
    except StageRejectedError as exc:
        return error_response(exc)
    except (ValueError, RecursionError):
        return refuse(400, ErrorCode.BAD_INPUT, USAGE)
    try:
        start, end = parse_range(body, server.executor.info.num_blocks)
    except ValueError as exc:
        return refuse(400, ErrorCode.BAD_INPUT, f"stage {label}: {exc}")
    why = busy_reason(server)
    if why is not None:
        return refuse(
            409, ErrorCode.IN_USE, f"stage {label} cannot load blocks {start}:{end}: {why}"
        )
    old = server.executor
    if (old.start, old.end) == (start, end):
        return web.json_response(info_body(server) | {"loaded": False, "load_s": 0.0})
    cfg = dataclasses.replace(server.config, start=start, end=end)
    t0 = time.perf_counter()
    server.loading = (start, end)
    try:
        executor, warm = await load_executor(cfg, server.pool, None)
    except ConfigError as exc:  # the range does not fit the weights or the emulated device
        return refuse(400, ErrorCode.BAD_INPUT, f"stage {label}: {exc}")
    finally:
        server.loading = None
    server.swap(cfg, executor, warm)
    return web.json_response(
        info_body(server) | {"loaded": True, "load_s": time.perf_counter() - t0}
    )
