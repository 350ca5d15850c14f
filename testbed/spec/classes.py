"""Request classes: named SLOs with a share of the traffic and a priority (scenario ``classes``).

    classes:
      - {name: chat,  share: 0.7, slo: {ttft: 1s, tpot: 100ms}, priority: 1}
      - {name: batch, share: 0.3, slo: {e2e: 60s}, priority: 0}

Each request gets a class: from a trace column when the workload has one, else drawn with the
scenario's seed in proportion to the shares (:func:`assign_classes`, deterministic). The class
travels with each step to the stage servers (the forward message's ``class`` and ``priority``),
whose batches take higher priority first and then least slack.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from testbed.spec.quantities import Seconds


class ClassSLO(BaseModel):
    """A class's latency targets (any subset)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    ttft_s: Seconds | None = Field(default=None, alias="ttft", gt=0)
    tpot_s: Seconds | None = Field(default=None, alias="tpot", gt=0)
    e2e_s: Seconds | None = Field(default=None, alias="e2e", gt=0)


class RequestClass(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,60}$")
    share: float = Field(default=1.0, gt=0, le=1)  # fraction of requests (shares sum to 1)
    slo: ClassSLO = ClassSLO()
    priority: int = 0  # higher is served first at every stage


def check_classes(classes: Sequence[RequestClass]) -> tuple[RequestClass, ...]:
    """Names unique, shares summing to 1 (when any class is declared)."""
    names = [c.name for c in classes]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"class names must be unique, {dup} repeat")
    total = sum(c.share for c in classes)
    if classes and abs(total - 1.0) > 1e-6:
        raise ValueError(f"class shares sum to {total:g}, not 1; adjust the shares")
    return tuple(classes)


def class_of(request_id: int, classes: Sequence[RequestClass], seed: int) -> RequestClass | None:
    """The class of request ``request_id``, drawn by share from a generator seeded by the seed
    and the id (the same in the broker and the simulators, whatever the order of requests)."""
    if not classes:
        return None
    rng = random.Random(f"classes:{seed}:{request_id}")
    return rng.choices(list(classes), [c.share for c in classes])[0]


def assign_classes(
    n: int,
    classes: Sequence[RequestClass],
    seed: int,
    column: Sequence[str | None] | None = None,
) -> list[str | None]:
    """The class names of requests 0..n-1: the trace's ``column`` value where it names a
    declared class, else :func:`class_of`. None for every request when no class is declared."""
    if not classes:
        return [None] * n
    names = [c.name for c in classes]
    out: list[str | None] = []
    for i in range(n):
        given = column[i] if column is not None and i < len(column) else None
        if given is not None and given not in names:
            raise ValueError(f"request {i}: class {given!r} is not one of {names}")
        drawn = class_of(i, classes, seed)
        out.append(given if given is not None else (drawn.name if drawn else None))
    return out
