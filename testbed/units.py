"""Parse quantities written as people write them, once, at the edge.

Rates -> bits per second ("100Mbit", "1Gbit", "10 Mbps" is rejected with a hint),
durations -> seconds ("20ms", "1.5s", "250us"), sizes -> bytes ("16GiB", "512MB"),
compute -> FLOP/s ("19.5TFLOPS"), bandwidth of memory -> bytes/s ("936GB/s").
Numbers (int/float) are taken as already in the base unit.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

_NUM = r"(?P<num>[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|\.[0-9]+)"

_RATE_UNITS = {
    "bit": 1,
    "kbit": 1e3,
    "mbit": 1e6,
    "gbit": 1e9,
    "tbit": 1e12,
    "bps": 1,
    "kbps": 1e3,
    "mbps": 1e6,
    "gbps": 1e9,
    "tbps": 1e12,
    "kibit": 2**10,
    "mibit": 2**20,
    "gibit": 2**30,
}
_TIME_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0}
_SIZE_UNITS = {
    "b": 1,
    "kb": 1e3,
    "mb": 1e6,
    "gb": 1e9,
    "tb": 1e12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_FLOPS_UNITS = {
    "flops": 1,
    "kflops": 1e3,
    "mflops": 1e6,
    "gflops": 1e9,
    "tflops": 1e12,
    "pflops": 1e15,
}
_BW_UNITS = {
    "b/s": 1,
    "kb/s": 1e3,
    "mb/s": 1e6,
    "gb/s": 1e9,
    "tb/s": 1e12,
    "kib/s": 2**10,
    "mib/s": 2**20,
    "gib/s": 2**30,
    "tib/s": 2**40,
}


class UnitError(ValueError):
    """Raised with a human hint; callers wrap it in ConfigError with file and field."""


def _split(text: str, kind: str, example: str) -> tuple[float, str]:
    m = re.fullmatch(_NUM + r"\s*(?P<unit>[A-Za-zµ/%]*)", text.strip())
    if not m:
        raise UnitError(f"{text!r} is not a {kind}; write e.g. {example!r}")
    return float(m.group("num")), m.group("unit")


def _finite_nonneg(value: float, text: object, kind: str, example: str) -> float:
    if not math.isfinite(value) or value < 0:
        raise UnitError(f"{text!r} is not a valid {kind} (must be >= 0); write e.g. {example!r}")
    return value


def _parse(value: object, kind: str, example: str, convert: Callable[[float, str], float]) -> float:
    """The part every quantity shares: numbers are already in the base unit, strings are
    ``<number><unit>`` handed to ``convert(number, unit)``; the result must be finite and >= 0."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise UnitError(f"{value!r} is not a {kind}; write e.g. {example!r}")
    if isinstance(value, int | float):
        return _finite_nonneg(float(value), value, kind, example)
    num, unit = _split(value, kind, example)
    return _finite_nonneg(convert(num, unit), value, kind, example)


def parse_rate_bps(value: object) -> float:
    """'100Mbit' -> 1e8 (bits per second). Bytes per second are spelled out as 'MB/s'."""
    ex = "100Mbit"

    def convert(num: float, unit: str) -> float:
        key = unit.lower()
        if key in _RATE_UNITS:
            return num * _RATE_UNITS[key]
        if key in _BW_UNITS:  # "12.5MB/s" -> bytes per second -> bits
            return num * _BW_UNITS[key] * 8
        raise UnitError(
            f"{value!r} has unknown rate unit {unit!r}; use bit, kbit, Mbit, Gbit (bits/s) or "
            f"MB/s (bytes/s), e.g. {ex!r}"
        )

    return _parse(value, "rate", ex, convert)


def parse_duration_s(value: object) -> float:
    """'20ms' -> 0.02 (seconds). A bare number is seconds."""
    ex = "20ms"

    def convert(num: float, unit: str) -> float:
        if unit == "":
            raise UnitError(f"{value!r} has no unit; write e.g. {ex!r} or '1.5s'")
        if unit not in _TIME_UNITS:
            raise UnitError(
                f"{value!r} has unknown time unit {unit!r}; use ns, us, ms, s, min or h, e.g. {ex!r}"
            )
        return num * _TIME_UNITS[unit]

    return _parse(value, "duration", ex, convert)


def parse_size_bytes(value: object) -> int:
    """'16GiB' -> 17179869184 (bytes). A bare number is bytes."""
    ex = "16GiB"

    def convert(num: float, unit: str) -> float:
        key = unit.lower() or "b"
        if key in ("g", "m", "k", "t"):
            raise UnitError(
                f"{value!r} is ambiguous; write {num:g}{unit.upper()}iB (binary) or "
                f"{num:g}{unit.upper()}B (decimal)"
            )
        if key not in _SIZE_UNITS:
            raise UnitError(
                f"{value!r} has unknown size unit {unit!r}; use B, KB, MB, GB, KiB, MiB, GiB, e.g. {ex!r}"
            )
        return num * _SIZE_UNITS[key]

    return int(_parse(value, "size", ex, convert))


def _table(
    table: dict[str, float], value: object, what: str, choices: str, ex: str
) -> Callable[[float, str], float]:
    def convert(num: float, unit: str) -> float:
        if unit.lower() not in table:
            raise UnitError(
                f"{value!r} has unknown {what} unit {unit!r}; use {choices}, e.g. {ex!r}"
            )
        return num * table[unit.lower()]

    return convert


def parse_flops(value: object) -> float:
    """'19.5TFLOPS' -> 1.95e13 (FLOP/s)."""
    ex = "19.5TFLOPS"
    return _parse(
        value, "compute rate", ex, _table(_FLOPS_UNITS, value, "compute", "GFLOPS or TFLOPS", ex)
    )


def parse_bandwidth_Bps(value: object) -> float:
    """Memory bandwidth: '936GB/s' -> 9.36e11 (bytes per second)."""
    ex = "936GB/s"
    return _parse(
        value, "memory bandwidth", ex, _table(_BW_UNITS, value, "bandwidth", "GB/s or GiB/s", ex)
    )


def parse_percent(value: object) -> float:
    """'0.1%' or 0.1 -> 0.1 (percent, 0..100)."""
    ex = "0.1%"
    if isinstance(value, bool):
        raise UnitError(f"{value!r} is not a percentage; write e.g. {ex!r}")
    if isinstance(value, int | float):
        v = float(value)
    elif isinstance(value, str):
        num, unit = _split(value, "percentage", ex)
        if unit not in ("%", ""):
            raise UnitError(f"{value!r} is not a percentage; write e.g. {ex!r}")
        v = num
    else:
        raise UnitError(f"{value!r} is not a percentage; write e.g. {ex!r}")
    if not math.isfinite(v) or not 0 <= v <= 100:
        raise UnitError(f"{value!r} is out of range; a loss is between 0% and 100%, e.g. {ex!r}")
    return v


def fmt_bytes(n: float) -> str:
    for unit, f in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= f:
            return f"{n / f:.2f}{unit}"
    return f"{n:.0f}B"


def fmt_rate(bps: float) -> str:
    for unit, f in (("Gbit", 1e9), ("Mbit", 1e6), ("kbit", 1e3)):
        if bps >= f:
            return f"{bps / f:g}{unit}"
    return f"{bps:g}bit"


def fmt_seconds(s: float) -> str:
    if s >= 1:
        return f"{s:.3f}s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f}ms"
    return f"{s * 1e6:.1f}us"
