"""`--runtime local`: nodes as local processes on loopback, all shaping in the app (no root).

Each node is a detached ``testbed stage serve`` process (its own session, so it outlives
`testbed up` and `testbed down` / `clean` stop it by the pid recorded in the state file).
One probe process serves link measurements for all nodes: on loopback the path is the same
for every node, and what differs, the hop's app shaper, runs in the measuring client.
CPU quotas are not enforced locally; the device profile's numbers are shown as planned.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from testbed.errors import RuntimeBackendError
from testbed.net.links import plan_shaping
from testbed.runtime.base import CLI_CODE, NodeEndpoint, RunningTestbed, new_run_id, state_dir

if TYPE_CHECKING:
    from testbed.spec.plan import Plan
    from testbed.spec.topology import Topology


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(argv: list[str], log: Path) -> int:
    with open(log, "ab") as out:
        proc = subprocess.Popen(  # detached on purpose: the testbed outlives `testbed up`
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=os.environ | {"PYTHONUNBUFFERED": "1"},
        )
    return proc.pid


async def up_local(
    topology: Topology,
    topology_path: str,
    plan: Plan,
    model_dir: Path,
    *,
    seed: int = 0,
    health_timeout_s: float = 120.0,
    extra_serve_args: dict[str, list[str]] | None = None,  # node -> flags (emulated devices)
) -> RunningTestbed:
    from testbed.runtime.control import down_sync
    from testbed.runtime.measure import wait_healthy

    run_id = new_run_id()
    model_dir = await asyncio.to_thread(model_dir.resolve)
    tb = RunningTestbed(
        run_id,
        "local",
        "app",
        topology_path,
        topology.name,
        str(model_dir),
        {},
        seed=seed,
    )
    logs = state_dir() / f"{run_id}-logs"
    await asyncio.to_thread(logs.mkdir, parents=True, exist_ok=True)
    tb.save()
    try:
        shaping = plan_shaping(topology, "app")
        probe_port = _free_port()
        probe_pid = await asyncio.to_thread(
            _spawn,
            [
                sys.executable,
                "-m",
                "testbed.net.probe",
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(probe_port),
            ],
            logs / "probe.log",
        )
        tb.extra_pids.append(probe_pid)
        for j, tier in enumerate(topology.tiers):
            for node in tier.nodes:
                stage = plan.stage_of_node(node.name)
                if stage is None:
                    tb.notes.append(f"{node.name}: holds no blocks in this plan; not started")
                    continue
                port = _free_port()
                ns = shaping[node.name]
                argv = [
                    sys.executable,
                    "-c",
                    CLI_CODE,
                    "stage",
                    "serve",
                    "--model-dir",
                    str(model_dir),
                    "--blocks",
                    f"{stage.start}:{stage.end}",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--name",
                    node.name,
                    *(extra_serve_args or {}).get(node.name, []),  # emulated devices
                ]
                pid = await asyncio.to_thread(_spawn, argv, logs / f"{node.name}.log")
                tb.nodes[node.name] = NodeEndpoint(
                    name=node.name,
                    tier=tier.name,
                    tier_index=j,
                    url=f"http://127.0.0.1:{port}",
                    start=stage.start,
                    end=stage.end,
                    device=(
                        f"emulated {node.device.label or node.device.kind}"
                        if node.name in (extra_serve_args or {})
                        else "cpu (local process)"
                    ),
                    address="127.0.0.1",
                    probe_port=probe_port,
                    cpus=node.device.cpus,
                    mem_limit_bytes=None,
                    pid=pid,
                    link=ns.link,
                    link_rtt_s=ns.configured_rtt_s,
                    link_rate_bps=ns.configured_rate_bps,
                    hop=ns.hop,
                )
                tb.save()
        for i, n in enumerate(sorted(tb.nodes)):
            tb.nodes[n].make_hook(seed * 1000 + i)
        tb.notes.append("local runtime: CPU quotas and memory limits are not enforced")
        if extra_serve_args:  # emulated devices
            from testbed.emulation.plumbing import EMULATION_NOTE

            tb.notes.append(EMULATION_NOTE)
        try:
            await wait_healthy(tb, health_timeout_s)
        except Exception as exc:
            tails = []
            for ep in tb.nodes.values():
                with contextlib.suppress(OSError):
                    text = (logs / f"{ep.name}.log").read_text(errors="replace")[-600:]
                    tails.append(f"--- {ep.name}:\n{text}")
            raise RuntimeBackendError(f"{exc}\n" + "\n".join(tails)) from exc
        tb.status = "up"
        tb.save()
        return tb
    except BaseException:
        await asyncio.shield(asyncio.to_thread(down_sync, run_id))
        raise
