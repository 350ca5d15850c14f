"""`testbed calibrate RUN_DIR`: fit step and hop times from a run's records (least squares).

Per node, from its compute spans: ``service_s = fixed_s + per_token_s * new_tokens +
per_context_s * context_tokens`` (prefill: P new tokens at context 0; decode step k: 1 new token
at context P + k - 1). Per hop "sender->receiver", from its transfer spans: ``dur = fixed_s +
per_byte_s * nbytes``. The per-hop overhead the simulator adds to its link model is the median
duration of the hops into the first stage (client -> stage 0 crosses no shaped link, so what
it takes is the transport's own cost per call).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from testbed.errors import ConfigError
from testbed.metrics.records import RequestRecord
from testbed.sim.steps import CalibratedProfile, HopFit, StepFit

CLIENT = "client"


def _lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return coef


def fit_profile(
    records: Iterable[RequestRecord], source: str = "", blocks: Mapping[str, int] | None = None
) -> CalibratedProfile:
    """``blocks``: per node, how many blocks it served in the run (scales the fit to other
    plans, and lets the planner use it)."""
    rows: dict[str, list[tuple[float, float, float]]] = {}
    hops: dict[str, list[tuple[float, float]]] = {}
    first_hop: list[float] = []
    for r in records:
        if r.status != "completed":
            continue
        for sp in r.spans:
            if sp.kind == "compute":
                if sp.phase == "prefill" or sp.step == 0:
                    new, ctx = r.prompt_tokens, 0
                else:
                    new, ctx = 1, r.prompt_tokens + sp.step - 1
                rows.setdefault(sp.node, []).append((new, ctx, sp.dur_s))
            elif sp.kind == "transfer" and sp.peer is not None:
                hops.setdefault(f"{sp.node}->{sp.peer}", []).append((sp.nbytes or 0, sp.dur_s))
                if sp.node == CLIENT:
                    first_hop.append(sp.dur_s)
    if not rows:
        raise ConfigError(
            f"{source or 'the run'}: no compute spans in completed requests; calibrate needs a "
            "run's requests.jsonl with spans (from `testbed replay` or `testbed simulate`)"
        )
    nodes = {}
    for name, steps in sorted(rows.items()):
        a = np.asarray(steps, dtype=float)
        x = np.column_stack([np.ones(len(a)), a[:, 0], a[:, 1]])
        coef = _lstsq(x, a[:, 2])
        rmse = float(np.sqrt(np.mean((x @ coef - a[:, 2]) ** 2)))
        nodes[name] = StepFit(
            fixed_s=float(coef[0]),
            per_token_s=float(coef[1]),
            per_context_s=float(coef[2]),
            samples=len(a),
            rmse_s=rmse,
            blocks=(blocks or {}).get(name),
        )
    hop_fits = {}
    for key, data in sorted(hops.items()):
        a = np.asarray(data, dtype=float)
        coef = _lstsq(np.column_stack([np.ones(len(a)), a[:, 0]]), a[:, 1])
        hop_fits[key] = HopFit(fixed_s=float(coef[0]), per_byte_s=float(coef[1]), samples=len(a))
    overhead = statistics.median(first_hop) if first_hop else 0.0
    return CalibratedProfile(source=source, nodes=nodes, hops=hop_fits, hop_overhead_s=overhead)


def calibrate_run(run_dir: Path) -> CalibratedProfile:
    from testbed.metrics.report import load_records

    path = Path(run_dir) / "requests.jsonl"
    if not path.exists():
        raise ConfigError(
            f"{str(path)!r} not found; give a run folder written by `testbed replay` (or simulate)"
        )
    return fit_profile(
        load_records(path), source=str(Path(run_dir).resolve()), blocks=served_blocks(run_dir)
    )


def served_blocks(run_dir: Path) -> dict[str, int]:
    """Per node, the blocks it served, from the run's config.json (``stages_served``)."""
    try:
        cfg = json.loads((Path(run_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    out = {}
    for st in cfg.get("stages_served") or []:
        a, b = st.get("blocks", (0, 0))
        for name in st.get("nodes") or {}:
            out[name] = int(b) - int(a)
    return out


def write_profile(profile: CalibratedProfile, out: Path) -> Path:
    out = Path(out)
    out.write_text(profile.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return out


def describe(profile: CalibratedProfile) -> Sequence[str]:
    lines = [
        f"{n}: {f.fixed_s * 1e3:.3f} ms + {f.per_token_s * 1e6:.3f} us/token + "
        f"{f.per_context_s * 1e9:.3f} ns/context token ({f.samples} steps, rmse "
        f"{f.rmse_s * 1e3:.3f} ms)"
        for n, f in profile.nodes.items()
    ]
    lines.append(f"per-hop overhead: {profile.hop_overhead_s * 1e3:.3f} ms")
    return lines
