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
    """

    stage_time: np.ndarray
    layer_mem: np.ndarray
    tier_mem: np.ndarray
    transfer_time: np.ndarray | None = None
    tier_names: tuple[str, ...] = field(default=())

    @staticmethod
    def from_arrays(
        stage_time: Sequence[Sequence[float]] | np.ndarray,
        layer_mem: Sequence[float] | np.ndarray,
        tier_mem: Sequence[float] | np.ndarray,
        transfer_time: Sequence[Sequence[float]] | np.ndarray | None = None,
        tier_names: Sequence[str] = (),
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
        for name, arr in (
            ("stage_time", st),
            ("layer_mem", lm),
            ("tier_mem", tm),
            ("transfer_time", tt),
        ):
            if arr is not None and (not np.all(np.isfinite(arr)) or np.any(arr < 0)):
                raise ValueError(f"{name} must be finite and >= 0")
        names = tuple(tier_names) or tuple(f"tier{j}" for j in range(t))
        return PartitionProblem(st, lm, tm, tt, names)

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
