"""The per-host shaping agent of the swarm runtime, and the manager's side that runs it.

The manager decides (what each node's two directions do, :mod:`testbed.net.links`); the agent
acts, on every host at once: it runs as a swarm **global job** (one task per node of the
swarm, running the testbed image) with the host's network namespace (``--network host``),
``CAP_NET_ADMIN`` + ``CAP_SYS_ADMIN``, the engine's socket and the host's ``/proc`` mounted.
On its host it finds the run's containers (labels), enters each one's network namespace by
``/hostproc/<pid>/ns/net`` and applies :func:`testbed.net.shaping.egress_ops` with pyroute2
(:mod:`testbed.net.tc`) on the interface the broker's traffic crosses: the container's end
of ``docker_gwbridge`` (where host-mode published ports are delivered) and its host-side
veth; and, for forwarding, on each of the container's interfaces on the run's link overlays
(found by the address the plan names, inside the container's namespace), its egress shaped
as planned (:mod:`testbed.runtime.swarm_links`). It prints one JSON line per shaped node and
exits non-zero on the first failure; the manager reads the job's logs and checks every
planned node was shaped somewhere.

``python -m testbed.runtime.swarm_agent shape`` (plan in ``$TESTBED_SHAPE_PLAN``) or
``... probe`` (prints this host's qdisc support, for `testbed doctor`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from testbed.errors import RuntimeBackendError
from testbed.net.shaping import DirShape, Iface, ShapingBackend, egress_ops
from testbed.runtime.base import LABEL_NODE, LABEL_RUN

PLAN_ENV = "TESTBED_SHAPE_PLAN"
HOST_PROC = "/hostproc"
GWBRIDGE = "docker_gwbridge"
LABEL_ROLE = "testbed.role"
TERMINAL = ("complete", "failed", "rejected", "shutdown", "orphaned", "remove")


# -- agent side (runs in the job's container) ----------------------------------------------


def gw_ifaces(netns: str, subnet: ipaddress.IPv4Network) -> tuple[Iface, Iface]:
    """(host-side veth, container-side interface) of the container's docker_gwbridge NIC."""
    from testbed.net.tc import links_sync

    for link in links_sync(netns):
        if any(ipaddress.ip_address(a) in subnet for a in link["ipv4"]):
            inside = Iface(link["ifindex"], link["ifname"], netns)
            for hl in links_sync(None):
                if hl["ifindex"] == link["peer_ifindex"]:
                    return Iface(hl["ifindex"], hl["ifname"], None), inside
            raise RuntimeBackendError(f"host side of {link['ifname']} not found")
    raise RuntimeBackendError(f"no interface on {GWBRIDGE} ({subnet}) in {netns}")


def iface_with(netns: str, address: str) -> Iface:
    """The interface holding ``address`` in namespace ``netns`` (a link overlay's NIC)."""
    from testbed.net.tc import links_sync

    for link in links_sync(netns):
        if address in link["ipv4"]:
            return Iface(link["ifindex"], link["ifname"], netns)
    raise RuntimeBackendError(f"no interface with {address} in {netns}")


def shape_link_nics(
    netns: str, entries: Sequence[Mapping[str, Any]], backend: ShapingBackend
) -> list[str]:
    """Shape the egress of each (address, shape) entry's interface; their names."""
    from testbed.net.tc import apply_ops_sync

    names = []
    for e in entries:
        nic = iface_with(netns, e["address"])
        apply_ops_sync(egress_ops(nic, DirShape(**e["shape"]), backend))
        names.append(nic.ifname)
    return names


def shape_local(plan: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Shape this host's containers of ``plan['run']`` as planned; one record per node."""
    import docker

    from testbed.net.tc import apply_ops_sync

    c = docker.from_env(timeout=60)
    host = str(c.info().get("Name"))
    ctrs = c.containers.list(filters={"label": f"{LABEL_RUN}={plan['run']}"})
    links = plan.get("links") or {}
    mine = [x for x in ctrs if x.labels.get(LABEL_NODE) in (plan["nodes"].keys() | links.keys())]
    if not mine:
        return []
    cfg = c.networks.get(GWBRIDGE).attrs["IPAM"]["Config"][0]
    subnet = ipaddress.ip_network(cfg["Subnet"])
    assert isinstance(subnet, ipaddress.IPv4Network)
    backend: ShapingBackend = plan["backend"]
    done: list[dict[str, Any]] = []
    for ctr in mine:
        node = ctr.labels[LABEL_NODE]
        netns = f"{HOST_PROC}/{ctr.attrs['State']['Pid']}/ns/net"
        if node in plan["nodes"]:
            shape = plan["nodes"][node]
            host_if, inside = gw_ifaces(netns, subnet)
            ops = egress_ops(host_if, DirShape(**shape["down"]), backend) + egress_ops(
                inside, DirShape(**shape["up"]), backend
            )
            apply_ops_sync(ops)
            done.append({"shaped": node, "host": host, "down": host_if.ifname, "up": inside.ifname})
        if node in links:
            nics = shape_link_nics(netns, links[node], backend)
            done.append({"linked": node, "host": host, "ifaces": nics})
    return done


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args[:1] == ["shape"]:
            for rec in shape_local(json.loads(os.environ[PLAN_ENV])):
                print(json.dumps(rec), flush=True)
            return 0
        if args[:1] == ["probe"]:
            import socket

            from testbed.net.detect import probe_qdiscs_sync

            q = probe_qdiscs_sync()
            host = os.environ.get("TESTBED_HOSTNAME") or socket.gethostname()
            print(json.dumps({"probe": host} | asdict(q) | {"backend": q.backend()}), flush=True)
            return 0
    except (RuntimeBackendError, OSError, KeyError, ValueError) as exc:
        print(f"agent error: {exc}", file=sys.stderr, flush=True)
        return 1
    print("usage: python -m testbed.runtime.swarm_agent shape|probe", file=sys.stderr)
    return 2


# -- manager side ----------------------------------------------------------------------------


def shape_plan(
    run_id: str,
    backend: ShapingBackend,
    shapes: Mapping[str, tuple[DirShape, DirShape]],
    links: Mapping[str, Sequence[tuple[str, DirShape]]] | None = None,
) -> str:
    """The agent's instructions: per node, its (downlink, uplink) shapes on the broker's
    path, and (forwarding) the egress shape of its NIC holding each address on a link
    overlay."""
    nodes = {n: {"down": asdict(d), "up": asdict(u)} for n, (d, u) in shapes.items()}
    nics = {
        n: [{"address": a, "shape": asdict(s)} for a, s in entries]
        for n, entries in (links or {}).items()
    }
    return json.dumps({"run": run_id, "backend": backend, "nodes": nodes, "links": nics})


def run_agent_job(
    c: Any,
    *,
    run_id: str,
    name: str,
    image: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    mounts: Sequence[tuple[str, str]],
    timeout_s: float = 300.0,
) -> list[dict[str, Any]]:
    """Run the agent as a global job on every ready node; returns its JSON lines. Blocking.

    Raises (with the failing task's error and the job's log tail) if a task does not complete.
    """
    import docker
    from docker.types import RestartPolicy, ServiceMode

    labels = {LABEL_RUN: run_id, LABEL_ROLE: "agent"}
    ready = {n.id for n in c.nodes.list() if n.attrs.get("Status", {}).get("State") == "ready"}
    all_mounts = [
        "/proc:/hostproc:ro",
        "/var/run/docker.sock:/var/run/docker.sock:rw",
        *(f"{src}:{dst}:ro" for src, dst in mounts),
    ]
    try:
        svc = c.services.create(
            image,
            list(argv),
            name=f"tb-{run_id}-{name}",
            mode=ServiceMode("global-job"),
            networks=["host"],
            cap_add=["CAP_NET_ADMIN", "CAP_SYS_ADMIN"],
            mounts=all_mounts,
            env=[f"{k}={v}" for k, v in env.items()],
            labels=labels,
            container_labels=labels,
            restart_policy=RestartPolicy(condition="none"),
        )
    except docker.errors.APIError as exc:
        raise RuntimeBackendError(f"starting the shaping agent failed: {exc}") from exc
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            tasks = svc.tasks()
            states = {t["NodeID"]: t["Status"] for t in tasks}
            if ready <= set(states) and all(s["State"] in TERMINAL for s in states.values()):
                break
            if time.monotonic() > deadline:
                raise RuntimeBackendError(
                    f"shaping agent {name} did not finish in {timeout_s:g}s: "
                    + ", ".join(f"{k[:10]} {s['State']}" for k, s in states.items())
                )
            time.sleep(0.5)
        text = b"".join(svc.logs(stdout=True, stderr=True)).decode(errors="replace")
        bad = {k: s for k, s in states.items() if s["State"] != "complete"}
        if bad:
            why = "; ".join(
                f"node {k[:10]}: {s['State']} {s.get('Err', '')}" for k, s in bad.items()
            )
            raise RuntimeBackendError(f"shaping agent {name} failed: {why}\n{text[-1500:]}")
    finally:
        try:
            svc.remove()
        except docker.errors.NotFound:
            pass
        # the engine (20.10) keeps a finished job task's container even after the service is
        # removed: remove this host's; other hosts keep an exited one (labelled with the run;
        # `docker container prune --filter label=testbed.run` there)
        flt = {"label": [f"{LABEL_RUN}={run_id}", f"{LABEL_ROLE}=agent"]}
        for ctr in c.containers.list(all=True, filters=flt, sparse=True):
            with contextlib.suppress(docker.errors.APIError):
                ctr.remove(force=True)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


if __name__ == "__main__":
    raise SystemExit(main())
