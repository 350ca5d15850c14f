"""Types shared by partitioners: the problem as plain arrays, and the resulting split."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from testbed.registry import Registry


@dataclass(frozen=True)
class Split:
    """Cut points: tier j holds blocks cuts[j] .. cuts[j+1]-1 (empty when equal)."""

    cuts: tuple[int, ...]  # T+1 ints, cuts[0] = 0, cuts[-1] = N, non-decreasing
    bottleneck: float  # max over tiers of its cost (compute, + transfer when counted)

    def ranges(self) -> list[tuple[int, int]]:
        return [(self.cuts[j], self.cuts[j + 1]) for j in range(len(self.cuts) - 1)]


@dataclass(frozen=True)
class PartitionProblem:
    """A partitioning instance as plain arrays (T tiers, N blocks).

    stage_time[j][i]   seconds for tier j's effective node to run block i (embedding cost folded
                       into block 0, head cost into block N-1, since whoever holds them runs them)
    layer_mem[i]       bytes block i needs (weights + KV reservation; embedding/head folded in)
    tier_mem[j]        bytes tier j offers (its largest node)
    transfer_time[j][i] seconds to ship block i's output from tier j to tier j+1 (row T-1 unused)
    hop_delay[j]       one-way delay paid per request on the link tier j -> j+1, summed over its
                       crossings (prefill + each decode step); latency, not occupancy (entry T-1
                       unused). None: 0.
    input_time[j]      seconds for the user's input (the prompt's token ids) to reach tier j from
                       the user, who sits at the first tier (so input_time[0] is the first tier's
                       access LAN, input_time[j+1] adds link j's bytes / bandwidth + delay);
                       non-decreasing. None: 0.
    """

    stage_time: np.ndarray
    layer_mem: np.ndarray
    tier_mem: np.ndarray
    transfer_time: np.ndarray | None = None
    tier_names: tuple[str, ...] = field(default=())
    hop_delay: np.ndarray | None = None
    input_time: np.ndarray | None = None

    @staticmethod
    def from_arrays(
        stage_time: Sequence[Sequence[float]] | np.ndarray,
        layer_mem: Sequence[float] | np.ndarray,
        tier_mem: Sequence[float] | np.ndarray,
        transfer_time: Sequence[Sequence[float]] | np.ndarray | None = None,
        tier_names: Sequence[str] = (),
        hop_delay: Sequence[float] | np.ndarray | None = None,
        input_time: Sequence[float] | np.ndarray | None = None,
    ) -> PartitionProblem:
        st = np.asarray(stage_time, dtype=float)
        lm = np.asarray(layer_mem, dtype=float)
        tm = np.asarray(tier_mem, dtype=float)
        if st.ndim != 2:
            raise ValueError(f"stage_time must be T x N, got shape {st.shape}")
        t, n = st.shape
        if n == 0 or t == 0:
            raise ValueError("need at least one tier and one block")
        if lm.shape != (n,):
            raise ValueError(f"layer_mem must have N={n} entries, got shape {lm.shape}")
        if tm.shape != (t,):
            raise ValueError(f"tier_mem must have T={t} entries, got shape {tm.shape}")
        tt = None
        if transfer_time is not None:
            tt = np.asarray(transfer_time, dtype=float)
            if tt.shape != (t, n):
                raise ValueError(f"transfer_time must be T x N = {t} x {n}, got shape {tt.shape}")
        hd = None if hop_delay is None else np.asarray(hop_delay, dtype=float)
        it = None if input_time is None else np.asarray(input_time, dtype=float)
        for name, vec in (("hop_delay", hd), ("input_time", it)):
            if vec is not None and vec.shape != (t,):
                raise ValueError(f"{name} must have T={t} entries, got shape {vec.shape}")
        for name, arr in (
            ("stage_time", st),
            ("layer_mem", lm),
            ("tier_mem", tm),
            ("transfer_time", tt),
            ("hop_delay", hd),
            ("input_time", it),
        ):
            if arr is not None and (not np.all(np.isfinite(arr)) or np.any(arr < 0)):
                raise ValueError(f"{name} must be finite and >= 0")
        if it is not None and np.any(np.diff(it) < 0):
            raise ValueError(
                "input_time must be non-decreasing (tier j+1 is reached through tier j)"
            )
        names = tuple(tier_names) or tuple(f"tier{j}" for j in range(t))
        return PartitionProblem(st, lm, tm, tt, names, hd, it)

    @property
    def num_tiers(self) -> int:
        return int(self.stage_time.shape[0])

    @property
    def num_blocks(self) -> int:
        return int(self.stage_time.shape[1])


def split_cost(
    problem: PartitionProblem, cuts: Sequence[int], include_transfer: bool = True
) -> list[float]:
    """Cost of each tier under ``cuts``: its blocks' compute, plus (when transfer is counted) the
    transfer of its last block's output over its link to tier j+1 whenever blocks follow
    (b < N). With every tier non-empty that is exactly "+ transfer_time[j][c_{j+1}-1] for
    j < T-1". An empty tier costs 0; a last non-empty tier ships nothing onward."""
    t = problem.num_tiers
    costs = []
    for j in range(t):
        a, b = cuts[j], cuts[j + 1]
        c = float(problem.stage_time[j, a:b].sum())
        if include_transfer and problem.transfer_time is not None and a < b < problem.num_blocks:
            c += float(problem.transfer_time[j, b - 1])
        costs.append(c)
    return costs


def link_costs(problem: PartitionProblem, include_comm: bool = True) -> np.ndarray:
    """T x (N+1): ``out[j][b]`` = what a single request pays on the link tier j -> j+1 when
    tiers 0..j hold blocks 0..b-1 (so ``b = cuts[j+1]``), for the latency of
    :func:`request_latency`: activations cross it when 0 < b < N (``transfer_time[j][b-1] +
    hop_delay[j]``); the user's input crosses it when b = 0 (``input_time[j+1] -
    input_time[j]``); nothing crosses it when b = N. Row T-1 is 0. All 0 without
    ``include_comm``."""
    t, n = problem.num_tiers, problem.num_blocks
    out = np.zeros((t, n + 1))
    if not include_comm:
        return out
    for j in range(t - 1):
        if problem.transfer_time is not None:
            out[j, 1:n] += problem.transfer_time[j, : n - 1]
        if problem.hop_delay is not None:
            out[j, 1:n] += problem.hop_delay[j]
        if problem.input_time is not None:
            out[j, 0] = problem.input_time[j + 1] - problem.input_time[j]
    return out


def request_latency(
    problem: PartitionProblem, cuts: Sequence[int], include_comm: bool = True
) -> float:
    """One reference request's end-to-end time through the pipeline of ``cuts`` with no other
    request in the system: the user's input into the first tier (``input_time[0]``), every
    block's compute (prefill + all decode steps) on its tier, and for every link the request
    crosses its occupancy and delay (:func:`link_costs`). Without ``include_comm`` only the
    compute. Returning the result to the user is the same for every split and not counted (as
    in the planner's cost model)."""
    t = problem.num_tiers
    links = link_costs(problem, include_comm)
    total = float(problem.input_time[0]) if include_comm and problem.input_time is not None else 0.0
    for j in range(t):
        total += float(problem.stage_time[j, cuts[j] : cuts[j + 1]].sum())
        total += float(links[j, cuts[j + 1]])
    return total


class Partitioner:
    """Base class: subclasses are frozen dataclasses (fields = parameters) registered by name."""

    name: ClassVar[str]

    def split(self, problem: PartitionProblem) -> Split:
        raise NotImplementedError

    def describe(self) -> dict[str, object]:
        import dataclasses

        params = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        return {"name": self.name, "params": params}


PARTITIONERS: Registry[Partitioner] = Registry("partitioner", "testbed.partition")
