"""A swarm run's tasks as the manager sees them: wait for each to run (its published ports),
why one ended, a report on one that never became healthy, its address on this host's
``docker_gwbridge``, and the health wait over the ways the broker can reach each stage."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from typing import Any

from testbed.errors import RuntimeBackendError, StageTimeoutError
from testbed.runtime.base import PROBE_PORT, STAGE_PORT, NodeEndpoint, RunningTestbed
from testbed.runtime.swarm_agent import GWBRIDGE


def wait_running(svc: Any, timeout_s: float) -> tuple[str, dict[int, int], dict[str, Any]]:
    """Wait for the service's task to run with its ports published: (node id, target->port,
    the task)."""
    deadline = time.monotonic() + timeout_s
    last = "no task yet"
    while time.monotonic() < deadline:
        for t in svc.tasks():
            st = t["Status"]
            if st["State"] in ("failed", "rejected", "shutdown", "orphaned", "complete"):
                raise RuntimeBackendError(
                    f"service {svc.name}: task {st['State']}: {st.get('Err') or st.get('Message')}"
                )
            ports = (st.get("PortStatus") or {}).get("Ports") or []
            if st["State"] == "running" and ports:
                return t["NodeID"], {p["TargetPort"]: p["PublishedPort"] for p in ports}, t
            last = f"{st['State']} ({st.get('Message', '')})"
        time.sleep(0.5)
    raise RuntimeBackendError(f"service {svc.name} not running after {timeout_s:g}s: {last}")


def task_ended(svc: Any) -> str | None:
    """Why the service's task can no longer serve (it ended), or None while it runs."""
    for t in svc.tasks():
        st = t["Status"]
        if st["State"] in ("failed", "rejected", "shutdown", "orphaned", "complete"):
            return f"ended ({st['State']}: {st.get('Err') or st.get('Message')})"
    return None


def task_report(svc: Any, lines: int = 6) -> str:
    """A service's task state and the last lines of its log (for a failed health wait)."""
    states = [t["Status"].get("State", "?") for t in svc.tasks()]
    try:
        raw = b"".join(svc.logs(stdout=True, stderr=True, tail=lines))
        tail = " | ".join(raw.decode(errors="replace").strip().splitlines()[-lines:])
    except Exception as exc:
        tail = f"(no log: {exc})"
    listening = "?"
    try:  # is the stage listening inside (the published port may be what fails)?
        for ctr in svc.client.containers.list(
            filters={"label": f"com.docker.swarm.service.id={svc.id}"}
        ):
            out = ctr.exec_run(["cat", "/proc/net/tcp", "/proc/net/tcp6"]).output.decode()
            ports = {
                int(ln.split()[1].rsplit(":", 1)[1], 16)
                for ln in out.splitlines()[1:]
                if len(ln.split()) > 3 and ln.split()[3] == "0A"
            }
            listening = "yes" if STAGE_PORT in ports else f"no (listening: {sorted(ports)})"
    except Exception as exc:
        listening = f"? ({exc})"
    return (
        f"task {'/'.join(states) or 'none'}; stage port listening inside: {listening}; "
        f"log: {tail or '(empty)'}"
    )


async def wait_stages(
    tb: RunningTestbed,
    services: dict[str, Any],
    timeout_s: float,
    direct: Mapping[str, str] | None = None,
) -> None:
    """Wait until every stage answers /health; a task that ends fails the wait at once (a
    watcher polls the tasks off the loop, the health wait reads what it found).

    A task on this host (``direct``: node -> its ``docker_gwbridge`` address) is tried first
    at that address, the way the docker runtime reaches a container, then at its published
    port: the first that answers is kept (and noted). The direct way skips the engine's
    userland proxy (one more copy of every byte on the broker's host), reaches the stage's
    tensor port, and crosses the same shaped veth; the published port stays the way to a
    task on another host, and the fallback when the bridge address does not answer."""
    from testbed.runtime.measure import wait_urls_healthy

    ended: dict[str, str] = {}
    direct = direct or {}

    async def watch() -> None:
        while True:
            for name, svc in services.items():
                why = await asyncio.to_thread(task_ended, svc)
                if why is not None:
                    ended[name] = why
            await asyncio.sleep(2.0)

    def ways(ep: NodeEndpoint) -> list[str]:
        gw = direct.get(ep.name)
        return ([f"http://{gw}:{STAGE_PORT}"] if gw else []) + [ep.url]

    watcher = asyncio.create_task(watch())
    try:
        chosen = await wait_urls_healthy(
            {n.name: ways(n) for n in tb.stage_nodes()}, timeout_s, gone=ended.get
        )
    except StageTimeoutError as exc:  # say what each laggard's task was doing
        seen = await asyncio.to_thread(lambda: {n: task_report(svc) for n, svc in services.items()})
        detail = "\n".join(f"  {n} ({tb.nodes[n].url}): {seen[n]}" for n in sorted(seen))
        raise StageTimeoutError(f"{exc}\n{detail}") from None
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    for name, url in chosen.items():
        ep = tb.nodes[name]
        if name in direct and url != ep.url:
            ep.address, ep.url, ep.probe_port = direct[name], url, PROBE_PORT
            tb.notes.append(f"{name}: reached at its docker_gwbridge address {ep.address}")
        elif name in direct:
            tb.notes.append(
                f"{name}: its docker_gwbridge address {direct[name]} did not answer; "
                f"reached at the published port ({ep.url})"
            )


def gwbridge_addresses(c: Any, tasks: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """Node -> its task's container's address on this host's ``docker_gwbridge`` (one look at
    the network for all of them; a container not on it is left out: its published port)."""
    import docker

    try:
        members = c.networks.get(GWBRIDGE).attrs.get("Containers") or {}
    except docker.errors.NotFound:
        return {}
    out = {}
    for name, task in tasks.items():
        cid = ((task.get("Status") or {}).get("ContainerStatus") or {}).get("ContainerID")
        addr = str((members.get(cid) or {}).get("IPv4Address") or "").split("/", 1)[0]
        if addr:
            out[name] = addr
    return out
