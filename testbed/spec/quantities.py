"""Pydantic field types that parse human units once, at the edge (see testbed.units)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator

from testbed import units


def _wrap(fn: Any) -> Any:
    def parse(v: Any) -> Any:
        try:
            return fn(v)
        except units.UnitError as exc:
            raise ValueError(str(exc)) from None

    return parse


RateBps = Annotated[float, BeforeValidator(_wrap(units.parse_rate_bps))]  # bits/s
Seconds = Annotated[float, BeforeValidator(_wrap(units.parse_duration_s))]
Bytes = Annotated[int, BeforeValidator(_wrap(units.parse_size_bytes))]
Flops = Annotated[float, BeforeValidator(_wrap(units.parse_flops))]  # FLOP/s
BytesPerS = Annotated[float, BeforeValidator(_wrap(units.parse_bandwidth_Bps))]
Percent = Annotated[float, BeforeValidator(_wrap(units.parse_percent))]
