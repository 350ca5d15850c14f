"""The /forward payload: the step a wire message asks for, and the answer's parts.

Shared by the HTTP route and the tensor port (:mod:`testbed.stage.tensor_port`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from testbed.model.contract import ExecutorInputError
from testbed.stage.route import RouteHop, parse_route, parse_timeout
from testbed.stage.wire import WireMessage

MAX_REQUEST_ID = 128
MAX_ROUTE = 16  # as testbed.stage.route's
_META_KEYS = {
    "request_id",
    "kind",
    "start_pos",
    "want_logits",
    "op",
    "class",
    "priority",
    "slack_s",
    "route",
    "timeout_s",
    "release",
    "blocks",
    "route_blocks",
}


@dataclass(frozen=True, slots=True)
class StepOptions:
    """What a broker sends with a step besides its data: the request's class, priority and
    slack, for the stage's batch order (:mod:`testbed.stage.batcher`).

    The one place a per-step option is declared: a new one is a field here, its meta key in
    :meth:`to_meta` and :func:`parse_options`; the client and the broker's transports pass
    the object through unchanged."""

    slo_class: str | None = None  # the request's class (scenario ``classes``), for metrics
    priority: int = 0  # higher is batched first
    slack_s: float | None = None  # seconds this step may wait and still meet its SLO
    release: bool = False  # the request's last step: free its cache once computed
    # the block range the step is for (a migration: the stage holds two, generations.py)
    blocks: tuple[int, int] | None = None
    # the forward transport: the block range of each later hop of the route, in order
    route_blocks: tuple[tuple[int, int], ...] = ()

    def to_meta(self) -> dict[str, Any]:
        """The options as /forward meta keys (defaults left out)."""
        meta: dict[str, Any] = {}
        if self.slo_class is not None:
            meta["class"] = self.slo_class
        if self.priority:
            meta["priority"] = self.priority
        if self.slack_s is not None:
            meta["slack_s"] = self.slack_s
        if self.release:
            meta["release"] = True
        if self.blocks is not None:
            meta["blocks"] = list(self.blocks)
        if self.route_blocks:
            meta["route_blocks"] = [list(b) for b in self.route_blocks]
        return meta

    def passed_on(self) -> StepOptions:
        """The options for the route's next hop: its block range comes first."""
        if not self.route_blocks:
            return self if self.blocks is None else replace(self, blocks=None)
        return replace(self, blocks=self.route_blocks[0], route_blocks=self.route_blocks[1:])


NO_OPTIONS = StepOptions()  # a step sent without class, priority or slack


@dataclass(frozen=True)
class ForwardRequest:
    """One decoded /forward step."""

    request_id: str
    kind: str  # "prefill" | "decode"
    start_pos: int
    want_logits: bool
    input: torch.Tensor  # token ids int64[1, q] (first stage) or hidden states float[1, q, H]
    options: StepOptions = NO_OPTIONS  # class, priority and slack (the batch order)
    route: tuple[RouteHop, ...] = ()  # the stages after this one (the forward transport)
    timeout_s: float | None = None  # what is left of the caller's timeout for the chain


@dataclass(frozen=True)
class ForwardReply:
    """A step's answer: its meta and the wire buffers to send (meta + tensors, encoded)."""

    meta: dict[str, Any]
    parts: list[memoryview]


def parse_forward(msg: WireMessage) -> ForwardRequest:
    """The step a message asks for; :class:`ExecutorInputError` (400) when the meta is bad."""
    meta = msg.meta
    unknown = set(meta) - _META_KEYS
    if unknown:
        raise ExecutorInputError(f"unknown meta keys {sorted(unknown)}")
    rid = meta.get("request_id")
    if not isinstance(rid, str) or not 0 < len(rid) <= MAX_REQUEST_ID:
        raise ExecutorInputError(f"meta.request_id must be a string of 1..{MAX_REQUEST_ID} chars")
    kind = meta.get("kind")
    if kind not in ("prefill", "decode"):
        raise ExecutorInputError(f"meta.kind must be 'prefill' or 'decode', got {kind!r}")
    start_pos = meta.get("start_pos")
    if not isinstance(start_pos, int) or isinstance(start_pos, bool) or start_pos < 0:
        raise ExecutorInputError(f"meta.start_pos must be an integer >= 0, got {start_pos!r}")
    want_logits = meta.get("want_logits", False)
    if not isinstance(want_logits, bool):
        raise ExecutorInputError("meta.want_logits must be true or false")
    if set(msg.tensors) != {"input"}:
        raise ExecutorInputError(
            f"expected exactly one tensor named 'input', got {sorted(msg.tensors)}"
        )
    # finiteness is checked by the executor's step validator (check_step), on the values it
    # computes with: an emulated device's wire tensor is packed bytes, not values
    return ForwardRequest(
        rid,
        kind,
        start_pos,
        want_logits,
        msg.tensors["input"],
        parse_options(meta),
        parse_route(meta.get("route", [])),
        parse_timeout(meta.get("timeout_s")),
    )


def parse_options(meta: dict[str, Any]) -> StepOptions:
    """The optional request class, priority and slack a broker sends with a step."""
    cls = meta.get("class")
    if cls is not None and (not isinstance(cls, str) or not 0 < len(cls) <= MAX_REQUEST_ID):
        raise ExecutorInputError(f"meta.class must be a string of 1..{MAX_REQUEST_ID} chars")
    priority = meta.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise ExecutorInputError(f"meta.priority must be an integer, got {priority!r}")
    slack = meta.get("slack_s")
    if slack is not None and (
        isinstance(slack, bool) or not isinstance(slack, (int, float)) or slack != slack
    ):
        raise ExecutorInputError(f"meta.slack_s must be a number of seconds, got {slack!r}")
    release = meta.get("release", False)
    if not isinstance(release, bool):
        raise ExecutorInputError(f"meta.release must be true or false, got {release!r}")
    blocks = meta.get("blocks")
    if blocks is not None and not _is_range(blocks):
        raise ExecutorInputError(f"meta.blocks must be [start, end] integers, got {blocks!r}")
    later = meta.get("route_blocks", [])
    if not isinstance(later, list) or len(later) > MAX_ROUTE or not all(map(_is_range, later)):
        raise ExecutorInputError(
            f"meta.route_blocks must be a list of [start, end] integers, got {later!r}"[:200]
        )
    return StepOptions(
        cls, priority, None if slack is None else float(slack), release,
        None if blocks is None else (blocks[0], blocks[1]), tuple((a, b) for a, b in later),
    )  # fmt: skip


def _is_range(value: object) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) for b in value)
    )
