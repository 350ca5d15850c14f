"""Links in simulated time: each inter-tier link is two FIFO pipes, one per direction (pure).

A message of ``nbytes`` that reaches a pipe at time t starts when the pipe is free, occupies it
for ``nbytes * 8 / bandwidth`` seconds (later messages queue behind it: contention), and
arrives ``delay_s`` after it left the pipe (propagation overlaps the next message). A hop that
crosses several links goes through them in order, store-and-forward. The reservation on every
link of a hop is made when the message is sent (exact for single-link hops; for multi-link
hops a message sent later but reaching an inner link earlier still queues behind it).
Loss is charged as its expected delay (:func:`expected_loss_s`): what the testbed's shapers
make of it (TCP's retransmissions, testbed/net/appshaper.py), in the mean; a prefill's
activations are hundreds of segments, so on a lossy link it adds tens of milliseconds. It holds
the pipe as one TCP stream's retransmissions hold the data behind them (head-of-line), so a
pipe still delivers in send order, which the engine's FIFO shortcuts rely on; it is not
counted as the link's busy time.
Jitter is not modelled (its mean is zero).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from testbed.spec.topology import LinkSpec

MSS_BYTES = 1448  # TCP payload per segment (as testbed/net/appshaper.py)
TLP_MIN_S = 0.010  # Linux tail-loss-probe floor (as testbed/net/appshaper.py)


def expected_loss_s(nbytes: int, loss: float, delay_s: float) -> float:
    """The mean extra seconds a message of ``nbytes`` pays for losing segments with
    probability ``loss`` each on a link of one-way ``delay_s``, as the app shaper charges it:
    a lost segment with >= 3 after it is fast-retransmitted (+1 RTT), one of the last three
    waits for the tail-loss probe (max(2 RTT, 10 ms), then +1 RTT)."""
    if loss <= 0.0:
        return 0.0
    n = max(1, math.ceil(nbytes / MSS_BYTES))
    rtt = 2.0 * delay_s
    tail = min(n, 3)
    return loss * ((n - tail) * rtt + tail * (max(2.0 * rtt, TLP_MIN_S) + rtt))


@dataclass
class Pipe:
    bandwidth_bps: float
    delay_s: float
    loss: float = 0.0  # each segment's loss probability (forward pipes; 0: a lossless link)
    free_at_s: float = 0.0
    busy_s: float = 0.0  # total occupancy (for utilisation)

    def send(self, now_s: float, nbytes: int) -> tuple[float, float]:
        """-> (time the last bit left the pipe, arrival time at the other end)."""
        start = max(now_s, self.free_at_s)
        occ = nbytes * 8.0 / self.bandwidth_bps
        self.free_at_s = start + occ
        self.busy_s += occ
        if self.loss:  # the stream waits for the retransmissions (head-of-line)
            self.free_at_s += expected_loss_s(nbytes, self.loss, self.delay_s)
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
        self.fwd = [
            [Pipe(ln.bandwidth_bps, ln.delay_s, ln.loss_pct / 100.0) for ln in hop]
            for hop in self.hop_links
        ]
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
            if p.loss:  # the stream waits for the retransmissions (head-of-line)
                free = p.free_at_s = free + expected_loss_s(nbytes, p.loss, p.delay_s)
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
