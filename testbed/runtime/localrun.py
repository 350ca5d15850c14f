"""`--runtime local`: nodes as local processes on loopback, all shaping in the app (no root).

Each node is a ``testbed stage serve`` process in its own session (so Ctrl-C in the shell
does not reach it, and it outlives `testbed up`), on a leash (:mod:`testbed.runtime.owner`):
it stops by itself when the run's owner dies without cleaning up (SIGKILL of `testbed up`
while starting, or of `replay --up`). `testbed down` / `clean` stop it by the pid recorded in
the state file. One probe process serves link measurements for all nodes: on loopback the
path is the same for every node, and what differs, the hop's app shaper, runs in the
measuring client. CPU quotas are not enforced locally; the device profile's numbers are shown
as planned.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path

from testbed.errors import RuntimeBackendError
from testbed.net.links import plan_shaping
from testbed.paths import state_dir
from testbed.runtime import owner
from testbed.runtime.base import NodeEndpoint, RunningTestbed, new_run_id, stage_serve_argv
from testbed.runtime.interface import UpRequest
from testbed.runtime.measure import wait_healthy
from testbed.runtime.processes import kill_pids


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(argv: list[str], log: Path) -> int:
    with open(log, "ab") as out:
        proc = subprocess.Popen(  # own session on purpose: the testbed outlives `testbed up`
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=os.environ | {"PYTHONUNBUFFERED": "1"},
        )
    return proc.pid


def _leash(tb: RunningTestbed) -> list[str]:
    """Run a command on the run's leash: ``python -m testbed.runtime.owner STATE ...``."""
    return [sys.executable, "-m", "testbed.runtime.owner", str(tb.state_path)]


async def up_local(req: UpRequest) -> RunningTestbed:
    extra_serve_args = dict(req.extra_serve_args or {})  # node -> flags (emulated devices)
    run_id = new_run_id()
    model_dir = await asyncio.to_thread(req.model_dir.resolve)
    tb = RunningTestbed(
        run_id,
        "local",
        "app",
        req.topology_path,
        req.topology.name,
        str(model_dir),
        {},
        seed=req.seed,
        owner=owner.me(),
    )
    logs = state_dir() / f"{run_id}-logs"
    await asyncio.to_thread(logs.mkdir, parents=True, exist_ok=True)
    await asyncio.to_thread(tb.save)
    try:
        shaping = plan_shaping(req.topology, "app")
        probe_port = _free_port()
        probe_argv = [*_leash(tb), "testbed.net.probe", "serve"]
        probe_argv += ["--host", "127.0.0.1", "--port", str(probe_port)]
        probe_pid = await asyncio.to_thread(_spawn, probe_argv, logs / "probe.log")
        tb.extra_pids.append(probe_pid)
        for j, tier in enumerate(req.topology.tiers):
            for node in tier.nodes:
                stage = req.plan.stage_of_node(node.name)
                if stage is None:
                    tb.notes.append(f"{node.name}: holds no blocks in this plan; not started")
                    continue
                port = _free_port()
                ns = shaping[node.name]
                argv = stage_serve_argv(
                    [*_leash(tb), "cli"],
                    str(model_dir),
                    (stage.start, stage.end),
                    host="127.0.0.1",
                    port=port,
                    name=node.name,
                    extra=extra_serve_args.get(node.name, ()),  # emulated devices
                )
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
                        if node.name in extra_serve_args
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
                await asyncio.to_thread(tb.save)
        for i, n in enumerate(sorted(tb.nodes)):
            tb.nodes[n].make_hook(req.seed * 1000 + i)
        tb.notes.append("local runtime: CPU quotas and memory limits are not enforced")
        if extra_serve_args:  # emulated devices
            from testbed.emulation.plumbing import EMULATION_NOTE

            tb.notes.append(EMULATION_NOTE)
        try:
            await wait_healthy(tb, req.health_timeout_s)
        except Exception as exc:
            tails = []
            for ep in tb.nodes.values():
                with contextlib.suppress(OSError):
                    text = (logs / f"{ep.name}.log").read_text(errors="replace")[-600:]
                    tails.append(f"--- {ep.name}:\n{text}")
            raise RuntimeBackendError(f"{exc}\n" + "\n".join(tails)) from exc
        tb.status = "up"
        await asyncio.to_thread(tb.save)
        return tb
    except BaseException:
        await asyncio.shield(asyncio.to_thread(remove_local, run_id, tb))
        raise


def remove_local(run_id: str, tb: RunningTestbed | None) -> str:
    """Stop the run's processes (SIGTERM, then SIGKILL), remove its state file and logs."""
    from testbed.runtime.control import forget

    n = kill_pids(tb.pids()) if tb is not None else 0
    forget(run_id)
    return f"{run_id}: stopped {n} processes, removed its state and logs"
