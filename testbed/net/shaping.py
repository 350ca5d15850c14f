"""Decide how a link is shaped: a pure builder of tc operations (no I/O, no root).

A link direction (rate, one-way delay, jitter, loss) becomes a short list of :class:`TcOp`
on one interface's egress; :mod:`testbed.net.tc` applies them with pyroute2. Keeping the
decision apart from the netlink calls lets the unit tests check units and structure
(Mininet's ``bwCmds`` idea) without root.

Units follow what pyroute2 0.9 expects (see docs/PLATFORM-NOTES.md):
- rates are sent as strings ``"<int>bit"`` (a bare integer would mean *bytes* per second);
- netem ``delay``/``jitter`` are integer microseconds, ``loss`` a percentage;
- netem ``limit`` is sized ~1.5 x rate x (delay + jitter) / MTU packets (never below 1000),
  so a long fat link does not drop packets in netem's own queue;
- every ``replace`` carries every field (a replace without ``rate`` keeps the old cap).

Layout on one interface (kernel backend)::

    root htb 1:  default 1:10
      class htb 1:10  rate R ceil R burst B
        qdisc netem 10:  delay D jitter J loss L limit N      (kernel backend only)

Without a rate the netem qdisc is the root. With the ``kernel-rate+app-delay`` backend
(no sch_netem) the netem part is left out: the testbed's own transport (``AppShaper``)
applies delay, jitter and loss. With ``app`` nothing is done in the kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

ShapingBackend = Literal["kernel", "kernel-rate+app-delay", "app"]
BACKENDS: tuple[ShapingBackend, ...] = ("kernel", "kernel-rate+app-delay", "app")

TC_H_ROOT = 0xFFFFFFFF
HTB_ROOT = 0x10000  # 1:
HTB_CLASS = 0x10010  # 1:10
NETEM_UNDER_HTB = 0x100000  # 10:
NETEM_ROOT = 0x100000  # 10: (root when there is no rate)
TBF_ROOT = 0x20000  # 2:

MTU_BYTES = 1514  # ethernet frame incl. header: what the qdiscs count
MIN_NETEM_LIMIT = 1000  # the kernel's default; never go below it
MAX_RATE_BPS = 32e9  # beyond ~34 Gbit/s 32-bit rate fields overflow; we refuse above 32 Gbit/s
UNLIMITED_SIZING_BPS = 10e9  # used to size netem's queue when the direction has no rate


@dataclass(frozen=True)
class DirShape:
    """What one direction of a link does to its traffic (parsed units)."""

    rate_bps: float | None = None  # None: not rate-limited
    delay_s: float = 0.0  # one-way
    jitter_s: float = 0.0  # uniform in delay +- jitter
    loss_pct: float = 0.0  # per packet, 0..100

    def __post_init__(self) -> None:
        if self.rate_bps is not None and not (0 < self.rate_bps <= MAX_RATE_BPS):
            raise ValueError(f"rate {self.rate_bps!r} bit/s must be in (0, {MAX_RATE_BPS:g}] bit/s")
        for name in ("delay_s", "jitter_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name}={v!r} must be a finite number >= 0")
        if not 0 <= self.loss_pct <= 100:
            raise ValueError(f"loss_pct={self.loss_pct!r} must be within 0..100")

    @property
    def has_impairment(self) -> bool:
        """True when delay, jitter or loss is set (what netem or the app shaper applies)."""
        return self.delay_s > 0 or self.jitter_s > 0 or self.loss_pct > 0

    @property
    def is_noop(self) -> bool:
        return self.rate_bps is None and not self.has_impairment


@dataclass(frozen=True)
class Iface:
    """One interface in one network namespace."""

    ifindex: int
    ifname: str  # for messages only
    netns: str | None = None  # None: the host's namespace; else a path like /proc/<pid>/ns/net


@dataclass(frozen=True)
class TcOp:
    """One netlink traffic-control call: ``IPRoute.tc(command, kind, ifindex, handle, **params)``."""

    command: Literal["replace", "replace-class", "del"]
    kind: str  # "htb", "tbf", "netem"; "" for del
    iface: Iface
    handle: int
    parent: int = TC_H_ROOT
    params: tuple[tuple[str, Any], ...] = field(default=())
    # a "del" of something absent is fine (idempotent clear)
    missing_ok: bool = False

    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)

    def describe(self) -> str:
        """A `tc`-like line for logs and error messages."""
        where = f"dev {self.iface.ifname}" + (
            f" (netns {self.iface.netns})" if self.iface.netns else ""
        )
        par = "root" if self.parent == TC_H_ROOT else f"parent {_fmt_handle(self.parent)}"
        args = " ".join(f"{k} {v}" for k, v in self.params)
        obj = "class" if self.command == "replace-class" else "qdisc"
        cmd = "replace" if self.command != "del" else "del"
        return f"tc {obj} {cmd} {where} {par} handle {_fmt_handle(self.handle)} {self.kind} {args}".strip()


def _fmt_handle(h: int) -> str:
    major, minor = h >> 16, h & 0xFFFF
    return f"{major:x}:{minor:x}" if minor else f"{major:x}:"


def rate_arg(rate_bps: float) -> str:
    """pyroute2 rate string: integer bits per second with the lowercase 'bit' suffix."""
    return f"{max(1, round(rate_bps))}bit"


def htb_burst_bytes(rate_bps: float) -> int:
    """Bucket size: 5 ms worth of the rate, at least 10 MTUs (a GSO burst must fit)."""
    return max(10 * MTU_BYTES, math.ceil(rate_bps / 8 * 0.005))


def netem_limit_packets(rate_bps: float | None, delay_s: float, jitter_s: float) -> int:
    """netem queue length: ~1.5 x the packets in flight over (delay + jitter), >= 1000."""
    rate = rate_bps if rate_bps is not None else UNLIMITED_SIZING_BPS
    in_flight = rate / 8 * (delay_s + jitter_s) / MTU_BYTES
    return max(MIN_NETEM_LIMIT, math.ceil(1.5 * in_flight))


def us(seconds: float) -> int:
    """Seconds -> integer microseconds (netem's unit)."""
    return round(seconds * 1e6)


def clear_ops(iface: Iface) -> list[TcOp]:
    """Remove the root qdisc (back to the interface's default); fine if none is set."""
    return [TcOp("del", "", iface, handle=0, parent=TC_H_ROOT, missing_ok=True)]


def egress_ops(
    iface: Iface,
    shape: DirShape,
    backend: ShapingBackend,
    *,
    rate_qdisc: Literal["htb", "tbf"] = "htb",
) -> list[TcOp]:
    """Operations that make ``iface``'s egress behave like ``shape`` under ``backend``.

    The list always starts from a clean root so that re-applying (a link change while
    running) replaces every field; an unshaped direction just clears the root.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown shaping backend {backend!r}; one of {', '.join(BACKENDS)}")
    netem_in_kernel = backend == "kernel" and shape.has_impairment
    rate_in_kernel = backend != "app" and shape.rate_bps is not None
    ops = clear_ops(iface)
    if not (netem_in_kernel or rate_in_kernel):
        return ops
    netem_params = (
        ("delay", us(shape.delay_s)),
        ("jitter", us(shape.jitter_s)),
        ("loss", float(shape.loss_pct)),
        ("limit", netem_limit_packets(shape.rate_bps, shape.delay_s, shape.jitter_s)),
    )
    if not rate_in_kernel:
        ops.append(TcOp("replace", "netem", iface, handle=NETEM_ROOT, params=netem_params))
        return ops
    assert shape.rate_bps is not None
    rate = rate_arg(shape.rate_bps)
    burst = htb_burst_bytes(shape.rate_bps)
    if rate_qdisc == "tbf" and not netem_in_kernel:
        # tbf alone: latency bounds the queue (bytes = rate x latency + burst)
        ops.append(
            TcOp(
                "replace",
                "tbf",
                iface,
                handle=TBF_ROOT,
                params=(("rate", rate), ("burst", burst), ("latency", "200ms")),
            )
        )
        return ops
    ops.append(TcOp("replace", "htb", iface, handle=HTB_ROOT, params=(("default", 0x10),)))
    ops.append(
        TcOp(
            "replace-class",
            "htb",
            iface,
            handle=HTB_CLASS,
            parent=HTB_ROOT,
            params=(
                ("rate", rate),
                ("ceil", rate),
                ("burst", burst),
                ("cburst", burst),
                ("prio", 0),
            ),
        )
    )
    if netem_in_kernel:
        ops.append(
            TcOp(
                "replace",
                "netem",
                iface,
                handle=NETEM_UNDER_HTB,
                parent=HTB_CLASS,
                params=netem_params,
            )
        )
    return ops


def _layout(shape: DirShape, backend: ShapingBackend) -> tuple[bool, bool]:
    """Which qdiscs ``shape`` needs under ``backend``: (netem in the kernel, rate in the kernel)."""
    return (
        backend == "kernel" and shape.has_impairment,
        backend != "app" and shape.rate_bps is not None,
    )


def change_ops(iface: Iface, old: DirShape, new: DirShape, backend: ShapingBackend) -> list[TcOp]:
    """A link change while running: when the same qdiscs serve ``old`` and ``new``, only their
    parameters are replaced in place (the handles exist: the kernel changes them, keeping the
    queued packets and every connection); otherwise the root is rebuilt (:func:`egress_ops`)."""
    ops = egress_ops(iface, new, backend)
    if _layout(old, backend) == _layout(new, backend) and len(ops) > 1:
        # without the clear of the root, and without the root htb itself: its only parameter
        # (the default class) never changes, and the kernel has no "change" for an htb root
        # (a replace of an existing one is EINVAL); its class and netem are changed in place
        return [o for o in ops[1:] if not (o.kind == "htb" and o.command == "replace")]
    return ops
