"""Stage-to-stage forwarding: the route a step carries, and how a failure downstream travels back.

In the ``forward`` transport (:mod:`testbed.broker.chain`) the broker sends a step to the
first stage of its route only; the step's meta carries the rest of the route::

    "route": [{"node": "fog-1", "url": "http://127.0.0.1:8101", "hop": {...} | null,
               "seed": 7}, ...]
    "timeout_s": 29.5   # what is left of the broker's call timeout when the step is sent

Each stage computes, then sends its hidden states straight to the next hop (the stage client
and tensor port, raw bytes with a typed header) with the route's tail, and answers its caller
once the hop after it answered: the token comes back along the chain. ``hop`` is the app-level
part of the link into that node (a :class:`~testbed.net.appshaper.HopShape` as JSON; null when
the kernel shapes it all); the sending stage awaits an :class:`~testbed.net.appshaper.AppShaper`
with that shape before it sends, as the broker's hook does in the relay.

A stage's answer in a chain adds to the usual /forward meta:

- ``hops``: one entry per hop after this stage, as measured by each hop's sender (``node``,
  ``link_s``, ``wall_s``, ``service_s``, ``queue_s``, ``forward_s``, ``nbytes``,
  ``batch_size``); the broker turns them into the request's spans.
- ``forward_s``: seconds this stage spent passing the step on (hook wait + the downstream call).

A failure downstream is answered as the error it was, naming the node that failed
(``failed_node``) and how (``failure``: unreachable, timeout, rejected, protocol), so the
broker's rules (:func:`testbed.stage.errors.marks_node_down`) see the same error relay shows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from testbed.model.contract import ExecutorInputError
from testbed.net.appshaper import HopShape
from testbed.net.shaping import DirShape
from testbed.stage.errors import (
    ErrorCode,
    StageError,
    StageProtocolError,
    StageRejectedError,
    StageTimeoutError,
    StageUnreachableError,
    parse_code,
)

MAX_ROUTE = 16  # hops a step may carry (pipelines are a handful of stages)
CHAIN_MARGIN_S = 0.25  # each hop gives its caller this much of the timeout back to answer in
_HOP_KEYS = {"node", "url", "hop", "seed"}
_FAILURE_STATUS = {"unreachable": 502, "timeout": 504, "protocol": 502}


@dataclass(frozen=True, slots=True)
class RouteHop:
    """One stage of a step's remaining route."""

    node: str  # its node name (how errors and hop entries name it)
    url: str  # its stage server's base URL, reachable from the sending stage
    hop: HopShape | None = None  # app-level shaping of the link into it (None: kernel / none)
    seed: int = 0  # seeds the sending stage's shaper for this hop (jitter, loss draws)

    def to_meta(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "url": self.url,
            "hop": None if self.hop is None else asdict(self.hop),
            "seed": self.seed,
        }


def route_to_meta(route: Sequence[RouteHop]) -> list[dict[str, Any]]:
    return [h.to_meta() for h in route]


def _shape(value: object, where: str) -> HopShape | None:
    if value is None:
        return None
    try:
        assert isinstance(value, dict) and set(value) == {"forward", "reverse", "apply_rate"}
        fwd, rev, apply_rate = value["forward"], value["reverse"], value["apply_rate"]
        assert isinstance(fwd, dict) and isinstance(rev, dict) and isinstance(apply_rate, bool)
        return HopShape(DirShape(**fwd), DirShape(**rev), apply_rate)
    except (AssertionError, TypeError, ValueError) as exc:
        raise ExecutorInputError(
            f"{where}.hop must be a hop shape {{forward, reverse, apply_rate}} or null ({exc})"
        ) from None


def parse_route(value: object) -> tuple[RouteHop, ...]:
    """The ``route`` meta as hops; :class:`ExecutorInputError` (400 ``bad_input``) when bad."""
    if not isinstance(value, list) or len(value) > MAX_ROUTE:
        raise ExecutorInputError(f"meta.route must be a list of at most {MAX_ROUTE} hops")
    hops = []
    for i, item in enumerate(value):
        where = f"meta.route[{i}]"
        if not isinstance(item, dict) or set(item) - _HOP_KEYS or not {"node", "url"} <= set(item):
            raise ExecutorInputError(f"{where} must be an object with node, url, hop?, seed?")
        node, url, seed = item["node"], item["url"], item.get("seed", 0)
        if not isinstance(node, str) or not 0 < len(node) <= 128:
            raise ExecutorInputError(f"{where}.node must be a string of 1..128 chars")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ExecutorInputError(f"{where}.url must be an http(s) URL, got {url!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ExecutorInputError(f"{where}.seed must be an integer")
        hops.append(RouteHop(node, url, _shape(item.get("hop"), where), seed))
    return tuple(hops)


def parse_timeout(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ExecutorInputError(f"meta.timeout_s must be a number of seconds > 0, got {value!r}")
    return float(value)


# -- failures downstream ---------------------------------------------------------------------
class ChainError(StageRejectedError):
    """A stage further down the route failed this step: answered upstream as that failure."""

    def __init__(self, cause: StageError) -> None:
        self.cause = cause
        node = getattr(cause, "stage", None) or "?"
        reason = getattr(cause, "reason", None) or str(cause)
        if isinstance(cause, StageRejectedError):
            failure, status, code = "rejected", cause.status, cause.code
        else:
            failure = (
                "unreachable"
                if isinstance(cause, StageUnreachableError)
                else "timeout"
                if isinstance(cause, StageTimeoutError)
                else "protocol"
            )
            status, code = _FAILURE_STATUS[failure], None
        self.failed_node = node
        self.failure = failure
        super().__init__(node, status, code, reason)

    def body(self) -> dict[str, object]:
        return super().body() | {"failed_node": self.failed_node, "failure": self.failure}


def chain_error(answer: Mapping[str, Any]) -> StageError | None:
    """The downstream failure an error answer reports (None when it reports none): the same
    error type and code the failed node's own caller saw, named by that node."""
    node = answer.get("failed_node")
    if not isinstance(node, str):
        return None
    reason = str(answer.get("error", "error"))
    failure = answer.get("failure")
    if failure == "unreachable":
        return StageUnreachableError(node, reason)
    if failure == "timeout":
        return StageTimeoutError(f"stage {node}: {reason}", stage=node)
    if failure == "rejected":
        status = answer.get("status")
        code = parse_code(answer.get("code"))
        return StageRejectedError(
            node, int(status) if isinstance(status, int) else 500, code, reason
        )
    return StageProtocolError(node, reason)


__all__ = [
    "CHAIN_MARGIN_S",
    "ChainError",
    "ErrorCode",
    "RouteHop",
    "chain_error",
    "parse_route",
    "parse_timeout",
    "route_to_meta",
]
