"""Stream readers for the public LLM traces, yielding :class:`TraceRow` one at a time.

Formats (see ``shared/traces/SOURCES.md``):

- Azure LLM inference 2023 / 2024 CSV: ``TIMESTAMP,ContextTokens,GeneratedTokens``; the
  timestamp is a wall-clock string with 7 fractional digits (2024: optionally with a UTC
  offset). Seconds are counted from the first row.
- BurstGPT CSV, parsed by header name: ``Timestamp`` (seconds, relative), ``Model``,
  ``Request tokens``, ``Response tokens``, ``Total tokens``, ``Log Type``. Rows with
  ``Response tokens`` 0 or empty are the dataset's failed requests: skipped and counted.
- Mooncake JSONL: ``timestamp`` (ms, relative), ``input_length``, ``output_length``,
  ``hash_ids`` (512-token prefix blocks).

Malformed rows raise :class:`WorkloadError` naming the file, the line, the column and the fix.
Readers only parse; windowing, scaling and clipping live in :mod:`testbed.workload.knobs`.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from testbed.errors import WorkloadError
from testbed.workload.request import TraceRow

AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
BURSTGPT_COLUMNS = ("Timestamp", "Request tokens", "Response tokens")
BURSTGPT_OPTIONAL = ("Model", "Log Type")
MOONCAKE_KEYS = ("timestamp", "input_length", "output_length")

_FIX_ROW = "fix or delete that row"
MAX_LINE_CHARS = 2**20  # one line of a trace file; real rows are under 100 characters (Mooncake:
# a few KiB of hash_ids)


def _lines(path: Path) -> Iterator[str]:
    """The file's lines as UTF-8 text, each at most :data:`MAX_LINE_CHARS` (never a whole huge
    line in memory); a byte that is not UTF-8 is a WorkloadError naming the line."""
    with path.open(encoding="utf-8", newline="") as f:
        line_no = 0
        while True:
            try:
                text = f.readline(MAX_LINE_CHARS + 1)
            except UnicodeDecodeError as exc:
                raise WorkloadError(
                    f"{path}:{line_no + 1}: not UTF-8 text (byte {exc.object[exc.start : exc.start + 1]!r} "
                    f"near this line); save the file as UTF-8"
                ) from None
            if not text:
                return
            line_no += 1
            if len(text) > MAX_LINE_CHARS:
                raise WorkloadError(
                    f"{path}:{line_no}: line longer than {MAX_LINE_CHARS:,} characters; this is "
                    "not a trace row, check that this is the right file"
                )
            yield text


def _csv_rows(reader: Any, path: Path) -> Iterator[list[str]]:
    """Rows of a csv.reader, its own errors (a field over csv's size limit, a NUL byte) named."""
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise WorkloadError(
                f"{path}:{reader.line_num}: not a CSV row ({exc}); {_FIX_ROW}"
            ) from None
        yield row


def _row_error(
    path: Path, line: int, column: str, value: object, what: str, fix: str = _FIX_ROW
) -> WorkloadError:
    return WorkloadError(f"{path}:{line}: column {column!r}: {value!r} {what}; {fix}")


def _tokens(path: Path, line: int, column: str, text: str) -> int:
    """A token count: a whole number >= 0 ('12' or '12.0')."""
    s = text.strip()
    try:
        return _nonneg_int(int(s), path, line, column, text)
    except ValueError:
        pass
    try:
        v = float(s)
    except ValueError:
        raise _row_error(
            path, line, column, text, "is not a token count (a whole number >= 0)"
        ) from None
    if not math.isfinite(v) or not v.is_integer():
        raise _row_error(path, line, column, text, "is not a token count (a whole number >= 0)")
    return _nonneg_int(int(v), path, line, column, text)


def _nonneg_int(v: int, path: Path, line: int, column: str, text: object) -> int:
    if v < 0:
        raise _row_error(path, line, column, text, "is negative; a token count is >= 0")
    return v


def _seconds(path: Path, line: int, column: str, text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise _row_error(path, line, column, text, "is not a number of seconds") from None
    if not math.isfinite(v):
        raise _row_error(path, line, column, text, "is not a finite number of seconds")
    return v


def _header_index(
    path: Path, header: Sequence[str] | None, required: Sequence[str], optional: Sequence[str] = ()
) -> dict[str, int]:
    """Map each wanted column name to its index (case- and space-insensitive match)."""
    expected = ",".join(required)
    if not header:
        raise WorkloadError(f"{path}: the file is empty; expected a CSV header with {expected}")
    norm = {h.strip().lstrip("\ufeff").strip('"').lower(): i for i, h in enumerate(header)}
    out: dict[str, int] = {}
    missing = []
    for name in required:
        i = norm.get(name.lower())
        if i is None:
            missing.append(name)
        else:
            out[name] = i
    if missing:
        got = ",".join(h.strip() for h in header)
        raise WorkloadError(
            f"{path}:1: missing column(s) {', '.join(repr(m) for m in missing)}; "
            f"the header is {got!r} but this format needs {expected} (in any order)"
        )
    for name in optional:
        i = norm.get(name.lower())
        if i is not None:
            out[name] = i
    return out


def _cell(path: Path, line: int, row: Sequence[str], idx: dict[str, int], name: str) -> str:
    i = idx[name]
    if i >= len(row):
        raise WorkloadError(
            f"{path}:{line}: column {name!r} is missing: the row has {len(row)} field(s), "
            f"the header names it as field {i + 1}; {_FIX_ROW}"
        )
    return row[i]


def read_azure(path: Path) -> Iterator[TraceRow]:
    """Azure LLM inference trace (2023 or 2024). ``t_s`` counts from the first row."""
    path = Path(path)
    reader = csv.reader(_lines(path))
    rows = _csv_rows(reader, path)
    idx = _header_index(path, next(rows, None), AZURE_COLUMNS)
    ts_col, in_col, out_col = AZURE_COLUMNS
    i_ts, i_in, i_out = idx[ts_col], idx[in_col], idx[out_col]
    width = max(i_ts, i_in, i_out) + 1
    fromiso = datetime.fromisoformat
    t0: datetime | None = None
    for row in rows:
        if len(row) < width:
            if not row:
                continue  # blank line
            for name in AZURE_COLUMNS:  # names the missing column
                _cell(path, reader.line_num, row, idx, name)
        ts_text = row[i_ts]
        try:
            # Python 3.11 reads any number of fractional digits (the 7th is dropped,
            # as cutting the string to 26 characters would) and an optional UTC offset.
            ts = fromiso(ts_text)
        except ValueError:
            try:
                ts = fromiso(ts_text.strip())
            except ValueError:
                raise _row_error(
                    path,
                    reader.line_num,
                    ts_col,
                    ts_text,
                    "is not a timestamp",
                    "write e.g. '2023-11-16 18:15:46.6805900' or fix/delete that row",
                ) from None
        if t0 is None:
            t0 = ts
        try:
            t_s = (ts - t0).total_seconds()
        except TypeError:
            raise _row_error(
                path,
                reader.line_num,
                ts_col,
                ts_text,
                "mixes a time zone with rows that have none",
                "write every timestamp the same way",
            ) from None
        try:
            p = int(row[i_in])
            o = int(row[i_out])
            if p < 0 or o < 0:
                raise ValueError
        except ValueError:  # slow path: '12.0' or a clear error
            p = _tokens(path, reader.line_num, in_col, row[i_in])
            o = _tokens(path, reader.line_num, out_col, row[i_out])
        yield TraceRow(reader.line_num, t_s, p, o)


def read_burstgpt(
    path: Path,
    *,
    models: Iterable[str] | None = None,
    log_types: Iterable[str] | None = None,
    counts: Counter[str] | None = None,
) -> Iterator[TraceRow]:
    """BurstGPT trace. Failed rows (``Response tokens`` 0 or empty) are skipped and counted
    under ``counts['failed_skipped']``; rows outside ``models`` / ``log_types`` (exact names,
    e.g. 'ChatGPT', 'GPT-4', 'Conversation log', 'API log') under ``counts['filtered_out']``."""
    path = Path(path)
    counts = counts if counts is not None else Counter()
    want_models = {m.strip().lower() for m in models} if models is not None else None
    want_types = {t.strip().lower() for t in log_types} if log_types is not None else None
    reader = csv.reader(_lines(path))
    rows = _csv_rows(reader, path)
    idx = _header_index(path, next(rows, None), BURSTGPT_COLUMNS, BURSTGPT_OPTIONAL)
    for name, want in (("Model", want_models), ("Log Type", want_types)):
        if want is not None and name not in idx:
            raise WorkloadError(
                f"{path}:1: a filter on {name!r} was given but the file has no {name!r} column; drop the filter"
            )
    ts_col, in_col, out_col = BURSTGPT_COLUMNS
    for row in rows:
        if not row:
            continue
        line = reader.line_num
        t_s = _seconds(path, line, ts_col, _cell(path, line, row, idx, ts_col))
        out_text = _cell(path, line, row, idx, out_col).strip()
        if out_text in ("", "0", "0.0") or out_text.lower() == "nan":
            counts["failed_skipped"] += 1
            continue
        if (
            want_models is not None
            and _cell(path, line, row, idx, "Model").strip().lower() not in want_models
        ):
            counts["filtered_out"] += 1
            continue
        if (
            want_types is not None
            and _cell(path, line, row, idx, "Log Type").strip().lower() not in want_types
        ):
            counts["filtered_out"] += 1
            continue
        yield TraceRow(
            source_row=line,
            t_s=t_s,
            prompt_tokens=_tokens(path, line, in_col, _cell(path, line, row, idx, in_col)),
            output_tokens=_tokens(path, line, out_col, out_text),
        )


def read_mooncake(path: Path) -> Iterator[TraceRow]:
    """Mooncake JSONL trace; ``t_s`` = ``timestamp`` / 1000."""
    path = Path(path)
    for line_no, text in enumerate(_lines(path), start=1):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise WorkloadError(
                f"{path}:{line_no}: not a JSON object ({e.msg} at column {e.colno}); each line must be one object like "
                '{"timestamp": 0, "input_length": 512, "output_length": 64, "hash_ids": [0]}'
            ) from None
        if not isinstance(obj, dict):
            raise WorkloadError(
                f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}; {_FIX_ROW}"
            )
        missing = [k for k in MOONCAKE_KEYS if k not in obj]
        if missing:
            raise WorkloadError(
                f"{path}:{line_no}: missing key(s) {', '.join(repr(k) for k in missing)}; "
                f"each line needs {', '.join(MOONCAKE_KEYS)} (hash_ids optional)"
            )
        ts = obj["timestamp"]
        if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts):
            raise _row_error(path, line_no, "timestamp", ts, "is not a number of milliseconds")
        lengths = []
        for key in ("input_length", "output_length"):
            v = obj[key]
            if (
                isinstance(v, bool)
                or not isinstance(v, int | float)
                or not math.isfinite(v)
                or not float(v).is_integer()
            ):
                raise _row_error(
                    path, line_no, key, v, "is not a token count (a whole number >= 0)"
                )
            lengths.append(_nonneg_int(int(v), path, line_no, key, v))
        hash_ids = obj.get("hash_ids", [])
        if not isinstance(hash_ids, list) or not all(
            isinstance(h, int) and not isinstance(h, bool) for h in hash_ids
        ):
            raise _row_error(path, line_no, "hash_ids", hash_ids, "is not a list of integers")
        yield TraceRow(
            source_row=line_no,
            t_s=ts / 1000.0,
            prompt_tokens=lengths[0],
            output_tokens=lengths[1],
            prefix_hash_ids=tuple(hash_ids),
        )


TRACE_FORMATS = ("azure", "burstgpt", "mooncake")


def read_trace(
    fmt: str, path: Path, *, counts: Counter[str] | None = None, **options: object
) -> Iterator[TraceRow]:
    """Dispatch on the format name (``azure``, ``burstgpt``, ``mooncake``)."""
    if fmt == "azure":
        return read_azure(path)
    if fmt == "burstgpt":
        return read_burstgpt(path, counts=counts, **options)  # type: ignore[arg-type]
    if fmt == "mooncake":
        return read_mooncake(path)
    raise WorkloadError(f"unknown trace format {fmt!r}; use one of {', '.join(TRACE_FORMATS)}")
