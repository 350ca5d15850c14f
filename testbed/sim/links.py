"""Links in simulated time: each inter-tier link is two FIFO pipes, one per direction (pure).

A message of ``nbytes`` that reaches a pipe at time t starts when the pipe is free, occupies it
for ``nbytes * 8 / bandwidth`` seconds (later messages queue behind it: contention), and
arrives ``delay_s`` after it left the pipe (propagation overlaps the next message). A hop that
crosses several links goes through them in order, store-and-forward. The reservation on every
link of a hop is made when the message is sent (exact for single-link hops; for multi-link
hops a message sent later but reaching an inner link earlier still queues behind it).
Jitter and loss are not modelled (their means are small next to the delays they ride on).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from testbed.spec.topology import LinkSpec


@dataclass
class Pipe:
    bandwidth_bps: float
    delay_s: float
    free_at_s: float = 0.0
    busy_s: float = 0.0  # total occupancy (for utilisation)

    def send(self, now_s: float, nbytes: int) -> tuple[float, float]:
        """-> (time the last bit left the pipe, arrival time at the other end)."""
        start = max(now_s, self.free_at_s)
        occ = nbytes * 8.0 / self.bandwidth_bps
        self.free_at_s = start + occ
        self.busy_s += occ
        return self.free_at_s, self.free_at_s + self.delay_s


@dataclass
class Network:
    """Per hop s -> s+1 of the pipeline: the forward pipes, and the reverse pipes."""

    hop_links: Sequence[Sequence[LinkSpec]]
    overhead_s: float = 0.0  # per stage call, on top of the links (from a calibrated profile)
    fwd: list[list[Pipe]] = field(init=False, default_factory=list)
    rev: list[list[Pipe]] = field(init=False, default_factory=list)

    back_pipes: list[Pipe] = field(init=False, default_factory=list)  # reverse, in travel order

    def __post_init__(self) -> None:
        self.fwd = [[Pipe(ln.bandwidth_bps, ln.delay_s) for ln in hop] for hop in self.hop_links]
        self.rev = [[Pipe(ln.bandwidth_bps, ln.delay_s) for ln in hop] for hop in self.hop_links]
        self.back_pipes = [p for hop in reversed(self.rev) for p in reversed(hop)]

    def share(self, links: dict[int, tuple[Pipe, Pipe]], first_tier: Sequence[int]) -> None:
        """Use the pipes of ``links`` (tier j -> j+1: forward, reverse) for the hops that cross
        them, adding this network's own for the links not there yet: the plans of a run that
        re-partitions share the physical links. ``first_tier[h]``: the tier hop h leaves."""
        for h, hop in enumerate(self.fwd):
            for k in range(len(hop)):
                j = first_tier[h] + k
                links.setdefault(j, (self.fwd[h][k], self.rev[h][k]))
                self.fwd[h][k], self.rev[h][k] = links[j]
        self.back_pipes = [p for hop in reversed(self.rev) for p in reversed(hop)]

    def forward(self, hop: int, now_s: float, nbytes: int) -> float:
        """Send stage ``hop``'s output to stage ``hop + 1``; -> arrival time."""
        t = now_s
        for p in self.fwd[hop]:  # Pipe.send, written out (the simulator's hottest call)
            free = p.free_at_s
            occ = nbytes * 8.0 / p.bandwidth_bps
            free = p.free_at_s = (t if t >= free else free) + occ
            p.busy_s += occ
            t = free + p.delay_s
        return t + self.overhead_s

    def back(self, now_s: float, nbytes: int) -> float:
        """Send the sampled token from the last stage back along the chain to the client
        (stage 0's side); -> arrival time."""
        t = now_s
        for p in self.back_pipes:  # Pipe.send, written out
            free = p.free_at_s
            occ = nbytes * 8.0 / p.bandwidth_bps
            free = p.free_at_s = (t if t >= free else free) + occ
            p.busy_s += occ
            t = free + p.delay_s
        return t

    def busy_s(self) -> dict[str, float]:
        """Occupancy seconds of every pipe, named "hop0.fwd[0]" (a run's ``link_busy_s``)."""
        return {
            f"hop{h}.{d}[{k}]": p.busy_s
            for h in range(len(self.fwd))
            for d, pipes in (("fwd", self.fwd[h]), ("rev", self.rev[h]))
            for k, p in enumerate(pipes)
        }
