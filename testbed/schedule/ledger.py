"""Exact bookkeeping of routed requests, per node (pure, synchronous), shared by the broker and
the simulators so that what a scheduler sees is computed one way only.

From the moment a request is routed until it leaves (completed, failed, or re-routed after a
fault), every node of its route counts it in ``queue_len``, holds its predicted remaining work
in ``queued_work_s`` and its KV-cache bytes against the node's memory. Completed steps reduce
the remaining work; leaving removes whatever is left, so the counters return exactly to zero.
:meth:`Ledger.snapshot` turns this into the scheduler's :class:`ClusterSnapshot`;
:meth:`Ledger.check_route` is the one check of a scheduler's answer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from testbed.errors import TestbedError
from testbed.schedule.base import ClusterSnapshot, NodeState, Route, StepDone


@dataclass
class NodeBook:
    name: str
    stage: int
    kv_capacity_bytes: int
    up: bool = True
    down_reason: str | None = None
    queue_len: int = 0
    queued_work_s: float = 0.0
    kv_used_bytes: int = 0
    routed_total: int = 0  # requests ever routed here (for the results)
    capacity: float = 1.0  # prior speed factor shown to schedulers (1: work_s is per node)

    def state(self) -> NodeState:
        return NodeState(
            name=self.name,
            stage=self.stage,
            up=self.up,
            queue_len=self.queue_len,
            queued_work_s=max(self.queued_work_s, 0.0),
            capacity=self.capacity,
            mem_free_bytes=self.kv_capacity_bytes - self.kv_used_bytes,
        )


@dataclass
class StageArrays:
    """One stage's replicas as numpy arrays, in name order (the order :func:`up_nodes` gives):
    the same numbers a snapshot's :class:`NodeState` shows, for schedulers that decide over
    hundreds of replicas with vector operations instead of a Python loop per replica."""

    names: tuple[str, ...]  # sorted by name
    index: dict[str, int]  # name -> position
    queued_work_s: np.ndarray  # float64, max(queued_work_s, 0) as NodeState shows it
    mem_free_bytes: np.ndarray  # int64
    up: np.ndarray  # bool
    capacity: np.ndarray  # float64, the prior speed factor


@dataclass
class _Charge:
    route: Route
    remaining_s: list[float]  # per stage: predicted work not yet done
    kv_bytes: tuple[int, ...]
    left: list[bool]  # per stage: the request already left that node (see leave_stage)


class InvalidRouteError(TestbedError):
    """A scheduler returned a route that does not fit the stages (or uses a node that is down)."""


@dataclass
class Ledger:
    """Per-node counters for every request between routing and leaving."""

    stages: tuple[tuple[str, ...], ...]  # per stage: replica names
    kv_capacity_bytes: Mapping[str, int] = field(default_factory=dict)  # absent: unlimited
    capacity: Mapping[str, float] = field(default_factory=dict)  # prior speed; absent: 1.0
    _books: dict[str, NodeBook] = field(init=False, default_factory=dict)
    _charges: dict[int, _Charge] = field(init=False, default_factory=dict)
    # NodeState per node, rebuilt only for nodes changed since the last snapshot (books change
    # only through this class's methods): a snapshot of 1,000 nodes costs what changed
    _states: dict[str, NodeState] = field(init=False, default_factory=dict)
    _dirty: set[str] = field(init=False, default_factory=set)
    # the same for the per-stage arrays (built on first use, then refreshed for changed nodes)
    _arrays: list[StageArrays] = field(init=False, default_factory=list)
    _adirty: set[str] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        for s, names in enumerate(self.stages):
            for name in names:
                if name in self._books:
                    raise TestbedError(f"node {name!r} appears in two stages")
                self._books[name] = NodeBook(
                    name,
                    s,
                    int(self.kv_capacity_bytes.get(name, 2**62)),
                    capacity=float(self.capacity.get(name, 1.0)),
                )

    # -- queries ---------------------------------------------------------------------------------
    def book(self, name: str) -> NodeBook:
        return self._books[name]

    @property
    def books(self) -> Mapping[str, NodeBook]:
        return self._books

    def in_flight(self) -> int:
        return len(self._charges)

    def is_charged(self, request_id: int) -> bool:
        return request_id in self._charges

    def route_of(self, request_id: int) -> Route | None:
        c = self._charges.get(request_id)
        return c.route if c else None

    def snapshot(self, now_s: float, hop_s: Sequence[float] = ()) -> ClusterSnapshot:
        states = self._states
        if len(states) != len(self._books):
            self._dirty.update(self._books)
        for name in self._dirty:
            states[name] = self._books[name].state()
        self._dirty.clear()
        return ClusterSnapshot(
            now_s=now_s,
            stages=tuple(tuple(states[n] for n in names) for names in self.stages),
            hop_s=tuple(hop_s),
        )

    def stage_arrays(self) -> list[StageArrays]:
        """Per stage, the replicas' current numbers as arrays (see :class:`StageArrays`); the
        values equal :meth:`snapshot`'s. Refreshing costs what changed since the last call."""
        if not self._arrays:
            for names in self.stages:
                order = tuple(sorted(names))
                books = [self._books[n] for n in order]
                self._arrays.append(
                    StageArrays(
                        order,
                        {n: i for i, n in enumerate(order)},
                        np.array([max(b.queued_work_s, 0.0) for b in books], dtype=np.float64),
                        np.array(
                            [b.kv_capacity_bytes - b.kv_used_bytes for b in books], dtype=np.int64
                        ),
                        np.array([b.up for b in books], dtype=bool),
                        np.array([b.capacity for b in books], dtype=np.float64),
                    )
                )
            self._adirty.clear()
        for name in self._adirty:
            b = self._books[name]
            a = self._arrays[b.stage]
            i = a.index[name]
            a.queued_work_s[i] = max(b.queued_work_s, 0.0)
            a.mem_free_bytes[i] = b.kv_capacity_bytes - b.kv_used_bytes
            a.up[i] = b.up
        self._adirty.clear()
        return self._arrays

    def down_nodes(self) -> dict[str, str]:
        return {n: b.down_reason or "down" for n, b in self._books.items() if not b.up}

    def check_route(self, route: Route, *, up: bool = True) -> None:
        """The one check of a scheduler's answer: one replica per stage, in stage order, each up
        (unless ``up=False``). Raises :class:`InvalidRouteError` naming what is wrong."""
        if len(route) != len(self.stages):
            raise InvalidRouteError(
                f"scheduler returned {len(route)} nodes for {len(self.stages)} stages: {route}"
            )
        for s, name in enumerate(route):
            b = self._books.get(name)
            if b is None or b.stage != s:
                raise InvalidRouteError(f"route {route}: {name!r} is not a replica of stage {s}")
            if up and not b.up:
                raise InvalidRouteError(f"route {route}: {name!r} (stage {s}) is down")

    # -- updates ---------------------------------------------------------------------------------
    def charge(
        self, request_id: int, route: Route, work_s: Sequence[float], kv_bytes: Sequence[int]
    ) -> None:
        """Count a just-routed request on every node of its route."""
        if request_id in self._charges:
            raise TestbedError(
                f"request {request_id} is already routed ({self.route_of(request_id)})"
            )
        self.check_route(route, up=False)
        kv = tuple(int(k) for k in kv_bytes) or (0,) * len(route)
        for s, name in enumerate(route):
            b = self._books[name]
            b.queue_len += 1
            b.queued_work_s += float(work_s[s])
            b.kv_used_bytes += kv[s]
            b.routed_total += 1
            self._dirty.add(name)
            self._adirty.add(name)
        self._charges[request_id] = _Charge(
            route, [float(w) for w in work_s], kv, [False] * len(route)
        )

    def progress(self, request_id: int, stage: int, done_s: float) -> float:
        """A step of ``done_s`` predicted seconds finished on the request's stage ``stage``;
        returns what was actually taken off (never more than the request's remaining work)."""
        c = self._charges.get(request_id)
        if c is None or c.left[stage]:
            return 0.0
        take = min(max(done_s, 0.0), c.remaining_s[stage])
        c.remaining_s[stage] -= take
        name = c.route[stage]
        self._books[name].queued_work_s -= take
        self._dirty.add(name)
        self._adirty.add(name)
        return take

    def progress_many(self, steps: Iterable[StepDone]) -> None:
        """:meth:`progress` for each step's (request_id, stage, predicted_work_s as done_s), in
        order (a simulator's batch of step completions; the same arithmetic, without a call per
        step)."""
        charges, books = self._charges, self._books
        changed: set[str] = set()
        mark = changed.add
        for _, request_id, stage, done_s, _, _ in steps:
            c = charges.get(request_id)
            if c is None or c.left[stage]:
                continue
            rem = c.remaining_s[stage]
            take = 0.0 if 0.0 > done_s else done_s  # max(done_s, 0.0)
            if rem < take:  # min(take, rem)
                take = rem
            c.remaining_s[stage] = rem - take
            name = c.route[stage]
            books[name].queued_work_s -= take
            mark(name)
        self._dirty |= changed
        self._adirty |= changed

    def leave(self, request_id: int) -> Route | None:
        """The request left its route (done, failed or to be re-routed): drop what it holds.
        Idempotent; returns the route it had."""
        c = self._charges.pop(request_id, None)
        if c is None:
            return None
        for s in range(len(c.route)):
            self._drop(c, s)
        return c.route

    def leave_stage(self, request_id: int, stage: int) -> None:
        """The request is done with one node of its route (a store-and-forward model): drop what
        it holds there; once it left every node, it is no longer charged. Idempotent."""
        c = self._charges.get(request_id)
        if c is None:
            return
        self._drop(c, stage)
        if all(c.left):
            del self._charges[request_id]

    def _drop(self, c: _Charge, s: int) -> None:
        if c.left[s]:
            return
        c.left[s] = True
        b = self._books[c.route[s]]
        self._dirty.add(b.name)
        self._adirty.add(b.name)
        b.queue_len -= 1
        b.queued_work_s -= c.remaining_s[s]
        b.kv_used_bytes -= c.kv_bytes[s]
        if b.queue_len == 0:  # no float drift once a node is idle
            b.queued_work_s = 0.0

    def mark_down(self, name: str, reason: str) -> bool:
        """Returns True if the node was up (first report)."""
        b = self._books[name]
        self._dirty.add(name)
        self._adirty.add(name)
        was_up = b.up
        b.up, b.down_reason = False, reason
        return was_up

    def mark_up(self, name: str) -> None:
        b = self._books[name]
        self._dirty.add(name)
        self._adirty.add(name)
        b.up, b.down_reason = True, None
