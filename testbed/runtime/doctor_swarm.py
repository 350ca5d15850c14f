"""`testbed doctor` checks of the swarm, when the engine is in one: managers and workers,
an overlay network, and every host's kernel shaping support (the agent's ``probe``)."""

from __future__ import annotations

import time
from typing import Any

from testbed.runtime.doctor import Check, Level
from testbed.runtime.swarm import swarm_nodes, swarm_state


def swarm_checks(c: Any) -> list[Check]:
    sw = swarm_state(c)
    state = sw.get("LocalNodeState") or "inactive"
    if state != "active":
        return [
            Check(
                "swarm",
                "ok",
                f"not in a swarm ({state}): runtime swarm unavailable, docker/local work",
                "",
            )
        ]
    if not sw.get("ControlAvailable"):
        return [
            Check(
                "swarm",
                "warn",
                f"this engine is a worker of swarm {sw.get('Cluster', {}).get('ID', '?')[:12]}",
                "run `testbed up --runtime swarm` on a manager",
            )
        ]
    nodes = swarm_nodes(c)
    managers = [n for n in nodes if n.role == "manager"]
    down = [n.hostname for n in nodes if not n.ready]
    out = [
        Check(
            "swarm",
            "warn" if down else "ok",
            f"manager here; {len(managers)} manager(s), {len(nodes) - len(managers)} worker(s)"
            + (f"; not ready/active: {', '.join(down)}" if down else ""),
            "`docker node ls`; `docker node update --availability active NODE`" if down else "",
        )
    ]
    for n in nodes:
        labels = ", ".join(f"{k}={v}" for k, v in n.labels.items()) or "no labels"
        gpus = f", {n.gpus} NVIDIA-GPU" if n.gpus else ""
        out.append(
            Check(
                f"swarm node {n.hostname}",
                "ok" if n.ready else "warn",
                f"{n.role} at {n.addr or '?'} ({labels}{gpus})",
            )
        )
    out.append(_overlay_check(c))
    out.extend(_shaping_checks(c))
    return out


def _overlay_check(c: Any) -> Check:
    import docker

    from testbed.runtime.base import LABEL_RUN

    name = f"testbed-doctor-{int(time.time() * 1000) % 10**9}"
    try:
        net = c.networks.create(
            name, driver="overlay", attachable=True, labels={LABEL_RUN: "doctor"}
        )
        net.remove()
        return Check("overlay", "ok", "an attachable overlay network can be created")
    except docker.errors.APIError as exc:
        return Check(
            "overlay",
            "fail",
            f"creating an overlay failed: {exc}",
            "open 4789/udp (vxlan) and 7946/tcp+udp between hosts; the kernel needs vxlan",
        )


def _shaping_checks(c: Any) -> list[Check]:
    """Every host's qdiscs, probed by the agent (needs the node image; not built here)."""
    from testbed.runtime.image import NODE_REPO, node_tag, python_mounts
    from testbed.runtime.swarm_agent import run_agent_job

    images = [t for img in c.images.list(name=NODE_REPO) for t in img.tags]
    current = [node_tag(m) for m in ("offline", "dockerfile")]  # this code's image, if built
    images = [t for t in current if t in images]
    if not images:
        return [
            Check(
                "per-host shaping",
                "warn",
                "not probed: no node image of this code yet",
                "`testbed up --runtime swarm` builds it; then run `testbed doctor` again",
            )
        ]
    tag = images[0]
    mounts = python_mounts("offline") if ":offline-" in tag else ()
    try:
        recs = run_agent_job(
            c,
            run_id="doctor",
            name=f"probe-{int(time.time() * 1000) % 10**8}",
            image=tag,
            argv=["python3", "-m", "testbed.runtime.swarm_agent", "probe"],
            env={},
            mounts=mounts,
            timeout_s=180,
        )
    except Exception as exc:  # a check reports, it does not raise
        return [Check("per-host shaping", "fail", f"agent probe failed: {exc}", "")]
    out = []
    for r in recs:
        if "probe" not in r:
            continue
        found = f"netem {'yes' if r['netem'] else 'NO'}, htb {'yes' if r['htb'] else 'NO'}"
        lvl: Level = "ok" if r["backend"] == "kernel" else "warn"
        out.append(
            Check(
                f"shaping on {r['probe']}",
                lvl,
                f"{found} ({r['method']}); backend {r['backend']}",
                ""
                if lvl == "ok"
                else "delay/jitter/loss fall back to the app shaper; modprobe sch_netem there",
            )
        )
    return out or [Check("per-host shaping", "warn", "the agent reported nothing", "")]
