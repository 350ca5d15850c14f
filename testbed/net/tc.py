"""Apply the operations of :mod:`testbed.net.shaping` with pyroute2 (needs CAP_NET_ADMIN).

One ``IPRoute`` socket per namespace and batch; namespaces are entered with
``IPRoute(netns="/proc/<pid>/ns/net", flags=0)`` (flags=0: a missing path is an error, not
created). Netlink calls block, so the async entry points run them in a worker thread.
A failed operation raises :class:`RuntimeBackendError` naming the tc line that failed.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Iterable, Sequence
from typing import Any

from testbed.errors import RuntimeBackendError
from testbed.net.shaping import Iface, TcOp


def _ipr(netns: str | None) -> Any:
    from pyroute2 import IPRoute

    if netns is None:
        return IPRoute()
    return IPRoute(netns=netns, flags=0)


def _group(ops: Iterable[TcOp]) -> dict[str | None, list[TcOp]]:
    groups: dict[str | None, list[TcOp]] = {}
    for op in ops:
        groups.setdefault(op.iface.netns, []).append(op)
    return groups


def _apply_one(ipr: Any, op: TcOp) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        if op.command == "del":
            ipr.tc("del", index=op.iface.ifindex, parent=op.parent)
        else:
            ipr.tc(
                op.command, op.kind, op.iface.ifindex, op.handle, parent=op.parent, **op.kwargs()
            )
    except NetlinkError as exc:
        if op.missing_ok and exc.code in (errno.ENOENT, errno.EINVAL, errno.ENODEV):
            return
        hint = ""
        if exc.code == errno.ENOENT and op.kind == "netem":
            hint = " (the kernel lacks sch_netem: run `testbed doctor`; modprobe sch_netem)"
        elif exc.code == errno.EPERM:
            hint = " (needs root / CAP_NET_ADMIN)"
        raise RuntimeBackendError(f"shaping failed: {op.describe()}: {exc}{hint}") from exc


def apply_ops_sync(ops: Sequence[TcOp]) -> None:
    """Apply ``ops`` in order (blocking). Raises RuntimeBackendError on the first failure."""
    for netns, group in _group(ops).items():
        try:
            ipr = _ipr(netns)
        except (OSError, ValueError) as exc:
            raise RuntimeBackendError(
                f"cannot open network namespace {netns or 'host'}: {exc}"
            ) from exc
        with ipr:
            for op in group:
                _apply_one(ipr, op)


async def apply_ops(ops: Sequence[TcOp]) -> None:
    """Async wrapper: the netlink calls run in a worker thread."""
    await asyncio.to_thread(apply_ops_sync, list(ops))


def qdiscs_sync(iface: Iface) -> list[dict[str, Any]]:
    """The qdiscs on ``iface`` as plain dicts: kind, handle, parent (for checks and status)."""
    with _ipr(iface.netns) as ipr:
        out = []
        for msg in ipr.get_qdiscs(index=iface.ifindex):
            out.append(
                {"kind": msg.get_attr("TCA_KIND"), "handle": msg["handle"], "parent": msg["parent"]}
            )
        return out


def links_sync(netns: str | None) -> list[dict[str, Any]]:
    """Interfaces of a namespace: ifindex, ifname, peer ifindex (IFLA_LINK), IPv4 addresses."""
    with _ipr(netns) as ipr:
        addrs: dict[int, list[str]] = {}
        for a in ipr.get_addr(family=2):
            addrs.setdefault(a["index"], []).append(a.get_attr("IFA_ADDRESS"))
        out = []
        for link in ipr.get_links():
            out.append(
                {
                    "ifindex": link["index"],
                    "ifname": link.get_attr("IFLA_IFNAME"),
                    "peer_ifindex": link.get_attr("IFLA_LINK"),
                    "ipv4": addrs.get(link["index"], []),
                }
            )
        return out
