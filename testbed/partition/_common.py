"""Helpers shared by the partitioners: segment sums, memory feasibility, infeasibility messages.

All partitioners see the same contiguous-segment structure: tier j holds blocks a..b-1 with
``0 = c_0 <= c_1 <= ... <= c_T = N``. A segment is *allowed* on tier j when its blocks' memory
fits ``tier_mem[j]`` and it is non-empty (or empty tiers are allowed). Whether any split exists
at all is a memory-only question, answered by a reachability DP over (tier, blocks placed); when
none exists, :func:`infeasible_error` says which single tier is the cheapest to fix and by how
many bytes. (Module name starts with "_" so the registry does not import it as a plug-in.)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from testbed.errors import InfeasibleError
from testbed.partition.base import PartitionProblem
from testbed.units import fmt_bytes


class InfeasibleSplitError(InfeasibleError):
    """No split fits (memory, or fewer blocks than tiers): an InfeasibleError (hence TestbedError
    and ValueError) that also carries the binding tier and its memory shortfall in bytes for
    programs (None where no single tier explains it)."""

    def __init__(
        self,
        message: str,
        *,
        tier_index: int | None = None,
        tier_name: str | None = None,
        shortfall_bytes: float | None = None,
    ):
        super().__init__(message)
        self.tier_index = tier_index
        self.tier_name = tier_name
        self.shortfall_bytes = shortfall_bytes


def segment_sums(values: np.ndarray) -> np.ndarray:
    """``values`` R x N -> R x (N+1) x (N+1) with ``out[r, a, b] = sum(values[r, a:b])`` for
    a <= b (0 on the diagonal) and +inf for a > b.

    Each row start is summed by its own cumulative sum (not as a difference of prefix sums), so
    a short segment late in the model carries no cancellation error from the long prefix.
    """
    r, n = values.shape
    out = np.full((r, n + 1, n + 1), np.inf)
    for a in range(n + 1):
        out[:, a, a] = 0.0
        if a < n:
            out[:, a, a + 1 :] = np.cumsum(values[:, a:], axis=1)
    return out


def segment_costs(problem: PartitionProblem, include_transfer: bool) -> np.ndarray:
    """T x (N+1) x (N+1): cost of tier j holding blocks a..b-1, exactly as ``split_cost`` defines
    it (compute, plus transfer_time[j][b-1] when counted and a < b < N); +inf for a > b."""
    cost = segment_sums(problem.stage_time)
    if include_transfer and problem.transfer_time is not None:
        n = problem.num_blocks
        ship = np.zeros((problem.num_tiers, n + 1))
        ship[:, 1:n] = problem.transfer_time[:, : n - 1]  # segment ending at b ships block b-1
        nonempty = np.triu(np.ones((n + 1, n + 1), dtype=bool), k=1)
        cost = np.where(nonempty[None, :, :], cost + ship[:, None, :], cost)
    return cost


def segment_mem(problem: PartitionProblem) -> np.ndarray:
    """(N+1) x (N+1): bytes of blocks a..b-1 (+inf for a > b)."""
    return segment_sums(problem.layer_mem[None, :])[0]


def structure_mask(n: int, allow_empty: bool) -> np.ndarray:
    """(N+1) x (N+1): True where a..b-1 is a valid range for one tier (a < b, or a <= b)."""
    return np.triu(np.ones((n + 1, n + 1), dtype=bool), k=0 if allow_empty else 1)


def allowed_segments(problem: PartitionProblem, mem: np.ndarray, allow_empty: bool) -> np.ndarray:
    """T x (N+1) x (N+1): tier j may hold blocks a..b-1 (structure and memory)."""
    struct = structure_mask(problem.num_blocks, allow_empty)
    return struct[None, :, :] & (mem[None, :, :] <= problem.tier_mem[:, None, None])


def reach_forward(allowed: np.ndarray) -> np.ndarray:
    """(T+1) x (N+1): F[j][a] = blocks 0..a-1 can be placed on tiers 0..j-1."""
    t, n1, _ = allowed.shape
    f = np.zeros((t + 1, n1), dtype=bool)
    f[0, 0] = True
    for j in range(t):
        f[j + 1] = allowed[j][f[j]].any(axis=0)
    return f


def reach_backward(allowed: np.ndarray) -> np.ndarray:
    """(T+1) x (N+1): B[j][b] = blocks b..N-1 can be placed on tiers j..T-1."""
    t, n1, _ = allowed.shape
    bk = np.zeros((t + 1, n1), dtype=bool)
    bk[t, n1 - 1] = True
    for j in range(t - 1, -1, -1):
        bk[j] = allowed[j][:, bk[j + 1]].any(axis=1)
    return bk


def check_block_count(problem: PartitionProblem, allow_empty: bool) -> None:
    """>= 1 block per tier needs N >= T."""
    n, t = problem.num_blocks, problem.num_tiers
    if not allow_empty and n < t:
        raise InfeasibleSplitError(
            f"{n} block(s) cannot give each of the {t} tiers at least one; "
            "allow empty tiers (allow_empty=True) or use fewer tiers"
        )


def _tier(problem: PartitionProblem, j: int) -> str:
    return f"tier {problem.tier_names[j]!r} (index {j})" if problem.tier_names else f"tier {j}"


def _blocks(a: int, b: int) -> str:
    return f"block {a}" if b - a == 1 else f"blocks {a}..{b - 1}"


def infeasible_error(problem: PartitionProblem, allow_empty: bool) -> InfeasibleSplitError:
    """Explain why no split fits memory.

    For every tier j it computes the least memory tier j would need if it alone were enlarged
    (the smallest range it can hold while tiers before and after it still fit theirs); the tier
    with the smallest shortfall is the binding one and is named with its shortfall in bytes.
    When no single tier can fix it (several tiers too small to hold even one block), it names
    those tiers instead.
    """
    n, t = problem.num_blocks, problem.num_tiers
    mem = segment_mem(problem)
    allowed = allowed_segments(problem, mem, allow_empty)
    fwd, bwd = reach_forward(allowed), reach_backward(allowed)
    struct = structure_mask(n, allow_empty)
    total_need, total_offer = float(problem.layer_mem.sum()), float(problem.tier_mem.sum())
    fixes: list[tuple[float, int, int, int, float]] = []  # (shortfall, j, a, b, need)
    for j in range(t):
        pair = struct & fwd[j][:, None] & bwd[j + 1][None, :]
        if not pair.any():
            continue
        range_mem = np.where(pair, mem, np.inf)
        ra, rb = (int(x) for x in np.unravel_index(int(np.argmin(range_mem)), range_mem.shape))
        least = float(range_mem[ra, rb])
        fixes.append((least - float(problem.tier_mem[j]), j, ra, rb, least))
    totals = f"in total the blocks need {fmt_bytes(total_need)} and the tiers offer {fmt_bytes(total_offer)}"
    hint = "give {it} more memory, use a smaller model or dtype"
    if not allow_empty:
        relaxed = allowed_segments(problem, mem, True)
        if reach_forward(relaxed)[t, n]:
            hint += ", or allow empty tiers (allow_empty=True)"
    if fixes:
        fixes.sort()
        short, j, a, b, need = fixes[0]
        others = [
            f"{problem.tier_names[k] if problem.tier_names else k!r} short by {fmt_bytes(s)}"
            for s, k, *_ in fixes[1:3]
        ]
        alt = f"; other single-tier fixes: {', '.join(others)}" if others else ""
        lead = ""
        if total_need > total_offer:  # the model is simply too big: say that first
            lead = (
                f"the blocks need {fmt_bytes(total_need)} but the tiers offer "
                f"{fmt_bytes(total_offer)} together (short by {fmt_bytes(total_need - total_offer)}); "
            )
        msg = (
            f"no split of the {n} blocks fits memory: {lead}{_tier(problem, j)} offers "
            f"{fmt_bytes(float(problem.tier_mem[j]))} but must hold at least {_blocks(a, b)} "
            f"({fmt_bytes(need)}) for the other tiers to fit theirs (short by {fmt_bytes(short)}, "
            f"the smallest single-tier shortfall); {hint.format(it='it')}{alt}"
            + ("" if lead else f" ({totals})")
        )
        name = problem.tier_names[j] if problem.tier_names else None
        return InfeasibleSplitError(msg, tier_index=j, tier_name=name, shortfall_bytes=short)
    # No single tier helps: name the tiers that cannot hold even their smallest possible block.
    small: list[tuple[int, float]] = []
    for j in range(t):
        lo, hi = (0, n) if allow_empty else (j, n - t + j + 1)
        smallest = float(problem.layer_mem[lo:hi].min())
        if smallest > problem.tier_mem[j]:
            small.append((j, smallest))
    parts = [
        f"{_tier(problem, j)} offers {fmt_bytes(float(problem.tier_mem[j]))} but its smallest "
        f"possible block needs {fmt_bytes(need)} (short by {fmt_bytes(need - float(problem.tier_mem[j]))})"
        for j, need in small
    ]
    offers = ", ".join(
        f"{problem.tier_names[k] if problem.tier_names else k} {fmt_bytes(float(problem.tier_mem[k]))}"
        for k in range(t)
    )
    together = (
        f"the tiers are too small together (short by {fmt_bytes(total_need - total_offer)}; tiers offer: {offers})"
        if total_need > total_offer
        else f"every split leaves some tier over its memory (tiers offer: {offers})"
    )
    detail = "; ".join(parts) if parts else together
    first = small[0] if small else None
    return InfeasibleSplitError(
        f"no split of the {n} blocks fits memory, and enlarging any single tier would not help: "
        f"{detail}; {hint.format(it='them' if len(small) != 1 else 'it')} ({totals})",
        tier_index=first[0] if first else None,
        tier_name=(problem.tier_names[first[0]] if first and problem.tier_names else None),
        shortfall_bytes=(first[1] - float(problem.tier_mem[first[0]]))
        if first
        else max(total_need - total_offer, 0.0),
    )


def check_cuts_fit(problem: PartitionProblem, cuts: Sequence[int], who: str) -> None:
    """Raise naming the first tier whose range of a fixed split exceeds its memory."""
    over = []
    mem = segment_mem(problem)  # the same sums the other partitioners compare
    for j in range(problem.num_tiers):
        a, b = cuts[j], cuts[j + 1]
        need = float(mem[a, b])
        if need > problem.tier_mem[j]:
            over.append((j, a, b, need))
    if not over:
        return
    j, a, b, need = over[0]
    offer = float(problem.tier_mem[j])
    more = f" (and {len(over) - 1} more tier(s) over)" if len(over) > 1 else ""
    raise InfeasibleSplitError(
        f"{who} puts {_blocks(a, b)} ({fmt_bytes(need)}) on {_tier(problem, j)}, which offers "
        f"{fmt_bytes(offer)} (short by {fmt_bytes(need - offer)}){more}; this split does not adapt "
        "to memory: give that tier more memory, use a smaller model or dtype, or use bsdp",
        tier_index=j,
        tier_name=problem.tier_names[j] if problem.tier_names else None,
        shortfall_bytes=need - offer,
    )


def cuts_from_tiers(tier_of_block: Sequence[int], num_tiers: int) -> tuple[int, ...]:
    """Block -> tier assignment (non-decreasing) -> cut tuple of T+1 ints."""
    return tuple(sum(1 for t in tier_of_block if t < j) for j in range(num_tiers + 1))
