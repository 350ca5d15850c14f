"""Pydantic field types that parse human units once, at the edge (see testbed.units).

In a file (validation through :func:`testbed.spec.loading.validate`) a quantity must spell its
unit: ``delay: 20`` is refused (20 what?), ``delay: 20ms`` is not; ``0`` stays allowed, it means
the same in every unit. Python code may pass numbers in the base unit. Every quantity has a
range of sensible values, said in the message when a value falls outside it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import BeforeValidator, Strict, ValidationInfo

from testbed import units
from testbed.errors import brief

MAX_TOKENS = 2**20  # one prompt or one output, tokens (1,048,576)


def _from_file(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get("units_required"))


def quantity(
    parse: Callable[[object], float],
    what: str,
    example: str,
    low: float,
    high: float,
    fmt: Callable[[float], str],
    *,
    unit_required: bool = True,
) -> Any:
    """A BeforeValidator: parse with ``parse``; nonzero values must lie in [low, high]."""

    def check(v: Any, info: ValidationInfo) -> Any:
        try:
            x = parse(v)
        except units.UnitError as exc:
            raise ValueError(str(exc)) from None
        bare = isinstance(v, int | float) and not isinstance(v, bool)
        if unit_required and bare and v != 0 and _from_file(info):
            raise ValueError(f"{brief(v)} has no unit; write e.g. {example!r}")
        if x != 0 and x < low:
            raise ValueError(
                f"{brief(v)} is below the smallest {what} accepted, {fmt(low)}; write e.g. {example!r}"
            )
        if x > high:
            raise ValueError(
                f"{brief(v)} is above the largest {what} accepted, {fmt(high)}; write e.g. {example!r}"
            )
        return x

    return BeforeValidator(check)


def _g(unit: str) -> Callable[[float], str]:
    return lambda x: f"{x:g}{unit}"


RateBps = Annotated[  # bits/s: 1 kbit/s .. 10 Tbit/s
    float, quantity(units.parse_rate_bps, "rate", "100Mbit", 1e3, 1e13, units.fmt_rate)
]
Seconds = Annotated[  # 1 ns .. 1 day
    float, quantity(units.parse_duration_s, "duration", "20ms", 1e-9, 86400.0, _g("s"))
]
LinkSeconds = Annotated[  # a link's delay or jitter: 1 us (netem's resolution) .. 60 s
    float, quantity(units.parse_duration_s, "link delay", "20ms", 1e-6, 60.0, units.fmt_seconds)
]
LongSeconds = Annotated[  # how long a run lasts: 1 ms .. 30 days
    float,
    quantity(units.parse_duration_s, "duration", "10min", 1e-3, 30 * 86400.0, _g("s")),
]
TraceSeconds = Annotated[  # a field named *_s: a bare number is seconds; up to ~3 years
    float,
    quantity(units.parse_duration_s, "time", "10min", 0.0, 1e8, _g("s"), unit_required=False),
]
Bytes = Annotated[  # 1 MiB .. 1 PiB
    int, quantity(units.parse_size_bytes, "size", "16GiB", 2**20, 2**50, units.fmt_bytes)
]
Flops = Annotated[  # FLOP/s: 1 MFLOPS .. 1 EFLOPS
    float, quantity(units.parse_flops, "compute rate", "19.5TFLOPS", 1e6, 1e18, _g("FLOPS"))
]
BytesPerS = Annotated[  # memory bandwidth, bytes/s: 1 MB/s .. 1 PB/s
    float, quantity(units.parse_bandwidth_Bps, "memory bandwidth", "936GB/s", 1e6, 1e15, _g("B/s"))
]
Percent = Annotated[float, quantity(units.parse_percent, "loss", "0.1%", 0.0, 100.0, _g("%"))]

# Plain numbers without units: strict (no "5" for 5, no "maybe" for a bool) and, for floats,
# finite. Tokens and counts carry their upper limits where they are used.
StrictInt = Annotated[int, Strict()]
StrictBool = Annotated[bool, Strict()]


def _finite(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        raise ValueError(f"{brief(v)} is not a finite number; write a number like 0.5")
    if isinstance(v, str | bool):
        raise ValueError(f"{brief(v)} is not a number; write a number like 0.5")
    return v


FiniteFloat = Annotated[float, BeforeValidator(_finite)]
Tokens = Annotated[int, Strict()]  # bounds (1 .. MAX_TOKENS) given per field
