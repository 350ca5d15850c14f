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

The swap is all-or-nothing: a load that fails leaves the old blocks serving.

``{"start", "end", "keep": true}`` (adaptive re-partitioning) loads the range *beside* the
current one while the stage goes on serving (no 409, no 429: on its own thread), and answers
the new ``generation``; requests in flight finish on the blocks they started on, new ones take
the new range (:mod:`testbed.stage.generations`). ``POST /unload {"start", "end"}`` then drops
an older range once it holds no cache (409 ``in_use`` while it does; 400 for a range the stage
does not hold, or its only one).
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from testbed.errors import ConfigError
from testbed.stage.errors import ErrorCode, StageRejectedError
from testbed.stage.info import error_response, info_body, load_executor, refuser

if TYPE_CHECKING:
    from testbed.stage.server import StageServer

USAGE = 'load takes a JSON body {"start": FIRST_BLOCK, "end": ONE_PAST_LAST_BLOCK}'


def parse_range(
    body: object, num_blocks: int, optional: frozenset[str] = frozenset()
) -> tuple[int, int]:
    """(start, end) of a /load body; ValueError with the bad value and the rule otherwise."""
    if (
        not isinstance(body, dict)
        or not {"start", "end"} <= set(body) <= {"start", "end"} | optional
    ):
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
    if server.loading is not None or server.loading_beside is not None:
        a, b = server.loading or server.loading_beside  # type: ignore[misc]
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

    refuse = refuser(server)
    try:
        body: Any = await server.intake.read_json(request)
    except StageRejectedError as exc:
        return error_response(exc)
    except (ValueError, RecursionError):
        return refuse(400, ErrorCode.BAD_INPUT, USAGE)
    try:
        start, end = parse_range(body, server.executor.info.num_blocks, frozenset({"keep"}))
        keep = body.get("keep", False)
        if not isinstance(keep, bool):
            raise ValueError(f"keep must be true or false, got {keep!r}")
    except ValueError as exc:
        return refuse(400, ErrorCode.BAD_INPUT, f"stage {label}: {exc}")
    if keep:
        return await load_beside(server, start, end, refuse)
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


async def load_beside(server: StageServer, start: int, end: int, refuse: Any) -> web.Response:
    """``keep: true``: load ``start:end`` as a new generation while the stage goes on serving."""
    from concurrent.futures import ThreadPoolExecutor

    from testbed.stage.generations import Generations

    label = server.config.label
    if server.loading is not None or server.loading_beside is not None:
        busy = server.loading or server.loading_beside
        return refuse(409, ErrorCode.IN_USE, f"stage {label} is already loading blocks {busy}")
    ex = server.executor
    gens = ex if isinstance(ex, Generations) else Generations(ex)
    found = gens.find((start, end))
    if found is not None and found == max(gens.numbers):
        return web.json_response(
            info_body(server) | {"loaded": False, "load_s": 0.0, "generation": found}
        )
    cfg = dataclasses.replace(server.config, start=start, end=end)
    t0 = time.perf_counter()
    server.loading_beside = (start, end)
    pool = ThreadPoolExecutor(1, thread_name_prefix=f"{label}-load")  # the workers keep serving
    try:
        executor, warm = await load_executor(cfg, pool, None)
    except ConfigError as exc:
        return refuse(400, ErrorCode.BAD_INPUT, f"stage {label}: {exc}")
    finally:
        server.loading_beside = None
        pool.shutdown(wait=False)
    continue_pacing_log(executor, gens.newest)
    number = gens.add(executor)
    server.swap(cfg, gens, warm)
    return web.json_response(
        info_body(server)
        | {"loaded": True, "load_s": time.perf_counter() - t0, "generation": number}
    )


def continue_pacing_log(new: object, serving: object) -> None:
    """An emulated range loaded beside another records its steps in the stage's one pacing
    log (GET /emulation then reports both ranges' steps, with stable indices)."""
    from testbed.emulation.executor import EmulatedExecutor

    if isinstance(new, EmulatedExecutor) and isinstance(serving, EmulatedExecutor):
        new.continue_log(serving)


async def handle_unload(server: StageServer, request: web.Request) -> web.Response:
    """``POST /unload {"start", "end"}``: drop an older generation (module docstring)."""
    from testbed.stage.generations import Generations

    label = server.config.label

    refuse = refuser(server)
    try:
        body: Any = await server.intake.read_json(request)
        start, end = parse_range(body, server.executor.info.num_blocks)
    except StageRejectedError as exc:
        return error_response(exc)
    except (ValueError, RecursionError) as exc:
        return refuse(400, ErrorCode.BAD_INPUT, f"stage {label}: unload: {exc}"[:300])
    gens = server.executor
    number = gens.find((start, end)) if isinstance(gens, Generations) else None
    if not isinstance(gens, Generations) or number is None or number == max(gens.numbers):
        return refuse(
            400, ErrorCode.BAD_INPUT,
            f"stage {label} holds no older generation of blocks {start}:{end} to unload "
            "(a stage keeps the range it serves new requests with)",
        )  # fmt: skip
    held = gens.holders(number)
    if held:
        return refuse(
            409, ErrorCode.IN_USE,
            f"stage {label}: blocks {start}:{end} still hold {len(held)} request(s) "
            f"({', '.join(held[:3])}); unload once they finished",
        )  # fmt: skip
    freed = gens.executor(number).param_bytes
    gens.remove(number)
    if len(gens.numbers) == 1:  # one range again: serve it alone
        server.swap(server.config, gens.newest, server.warmup, count=False)
    return web.json_response(info_body(server) | {"unloaded": [start, end], "freed_bytes": freed})
