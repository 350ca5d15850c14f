"""``POST /speed``: an emulated stage runs at a fraction (or a multiple) of its device's speed.

A timeline's ``{node: X, speed: 0.5}`` on a real node scales its CPU quota (or duty-cycles a
local process); on an emulated node that would only slow the stand-in's real work, which runs
well inside the device's windows, so the emulated device would not slow at all. An emulated
stage instead takes ``{"speed": s}`` (0 < s <= 64) and paces every later step to the device's
predicted time / s, the same step times the simulator charges for that event. The stage keeps
``s`` for blocks it loads later (``POST /load``, also beside the current ones); a restarted stage starts at 1 again.

Refusals: 400 ``bad_input`` for a body that is not ``{"speed": s}`` with s in (0, 64], or when
the stage is not emulated (its speed is its CPU's: the runtime scales the quota instead).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

from aiohttp import web

from testbed.stage.errors import ErrorCode, StageRejectedError
from testbed.stage.info import error_response, refuser

if TYPE_CHECKING:
    from testbed.stage.server import StageServer

USAGE = 'speed takes a JSON body {"speed": S} with 0 < S <= 64 (1 = the device as profiled)'
MAX_SPEED = 64.0


def parse_speed(body: object) -> float:
    """The speed of a /speed body; ValueError naming the bad value and the rule otherwise."""
    if not isinstance(body, dict) or set(body) != {"speed"}:
        raise ValueError(f"{USAGE}, got {body!r}"[:300])
    s = body["speed"]
    if isinstance(s, bool) or not isinstance(s, int | float):
        raise ValueError(f"{USAGE}; got speed {s!r}")
    if not (math.isfinite(s) and 0 < s <= MAX_SPEED):
        raise ValueError(f"{USAGE}; got speed {s!r}")
    return float(s)


async def handle_speed(server: StageServer, request: web.Request) -> web.Response:
    """The /speed route (see the module docstring)."""
    from testbed.emulation.executor import EmulatedExecutor
    from testbed.emulation.timing import EmulationSpec
    from testbed.stage.generations import Generations

    label = server.config.label

    bad_input = refuser(server)

    def refuse(message: str) -> web.Response:
        return bad_input(400, ErrorCode.BAD_INPUT, message)

    try:
        body: Any = await server.intake.read_json(request)
    except StageRejectedError as exc:
        return error_response(exc)
    except (ValueError, RecursionError):
        return refuse(USAGE)
    try:
        speed = parse_speed(body)
    except ValueError as exc:
        return refuse(f"stage {label}: {exc}")
    cfg = server.config
    if cfg.emulation is None:
        return refuse(
            f"stage {label} is not emulated: its speed is its CPU's (a runtime scales the "
            "node's CPU quota for a slowdown)"
        )
    spec = EmulationSpec.from_json(cfg.emulation).model_copy(update={"speed": speed})
    server.config = dataclasses.replace(cfg, emulation=spec.to_json())  # later /load keeps it
    ex = server.executor
    held = [ex.executor(n) for n in ex.numbers] if isinstance(ex, Generations) else [ex]
    for one in held:  # both ranges during a re-partitioning's overlap
        if isinstance(one, EmulatedExecutor):
            one.speed = speed
    return web.json_response({"name": label, "speed": speed})
