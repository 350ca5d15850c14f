"""`testbed calibrate RUN_DIR`: fit step and hop times from a run's records (least squares).

Per node, from its compute spans: ``service_s = fixed_s + per_token_s * new_tokens +
per_context_s * context_tokens`` (prefill: P new tokens at context 0; decode step k: 1 new token
at context P + k - 1), one row per forward: a batched forward's steps are summed into one row
(:func:`batch_rows`), so a fixed part is paid once per forward, as the simulator then charges it. Per hop "sender->receiver", from its transfer spans: ``dur = fixed_s +
per_byte_s * nbytes``. The per-call overhead the simulator adds to its link model is the mean
excess of every stage call's transfer over what the link model charges for it (delays, bytes
at the bandwidth, the token's way back), when the run folder names its topology and stages;
else the median duration of the calls into the first stage (client -> stage 0 crosses no
shaped link, so what it takes is the transport's own cost per call).
"""

from __future__ import annotations

import itertools
import json
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from testbed.errors import ConfigError
from testbed.metrics.records import RequestRecord
from testbed.sim.links import expected_loss_s
from testbed.sim.steps import CalibratedProfile, HopFit, StepFit
from testbed.spec.topology import LinkSpec

CLIENT = "client"


def _lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return coef


def fit_profile(
    records: Iterable[RequestRecord],
    source: str = "",
    blocks: Mapping[str, int] | None = None,
    hop_links: Sequence[Sequence[LinkSpec]] | None = None,
) -> CalibratedProfile:
    """``blocks``: per node, how many blocks it served in the run (scales the fit to other
    plans, and lets the planner use it). ``hop_links``: per hop s -> s+1 of the run's plan, the
    links it crossed; with them the per-call overhead is the mean excess over the link model
    (:func:`call_excess_s`), else the median client -> first stage transfer."""
    records = list(records)
    rows = batch_rows(records)
    hops: dict[str, list[tuple[float, float]]] = {}
    first_hop: list[float] = []
    for r in records:
        if r.status != "completed":
            continue
        for sp in r.spans:
            if sp.kind == "transfer" and sp.peer is not None:
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
    if hop_links is not None:
        excess = call_excess_s(records, hop_links)
        overhead = overhead if excess is None else excess
    return CalibratedProfile(source=source, nodes=nodes, hops=hop_fits, hop_overhead_s=overhead)


def call_excess_s(
    records: Iterable[RequestRecord], hop_links: Sequence[Sequence[LinkSpec]]
) -> float | None:
    """The mean per stage call of what its transfer took beyond what the simulator's link model
    charges for it (None: no call). A call into stage s >= 1 crosses ``hop_links[s - 1]`` (one
    way delay + bytes at the bandwidth); the token's way back (every link's delay once) is
    charged to the call into the last stage, whose reply carries it. What is left is the
    transport's own cost per call (serialisation, HTTP, the stage server's request handling),
    which the simulator adds once per call."""
    back = sum(ln.delay_s for hop in hop_links for ln in hop)
    total, calls = 0.0, 0
    for r in records:
        if r.status != "completed":
            continue
        last = len(r.route) - 1
        for sp in r.spans:
            if sp.kind != "transfer" or sp.peer is None:
                continue
            model = back if sp.stage == last else 0.0
            if 1 <= sp.stage <= len(hop_links):
                model += sum(
                    ln.delay_s
                    + (sp.nbytes or 0) * 8.0 / ln.bandwidth_bps
                    + expected_loss_s(sp.nbytes or 0, ln.loss_pct / 100.0, ln.delay_s)
                    for ln in hop_links[sp.stage - 1]
                )
            total += sp.dur_s - model
            calls += 1
    return max(0.0, total / calls) if calls else None


def contended_call_overhead_s(
    records: Iterable[RequestRecord], hop_links: Sequence[Sequence[LinkSpec]]
) -> float | None:
    """The transport's own cost per stage call: the mean excess of every call's transfer over
    what the simulator's links would charge that very transfer (None: no call). Unlike
    :func:`call_excess_s` the links' queueing is charged too: the run's transfers are replayed,
    in the order they were sent, through the simulator's pipes (one FIFO per link and
    direction: bytes at the bandwidth behind the transfers before it, then the one-way delay),
    so a decode step's activations that waited behind a prefill's on a link count as the
    link's time, which the simulator adds itself, not as overhead it would add once more.
    The token's way back (every link's delay once) is charged to the call into the last
    stage, as in :func:`call_excess_s`; summed over a token's calls the excess does not depend
    on which call a shaper charges a delay to."""
    back = sum(ln.delay_s for hop in hop_links for ln in hop)
    calls: list[tuple[float, int, int, float, float]] = []  # start, stage, bytes, dur, back
    for r in records:
        if r.status != "completed":
            continue
        last = len(r.route) - 1
        for sp in r.spans:
            if sp.kind == "transfer" and sp.peer is not None:
                b = back if sp.stage == last else 0.0
                calls.append((sp.start_s, sp.stage, sp.nbytes or 0, sp.dur_s, b))
    if not calls:
        return None
    free: dict[tuple[int, int], float] = {}  # (hop, link) -> when its pipe is free again
    total = 0.0
    for start, stage, nbytes, dur, b in sorted(calls):
        t = start
        if 1 <= stage <= len(hop_links):
            for k, ln in enumerate(hop_links[stage - 1]):
                key = (stage - 1, k)
                t = max(t, free.get(key, 0.0)) + nbytes * 8.0 / ln.bandwidth_bps
                t += expected_loss_s(nbytes, ln.loss_pct / 100.0, ln.delay_s)
                free[key] = t
                t += ln.delay_s
        total += dur - (t - start) - b
    return max(0.0, total / len(calls))


def batch_rows(records: Iterable[RequestRecord]) -> dict[str, list[tuple[float, float, float]]]:
    """Per node, one (new tokens, context tokens, seconds) row per forward. A batched forward
    (continuous batching: spans with ``batch`` > 1) is one row with its steps' new and context
    tokens summed: every step of a batch reports the batch's time, so fitting each step as if it
    ran alone would charge a batch of 15 fifteen times. Steps of one batch share the node, the
    batch size and the duration, and start within half a duration of each other (the broker
    places a span at reply time - service time, and replies of one batch arrive together)."""
    rows: dict[str, list[tuple[float, float, float]]] = {}
    groups: dict[tuple[str, int, float], list[tuple[float, float, float, float]]] = {}
    for r in records:
        for sp in r.spans:
            if sp.kind != "compute":
                continue
            if sp.phase == "prefill" or sp.step == 0:
                new, ctx = r.prompt_tokens, 0
            else:
                new, ctx = 1, r.prompt_tokens + sp.step - 1
            if (sp.batch or 1) <= 1:
                if r.status == "completed":
                    rows.setdefault(sp.node, []).append((new, ctx, sp.dur_s))
                continue
            key = (sp.node, sp.batch or 1, round(sp.dur_s, 7))
            groups.setdefault(key, []).append((sp.start_s, new, ctx, sp.dur_s))
    for (node, _, _), steps in sorted(groups.items()):
        steps.sort()
        first, new_sum, ctx_sum, dur = steps[0][0], 0.0, 0.0, steps[0][3]
        for start, step_new, step_ctx, d in steps:
            if start - first > dur / 2:  # the next forward of the same size and duration
                rows.setdefault(node, []).append((new_sum, ctx_sum, dur))
                first, new_sum, ctx_sum = start, 0.0, 0.0
            new_sum, ctx_sum, dur = new_sum + step_new, ctx_sum + step_ctx, d
        rows.setdefault(node, []).append((new_sum, ctx_sum, dur))
    return rows


def calibrate_run(run_dir: Path) -> CalibratedProfile:
    from testbed.metrics.report import load_records

    path = Path(run_dir) / "requests.jsonl"
    if not path.exists():
        raise ConfigError(
            f"{str(path)!r} not found; give a run folder written by `testbed replay` (or simulate)"
        )
    return fit_profile(
        load_records(path),
        source=str(Path(run_dir).resolve()),
        blocks=served_blocks(run_dir),
        hop_links=served_hop_links(run_dir),
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


def served_hop_links(run_dir: Path) -> list[tuple[LinkSpec, ...]] | None:
    """Per hop s -> s+1 of the run, the links it crossed, from config.json (the topology as
    run and the tiers of ``stages_served``; a dilated run's links back on the emulated clock,
    as its records are); None when the folder does not say."""
    from testbed.emulation.dilation import run_dilation, undilate_topology
    from testbed.spec.topology import Topology

    try:
        cfg = json.loads((Path(run_dir) / "config.json").read_text(encoding="utf-8"))
        topo = Topology.model_validate({k: v for k, v in cfg["topology"].items() if k != "path"})
        topo = undilate_topology(topo, run_dilation(cfg))
        tiers = [t.name for t in topo.tiers]
        idx = [tiers.index(st["tier"]) for st in cfg["stages_served"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    hops = []
    for a, b in itertools.pairwise(idx):
        links = (topo.uplink(j) for j in range(a, b))
        hops.append(tuple(ln for ln in links if ln is not None))
    return hops


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
