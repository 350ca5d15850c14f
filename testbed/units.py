"""Parse quantities written as people write them, once, at the edge.

Rates -> bits per second ("100Mbit", "1Gbit", "10Mbps"), durations -> seconds ("20ms",
"1.5s", "250us"), sizes -> bytes ("16GiB", "512MB"), compute -> FLOP/s ("19.5TFLOPS"),
bandwidth of memory -> bytes/s ("936GB/s").

Bits and bytes: a lower-case ``b`` is a bit, an upper-case ``B`` a byte, as in SI and in tc:
``10Mbps`` / ``10Mb/s`` / ``10Mbit`` are 10 megabits per second, ``10MBps`` / ``10MB/s`` are
10 megabytes per second (80 Mbit/s). Prefixes k/K, M, G, T are decimal, Ki, Mi, Gi, Ti binary.
Sizes are bytes: ``512Mb`` (megabits) is refused with a hint.

Numbers (int/float) are taken as already in the base unit here; files must spell the unit
(see :mod:`testbed.spec.quantities`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

from testbed.errors import brief

_NUM = r"(?P<num>[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|\.[0-9]+)"

_PREFIX = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2.0**10, "mi": 2.0**20}
_PREFIX.update({"gi": 2.0**30, "ti": 2.0**40})
# <prefix><bit word>: bits/s; the b/B letter is matched case-sensitively by _rate_factor
_RATE_RE = re.compile(r"(?P<prefix>[kKmMgGtT]i?)?(?P<word>bit|bits|bps|b/s|Bps|B/s|byte/s|bytes/s)")
_TIME_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0}
_SIZE_UNITS = {
    "B": 1,
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


class UnitError(ValueError):
    """Raised with a human hint; callers wrap it in ConfigError with file and field."""


def _split(text: str, kind: str, example: str) -> tuple[float, str]:
    m = re.fullmatch(_NUM + r"\s*(?P<unit>[A-Za-zµ/%]*)", text.strip()) if len(text) < 100 else None
    if not m:
        raise UnitError(f"{brief(text)} is not a {kind}; write e.g. {example!r}")
    return float(m.group("num")), m.group("unit")


def _finite_nonneg(value: float, text: object, kind: str, example: str) -> float:
    if not math.isfinite(value) or value < 0:
        raise UnitError(
            f"{brief(text)} is not a valid {kind} (must be finite and >= 0); write e.g. {example!r}"
        )
    return value


def _parse(value: object, kind: str, example: str, convert: Callable[[float, str], float]) -> float:
    """The part every quantity shares: numbers are already in the base unit, strings are
    ``<number><unit>`` handed to ``convert(number, unit)``; the result must be finite and >= 0."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise UnitError(f"{brief(value)} is not a {kind}; write e.g. {example!r}")
    if isinstance(value, int | float):
        return _finite_nonneg(float(value), value, kind, example)
    num, unit = _split(value, kind, example)
    return _finite_nonneg(convert(num, unit), value, kind, example)


def parse_rate_bps(value: object) -> float:
    """'100Mbit' -> 1e8 (bits per second). Bytes per second are spelled out as 'MB/s'."""
    ex = "100Mbit"

    def convert(num: float, unit: str) -> float:
        factor = _rate_factor(unit)
        if factor is None:
            raise UnitError(
                f"{brief(value)} has unknown rate unit {unit!r}; use bit, kbit, Mbit, Gbit or "
                f"Mbps (bits/s), or MB/s, MBps (bytes/s), e.g. {ex!r}"
            )
        return num * factor

    return _parse(value, "rate", ex, convert)


def _rate_factor(unit: str) -> float | None:
    """Bits per second in one ``unit``: 'Mbit', 'Mbps', 'Mb/s' -> 1e6; 'MBps', 'MB/s' -> 8e6."""
    m = _RATE_RE.fullmatch(unit)
    if m is None:
        return None
    word = m.group("word")
    bits = 8.0 if word[0] == "B" or word.startswith("byte") else 1.0
    return _PREFIX[(m.group("prefix") or "").lower()] * bits


def parse_duration_s(value: object) -> float:
    """'20ms' -> 0.02 (seconds). A bare number is seconds."""
    ex = "20ms"

    def convert(num: float, unit: str) -> float:
        if unit == "":
            raise UnitError(f"{brief(value)} has no unit; write e.g. {ex!r} or '1.5s'")
        if unit not in _TIME_UNITS:
            raise UnitError(
                f"{brief(value)} has unknown time unit {unit!r}; use ns, us, ms, s, min or h, "
                f"e.g. {ex!r}"
            )
        return num * _TIME_UNITS[unit]

    return _parse(value, "duration", ex, convert)


def parse_size_bytes(value: object) -> int:
    """'16GiB' -> 17179869184 (bytes). A bare number is bytes."""
    ex = "16GiB"

    def convert(num: float, unit: str) -> float:
        key = unit or "B"
        if key.lower() in ("g", "m", "k", "t"):
            raise UnitError(
                f"{brief(value)} is ambiguous; write {num:g}{unit.upper()}iB (binary) or "
                f"{num:g}{unit.upper()}B (decimal)"
            )
        if key.endswith("b") or key.lower().endswith("bit"):  # 512Mb: megabits
            raise UnitError(
                f"{brief(value)} is in bits (lower-case b); a size is in bytes: write e.g. "
                f"{num:g}{unit[:-1].upper() if key.endswith('b') else unit[:1].upper()}B"
            )
        key = key if key == "B" else key.lower()
        if key not in _SIZE_UNITS:
            raise UnitError(
                f"{brief(value)} has unknown size unit {unit!r}; use B, KB, MB, GB, KiB, MiB, GiB, "
                f"e.g. {ex!r}"
            )
        return num * _SIZE_UNITS[key]

    return int(_parse(value, "size", ex, convert))


def _table(
    table: dict[str, float], value: object, what: str, choices: str, ex: str
) -> Callable[[float, str], float]:
    def convert(num: float, unit: str) -> float:
        if unit.lower() not in table:
            raise UnitError(
                f"{brief(value)} has unknown {what} unit {unit!r}; use {choices}, e.g. {ex!r}"
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
    """Memory bandwidth: '936GB/s' -> 9.36e11 (bytes per second); bits are divided by 8."""
    ex = "936GB/s"

    def convert(num: float, unit: str) -> float:
        factor = _rate_factor(unit)
        if factor is None:
            raise UnitError(
                f"{brief(value)} has unknown bandwidth unit {unit!r}; use GB/s or GiB/s, e.g. {ex!r}"
            )
        return num * factor / 8

    return _parse(value, "memory bandwidth", ex, convert)


def parse_percent(value: object) -> float:
    """'0.1%' or 0.1 -> 0.1 (percent, 0..100)."""
    ex = "0.1%"
    if isinstance(value, bool):
        raise UnitError(f"{brief(value)} is not a percentage; write e.g. {ex!r}")
    if isinstance(value, int | float):
        v = float(value)
    elif isinstance(value, str):
        num, unit = _split(value, "percentage", ex)
        if unit not in ("%", ""):
            raise UnitError(f"{brief(value)} is not a percentage; write e.g. {ex!r}")
        v = num
    else:
        raise UnitError(f"{brief(value)} is not a percentage; write e.g. {ex!r}")
    if not math.isfinite(v) or not 0 <= v <= 100:
        raise UnitError(
            f"{brief(value)} is out of range; a loss is between 0% and 100%, e.g. {ex!r}"
        )
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
