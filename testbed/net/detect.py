"""Which qdiscs does this kernel offer, and so which shaping backend do we use.

The probe adds each qdisc to the loopback of a throwaway network namespace (named
``testbed-probe-<pid>``, removed afterwards; ``testbed clean`` removes leftovers), so the
host's interfaces are never touched. Without root the probe cannot run; we then look for the
modules in ``/proc/modules`` and ``/sys/module`` and say the answer is a guess.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

from testbed.net.shaping import ShapingBackend

QDISCS = ("netem", "htb", "tbf")
PROBE_NETNS_PREFIX = "testbed-probe-"


@dataclass(frozen=True)
class QdiscSupport:
    netem: bool
    htb: bool
    tbf: bool
    method: str  # "netns probe" or "module list (no root: a guess)"
    detail: str = ""  # error text of failed probes

    def backend(self, runtime: str = "docker") -> ShapingBackend:
        """The best backend for nodes in network namespaces of their own (containers): the
        kernel where it has the qdiscs. A runtime without namespaces (local) shapes in the app
        and says so itself (``Runtime.backend``); ``runtime`` is kept for callers' clarity."""
        del runtime
        if self.netem and (self.htb or self.tbf):
            return "kernel"
        if self.htb or self.tbf:
            return "kernel-rate+app-delay"
        return "app"


def _probe_netns() -> QdiscSupport:
    from pyroute2 import IPRoute, netns
    from pyroute2.netlink.exceptions import NetlinkError

    name = f"{PROBE_NETNS_PREFIX}{os.getpid()}"
    found: dict[str, bool] = {}
    errors = []
    netns.create(name)
    try:
        with IPRoute(netns=f"/var/run/netns/{name}", flags=0) as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            ipr.link("set", index=lo, state="up")
            for kind in QDISCS:
                kw = {"rate": "1mbit", "burst": 15140, "latency": "50ms"} if kind == "tbf" else {}
                try:
                    ipr.tc("add", kind, lo, 0x10000, **kw)
                    found[kind] = True
                    ipr.tc("del", index=lo, parent=0xFFFFFFFF)
                except NetlinkError as exc:
                    found[kind] = False
                    errors.append(f"{kind}: {exc}")
    finally:
        netns.remove(name)
    return QdiscSupport(
        found["netem"], found["htb"], found["tbf"], "netns probe", "; ".join(errors)
    )


def _guess_from_modules() -> QdiscSupport:
    text = ""
    try:
        text = Path("/proc/modules").read_text()
    except OSError:
        pass

    def has(kind: str) -> bool:
        mod = f"sch_{kind}"
        if mod in text or Path(f"/sys/module/{mod}").exists():
            return True
        release = os.uname().release
        base = Path(f"/lib/modules/{release}/kernel/net/sched")
        return any(base.glob(f"{mod}.ko*")) if base.exists() else False

    return QdiscSupport(has("netem"), has("htb"), has("tbf"), "module list (no root: a guess)")


def probe_qdiscs_sync() -> QdiscSupport:
    if os.geteuid() == 0:
        try:
            return _probe_netns()
        except OSError as exc:  # e.g. no CAP_SYS_ADMIN inside an unprivileged container
            guess = _guess_from_modules()
            return QdiscSupport(
                guess.netem, guess.htb, guess.tbf, guess.method, f"netns probe failed: {exc}"
            )
    return _guess_from_modules()


async def probe_qdiscs() -> QdiscSupport:
    return await asyncio.to_thread(probe_qdiscs_sync)
