"""Chrome / Perfetto trace of a run (pure: builds the JSON object).

Process = node, thread = stage on that node (plus one thread per outgoing link for
transfers and one for queueing), complete ("X") events in microseconds. Open the file in
https://ui.perfetto.dev or chrome://tracing to see pipeline bubbles.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from testbed.metrics.records import RequestRecord, Span

_QUEUE_TID = 900
_TX_TID0 = 1000


def _name(s: Span) -> str:
    phase = s.phase or s.kind
    step = f"#{s.step}" if s.phase == "decode" else ""
    return f"{phase} r{s.request_id}{step}"


Marker = tuple[float, str]  # (run time in s, label): a timeline event, a node change


def chrome_trace(
    records: Iterable[RequestRecord],
    *,
    run_name: str = "run",
    markers: Sequence[Marker] = (),
) -> dict[str, Any]:
    """The trace; ``markers`` become global instant events ("i", scope "g"): a line across
    every track at that time."""
    spans = [s for r in records for s in r.spans]
    nodes = sorted({s.node for s in spans} | {s.peer for s in spans if s.peer})
    pid = {n: i + 1 for i, n in enumerate(nodes)}
    threads: dict[tuple[int, int], str] = {}
    tx_tid: dict[tuple[str, str], int] = {}
    events: list[dict[str, Any]] = []
    for s in sorted(spans, key=lambda s: (s.start_s, s.node)):
        p = pid[s.node]
        if s.kind == "compute":
            tid = s.stage + 1
            threads[(p, tid)] = f"stage {s.stage}"
        elif s.kind == "transfer":
            key = (s.node, s.peer or "?")
            tid = tx_tid.setdefault(key, _TX_TID0 + len(tx_tid))
            threads[(p, tid)] = f"send -> {key[1]}"
        else:
            tid = _QUEUE_TID
            threads[(p, tid)] = "queue"
        args: dict[str, Any] = {"request_id": s.request_id, "stage": s.stage, "step": s.step}
        if s.peer is not None:
            args["to"] = s.peer
        if s.nbytes is not None:
            args["bytes"] = s.nbytes
        events.append(
            {
                "name": _name(s),
                "cat": s.kind,
                "ph": "X",
                "ts": s.start_s * 1e6,
                "dur": max(s.dur_s, 0.0) * 1e6,
                "pid": p,
                "tid": tid,
                "args": args,
            }
        )
    steps = {(s.node, s.start_s, s.batch) for s in spans if s.kind == "compute" and s.batch}
    for node, start_s, batch in sorted(steps, key=lambda k: (k[1], k[0])):
        # a counter track per node: the batch size of each of its steps
        events.append(
            {"name": "batch size", "ph": "C", "ts": start_s * 1e6, "pid": pid[node],
             "args": {"batch": batch}}
        )  # fmt: skip
    for at_s, label in markers:
        events.append(
            {"name": label, "cat": "timeline", "ph": "i", "s": "g", "ts": at_s * 1e6,
             "pid": 0, "tid": 0}
        )  # fmt: skip
    meta: list[dict[str, Any]] = []
    for n, p in pid.items():
        meta.append({"name": "process_name", "ph": "M", "pid": p, "tid": 0, "args": {"name": n}})
        meta.append(
            {"name": "process_sort_index", "ph": "M", "pid": p, "tid": 0, "args": {"sort_index": p}}
        )
    for (p, tid), tname in sorted(threads.items()):
        meta.append(
            {"name": "thread_name", "ph": "M", "pid": p, "tid": tid, "args": {"name": tname}}
        )
    return {"traceEvents": meta + events, "displayTimeUnit": "ms", "otherData": {"run": run_name}}
