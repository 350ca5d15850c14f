"""Link emulation in the testbed's own transport: the ``before_send(nbytes)`` hop hook.

Used where the kernel cannot do it: delay, jitter and loss when the kernel lacks sch_netem
(backend ``kernel-rate+app-delay``), and everything including the rate for local processes
(backend ``app``). The stage client awaits ``before_send(nbytes)`` before it sends a
message of ``nbytes`` over a hop; the hook sleeps for as long as the emulated link would take.

Model (one :class:`AppShaper` per directed hop, i.e. per destination node):

- **Round trip.** The broker relays every hop: a request carries the activations into the
  next tier and its reply is the next hop's input. A hop into tier j is charged the forward
  *and* the reverse one-way delay of the link (j-1, j): delay_fwd + delay_rev, each drawn
  uniformly in delay +- jitter from a seeded generator. Summed over a decode step this is
  edge -> fog -> cloud -> fog -> edge, the chain's round trip, as if stages forwarded directly
  and the sampled token came back along the chain. Kernel shaping does the same (forward
  delay on the way in, reverse delay on the way out), so both backends measure alike.
- **Rate** (``app`` backend only; otherwise the kernel's htb/tbf does it): the link is a
  FIFO pipe. A message occupies it for nbytes x 8 / rate seconds after the previous one
  leaves (serialisation delay with queueing); propagation overlaps with the next message.
- **Loss** as TCP would turn it into delay, not as dropped messages: the message is cut into
  ceil(nbytes / 1448) segments; each is lost with probability loss_pct/100 (independent).
  A lost segment followed by >= 3 segments is repaired by fast retransmit (+1 RTT); a tail
  loss waits for the tail-loss probe, max(2 x RTT, 10 ms), then the retransmission (+1 RTT).
  Penalties add up; losses of retransmissions and cwnd reductions are ignored (second order).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from dataclasses import dataclass

from testbed.net.shaping import DirShape

MSS_BYTES = 1448  # TCP payload per segment on a 1500-byte MTU with timestamps
TLP_MIN_S = 0.010  # Linux tail-loss-probe floor


@dataclass(frozen=True)
class HopShape:
    """What the app shaper charges for one hop (parsed units)."""

    forward: DirShape  # towards the destination node
    reverse: DirShape  # back from it (delay, jitter, loss of the reply path)
    apply_rate: bool  # True for the `app` backend; the kernel does the rate otherwise

    @property
    def base_rtt_s(self) -> float:
        return self.forward.delay_s + self.reverse.delay_s


class AppShaper:
    """Hop hook: ``await shaper.before_send(nbytes)`` sleeps as the emulated link would."""

    def __init__(self, shape: HopShape, *, seed: int = 0, name: str = "") -> None:
        self.shape = shape
        self.name = name
        self._rng = random.Random(seed)
        self._pipe_free_at = 0.0  # monotonic time when the link's serialiser is idle again
        self.messages = 0
        self.bytes = 0
        self.lost_segments = 0

    def set_shape(self, shape: HopShape) -> None:
        """Change the link while running (a scenario timeline)."""
        self.shape = shape

    def _one_way(self, d: DirShape) -> float:
        if d.jitter_s > 0:
            return max(0.0, self._rng.uniform(d.delay_s - d.jitter_s, d.delay_s + d.jitter_s))
        return d.delay_s

    def loss_penalty_s(self, nbytes: int) -> float:
        """Extra seconds the lost segments of one message cost (see the module docstring)."""
        p = self.shape.forward.loss_pct / 100.0
        if p <= 0:
            return 0.0
        segments = max(1, math.ceil(nbytes / MSS_BYTES))
        rtt = self.shape.base_rtt_s
        penalty = 0.0
        for i in range(segments):
            if self._rng.random() < p:
                self.lost_segments += 1
                following = segments - i - 1
                penalty += rtt if following >= 3 else max(2 * rtt, TLP_MIN_S) + rtt
        return penalty

    def delay_for(self, nbytes: int, now: float) -> float:
        """Seconds to wait before a message of ``nbytes`` handed over at ``now`` arrives.

        Advances the pipe and the random generator: call once per message.
        """
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        fwd = self.shape.forward
        wait = 0.0
        if self.shape.apply_rate and fwd.rate_bps:
            start = max(now, self._pipe_free_at)
            self._pipe_free_at = start + nbytes * 8 / fwd.rate_bps
            wait = self._pipe_free_at - now
        wait += self._one_way(fwd) + self._one_way(self.shape.reverse)
        wait += self.loss_penalty_s(nbytes)
        self.messages += 1
        self.bytes += nbytes
        return wait

    async def before_send(self, nbytes: int) -> None:
        wait = self.delay_for(nbytes, time.monotonic())
        if wait > 0:
            await asyncio.sleep(wait)


def hop_shape_for_link(
    bandwidth_bps: float, delay_s: float, jitter_s: float, loss_pct: float, *, apply_rate: bool
) -> HopShape:
    """A symmetric link (the topology's LinkSpec) as the app shaper's hop."""
    fwd = DirShape(bandwidth_bps, delay_s, jitter_s, loss_pct)
    rev = DirShape(None, delay_s, jitter_s, loss_pct)
    return HopShape(fwd, rev, apply_rate)
