"""`testbed report RUN_DIR`: rebuild a run's summary, tables and plots from its streamed
records (``requests.jsonl``) and ``run.json``, e.g. after the replay was killed."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.errors import ConfigError
from testbed.experiment.replay import RECORDS_FILE, RUN_FILE
from testbed.metrics.records import RequestRecord
from testbed.metrics.summary import SLO, Summary, summarize


@dataclass(frozen=True)
class Rebuilt:
    summary: Summary
    records: int
    skipped_lines: int  # a line cut short by the kill, or otherwise unreadable
    files: dict[str, Path]
    planned: int | None = None  # requests the replay set out to send (run.json), if known

    @property
    def not_recorded(self) -> int:
        """Requests planned but without a record: the replay stopped before they ended."""
        return max(0, self.planned - self.records) if self.planned is not None else 0


def read_records(path: Path) -> tuple[list[RequestRecord], int]:
    """The complete records of a streamed file; lines that do not parse are counted."""
    records, bad = [], 0
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                records.append(RequestRecord.from_dict(json.loads(line)))
            except (ValueError, KeyError, TypeError):
                bad += 1
    return records, bad


def rebuild(run_dir: Path, *, plots: bool = True) -> Rebuilt:
    from testbed.metrics.report import write_run_report

    rec_path = run_dir / RECORDS_FILE
    if not rec_path.is_file():
        raise ConfigError(
            f"{run_dir} has no {RECORDS_FILE}; give a folder that `testbed replay` wrote",
            field="RUN_DIR",
        )
    info: dict[str, Any] = {}
    run_path = run_dir / RUN_FILE
    if run_path.is_file():
        try:
            info = json.loads(run_path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ConfigError(f"{run_path} is not JSON ({exc})", field="RUN_DIR") from None
    records, bad = read_records(rec_path)
    slo = SLO(**info["slo"]) if isinstance(info.get("slo"), dict) else None
    summary = summarize(records, slo=slo, nodes=info.get("nodes") or ())
    planned = info.get("requests_planned")
    res = Rebuilt(summary, len(records), bad, {}, planned if isinstance(planned, int) else None)
    rebuilt_from: dict[str, Any] = {
        "file": RECORDS_FILE,
        "records": res.records,
        "skipped_lines": bad,
    }
    if res.planned is not None:
        rebuilt_from |= {"requests_planned": res.planned, "not_recorded": res.not_recorded}
    extra = {"run": info, "rebuilt_from": rebuilt_from}
    files = write_run_report(
        run_dir, records, summary, extra=extra, run_name=info.get("label", "run"), plots=plots
    )
    return dataclasses.replace(res, files=files)
