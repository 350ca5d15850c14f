"""Request classes and per-node batching in the simulators, as the broker and stage servers do.

- the engines build each request's :class:`RequestView` with the broker's own
  :func:`testbed.broker.slo.request_view`, its class drawn by :func:`request_class` (the
  broker's :func:`~testbed.spec.classes.class_of`, same seed), so the ``slo`` scheduler decides
  on the same inputs in both.
- :func:`pop_next`: the stage server's batch order when the scheduler asks for it
  (``Scheduler.orders_stage_queues``, as ``slo`` does): priority high first, then the steps
  whose deadline has not passed, earliest first, then the late ones
  (``testbed.stage.batcher.Pending.order``; the deadline of the step's token with the broker's
  slack: the first token by arrival + TTFT, the next by the last token + TPOT, else arrival +
  E2E), then arrival at the node. Other schedulers: first come, first served.
- :func:`scenario_config`: a :class:`SimConfig` with the scenario's classes and every node's
  ``max_batch`` (testbed.spec.batching: ``--max-batch`` > the node's > the scenario's > 1).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

from testbed.errors import ConfigError
from testbed.spec.batching import node_max_batch
from testbed.spec.classes import RequestClass, class_of

if TYPE_CHECKING:
    from testbed.sim.run import SimSetup
    from testbed.sim.state import SimConfig


def request_class(request_id: int, config: SimConfig) -> RequestClass | None:
    return class_of(request_id, config.classes, config.class_seed)


def step_deadline_s(cls: RequestClass | None, arrival_s: float, tokens: list[float]) -> float:
    """When the request's next token is due by its class's SLO (inf: no target); the stage
    server's deadline is the broker's send time + slack, which is this time."""
    if cls is None:
        return math.inf
    slo = cls.slo
    if not tokens and slo.ttft_s is not None:
        return arrival_s + slo.ttft_s
    if tokens and slo.tpot_s is not None:
        return tokens[-1] + slo.tpot_s
    if slo.e2e_s is not None:
        return arrival_s + slo.e2e_s
    return math.inf


def _key(r: Any, now_s: float) -> tuple[int, bool, float]:
    cls = r.cls
    if cls is None:
        return (0, False, math.inf)
    due = step_deadline_s(cls, r.req.arrival_s, r.tokens)
    return (-cls.priority, due < now_s, due)


def pop_next(fifo: deque[tuple[Any, int]], now_s: float) -> tuple[Any, int]:
    """Remove and return the waiting step the stage server batches first at ``now_s`` (see
    the module docstring; ties: arrival at the node). Every entry must have arrived (the
    engines process arrivals at their time when the order applies)."""
    best, best_key = 0, _key(fifo[0][0], now_s)
    for i in range(1, len(fifo)):
        k = _key(fifo[i][0], now_s)
        if k < best_key:
            best, best_key = i, k
    entry = fifo[best]
    del fifo[best]
    return entry


def batch_limits(config: SimConfig, names: Mapping[str, Any]) -> dict[str, int]:
    """Node -> its max_batch (its own in ``config.node_max_batch``, else ``config.max_batch``,
    else 1), each checked."""
    default = 1 if config.max_batch is None else config.max_batch
    out = {n: int(config.node_max_batch.get(n, default)) for n in names}
    bad = {n: v for n, v in out.items() if v < 1}
    if bad or default < 1:
        raise ValueError(f"max_batch must be >= 1, got {bad or default}")
    return out


def scenario_config(setup: SimSetup, config: SimConfig | None) -> SimConfig:
    """``config`` (default: SimConfig()) with the scenario's request classes (unless it names
    its own) and every node's max_batch: ``config.max_batch``, when set, overrides the
    topology's and the scenario's values (``simulate --max-batch``)."""
    from testbed.sim.state import SimConfig

    cfg = config or SimConfig()
    spec = setup.prep.loaded.spec
    if spec.classes and not cfg.classes:
        cfg = replace(cfg, classes=spec.classes, class_seed=spec.seed)
    resolved = node_max_batch(setup.prep.topology, spec.max_batch, cfg.max_batch)
    mine = {n: v for n, v in resolved.items() if v is not None and n in setup.layout.nodes}
    cfg = replace(cfg, node_max_batch={**mine, **cfg.node_max_batch})
    if spec.timeline and any(v > 1 for v in cfg.node_max_batch.values()):
        batched = sorted(n for n, v in cfg.node_max_batch.items() if v > 1)
        raise ConfigError(
            f"a timeline simulates without batching (its engine steps one request at a time), "
            f"but max_batch > 1 on {', '.join(batched)}; drop max_batch (scenario, topology or "
            "--max-batch) or the timeline",
            source=str(setup.prep.loaded.path),
            field="max_batch",
        )
    return cfg


def config_dict(config: SimConfig) -> dict[str, Any]:
    """The settings as recorded in a run's config.json (classes as the scenario writes them)."""
    return asdict(config) | {
        "classes": [c.model_dump(mode="json") for c in config.classes],
        "slowdown": dict(config.slowdown),
        "node_max_batch": dict(config.node_max_batch),
    }
